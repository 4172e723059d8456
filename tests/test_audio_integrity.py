"""Audio integrity: 60 s of non-trivial audio per session, 20 sessions at once, sent as fast as the
socket allows in uneven (often odd) frame sizes; push-to-talk commit; the mock's echo must come
back byte-identical and in order for every session."""
from __future__ import annotations

import asyncio

import numpy as np

from gateway.mock import MockOptions
from tests.relay_harness import RelayClient, relay, speech_like
from tests.support import run

SESSIONS = 20
SECONDS = 60


def _uneven_frames(pcm: bytes, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out, offset = [], 0
    while offset < len(pcm):
        size = int(rng.integers(1, 9601))
        out.append(pcm[offset:offset + size])
        offset += size
    return out


async def _one_session(url: str, index: int) -> None:
    audio = speech_like(SECONDS, seed=1000 + index)
    client = await RelayClient.connect(url)
    await client.send({"type": "config", "turn_detection": "none", "input_transcription": {"enabled": False}})
    await client.wait("ready", timeout=20)
    for frame in _uneven_frames(audio, seed=index):
        await client.send_audio(frame)
    await client.send({"type": "commit"})
    await client.send({"type": "create_response"})
    done = await client.wait("response_done", timeout=60)
    assert done["status"] == "completed"
    received = bytes(client.audio)
    assert len(received) == len(audio), (index, len(received), len(audio))
    assert received == audio, f"session {index}: echo differs"
    await client.close()


def test_sixty_seconds_by_twenty_sessions_echo_byte_identical():
    async def scenario():
        async with relay(MockOptions(delta_ms=200, record=False)) as (gateway, mock):
            await asyncio.gather(*(_one_session(gateway.url, i) for i in range(SESSIONS)))
            await gateway.wait_empty(5)
    run(scenario(), timeout=90)


def test_half_a_sample_at_a_commit_is_carried_and_the_client_told():
    """Found by a bad-input audit: a turn ending on an odd number of PCM16 bytes leaves the odd
    byte to start the next turn, shifting every later sample by a byte, and nothing said so.
    SPEC §2.2 carries an odd byte, never drops it: a stream split at an odd byte around a
    commit or a clear stays aligned (a review of a first fix that dropped it showed the other
    side). The byte is carried, and at a commit the client is told (non-fatal InvalidMessage)."""
    stream = speech_like(0.4, seed=7)
    first, rest = stream[:4801], stream[4801:]  # split mid-sample

    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            echoes = []
            for audio in (first, rest):
                before = len(client.audio)
                await client.send_audio(audio)
                await client.send({"type": "commit"})
                await client.send({"type": "create_response"})
                await client.wait("response_done")
                echoes.append(bytes(client.audio[before:]))
            errors = client.of_type("error")
            await client.close()
            return echoes, errors

    echoes, errors = run(scenario(), timeout=20)
    assert echoes == [stream[:4800], stream[4800:]]  # aligned: the odd byte went on with the rest
    assert [(e["code"], e["fatal"]) for e in errors] == [("InvalidMessage", False)]
    assert errors[0]["message"].startswith("the committed audio ended on half a sample")
