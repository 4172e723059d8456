"""Done-means 1: the seed document's Python example ("Usage Example / Python" of
reference/seed-openai-realtime.md), copied verbatim, extended ONLY to stream a WAV after `ready`
and to stop after the reply, runs against `realtime-gateway --upstream mock`.

The example's URI is the seed's `ws://localhost:3001/realtime`; the test runs the gateway on a free
port and redirects that one URI to it (monkeypatched `websockets.connect`), so the example's text
stays untouched.
"""
from __future__ import annotations

import wave

import websockets

from tests.relay_harness import free_port, gateway_process, silence, speech_like

# ---- verbatim from the seed document, with the two marked extensions ---------------------------
SEED_EXAMPLE = '''
import asyncio
import websockets
import json

async def realtime_session():
    uri = 'ws://localhost:3001/realtime'

    async with websockets.connect(uri) as ws:
        # Send config
        await ws.send(json.dumps({
            'type': 'config',
            'provider': 'openai',
            'model': 'gpt-4o-realtime-preview',
            'voice': 'nova',
            'instructions': 'You are a helpful assistant.'
        }))

        async for message in ws:
            if isinstance(message, str):
                data = json.loads(message)

                if data['type'] == 'ready':
                    print('Session ready!')
                    # Start sending audio
                    await stream_wav(ws, WAV_PATH)  # EXTENSION: stream a WAV after ready

                elif data['type'] == 'transcript':
                    print(f"[{data['role']}] {data['text']}")

                elif data['type'] == 'response_done':  # EXTENSION: stop after the reply
                    break

            else:
                # Binary audio response
                await play_audio(message)

asyncio.run(realtime_session())
'''

# ---- what the example leaves to the reader -------------------------------------------------------
HELPERS = '''
import wave as _wave

async def stream_wav(ws, path):
    """Send the WAV's 24 kHz mono PCM16 in real-time 20 ms frames."""
    with _wave.open(path, "rb") as wav:
        pcm = wav.readframes(wav.getnframes())
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index, offset in enumerate(range(0, len(pcm), 960)):
        await ws.send(pcm[offset:offset + 960])
        await asyncio.sleep(max(0.0, start + (index + 1) * 0.02 - loop.time()))

async def play_audio(chunk):
    PLAYED.extend(chunk)
'''


def test_seed_python_example_against_the_mock_gateway(tmp_path, monkeypatch, capsys):
    speech = speech_like(1.0, seed=21)
    wav_path = tmp_path / "input.wav"
    with wave.open(str(wav_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(24000)
        wav.writeframes(silence(0.3) + speech + silence(0.8))

    port = free_port()
    real_connect = websockets.connect

    def connect_to_test_gateway(uri, *args, **kwargs):
        assert uri == "ws://localhost:3001/realtime"
        return real_connect(f"ws://127.0.0.1:{port}/realtime", *args, **kwargs)

    monkeypatch.setattr(websockets, "connect", connect_to_test_gateway)
    played = bytearray()
    namespace = {"WAV_PATH": str(wav_path), "PLAYED": played, "__name__": "seed_example"}
    with gateway_process(port=port):
        exec(compile("import asyncio\n" + HELPERS, "helpers", "exec"), namespace)
        exec(compile(SEED_EXAMPLE, "seed_example", "exec"), namespace)

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "Session ready!"
    assert any(line.startswith("[user] ") and len(line) > len("[user] ") for line in printed)
    assert any(line.startswith("[assistant] ") for line in printed)
    # the binary reply is the mock's echo of the spoken turn (prefix padding included)
    assert len(played) > 0.9 * len(speech) and bytes(played).find(speech[:4800]) >= 0
