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
