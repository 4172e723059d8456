"""Barge-in (SPEC §2.4): stop forwarding, `interrupted`, truncate at the played position, clamped."""
from __future__ import annotations

from gateway.mock import MockOptions
from tests.relay_harness import BYTES_PER_MS, RelayClient, frames, relay, silence, speech_like
from tests.support import run

REALTIME = MockOptions(pacing="realtime", delta_ms=100)


async def _start_long_reply(client: RelayClient) -> dict:
    """A 1.5 s user turn (fast), so a ~1.8 s reply plays in real time; returns response_started."""
    await client.send({"type": "config", "vad": {"silence_duration_ms": 300}})
    await client.wait("ready")
    for frame in frames(silence(0.3) + speech_like(1.5, seed=11) + silence(0.4), 4800):
        await client.send_audio(frame)
    return await client.wait("response_started")


def test_barge_in_truncates_at_the_audio_the_client_received():
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            response = await _start_long_reply(client)
            await client.wait_audio(3 * 100 * BYTES_PER_MS, timeout=3)   # a few deltas have played
            for frame in frames(speech_like(0.4, seed=12), 4800):      # the user talks over it
                await client.send_audio(frame)
            interrupted = await client.wait("interrupted", timeout=3)
            assert interrupted["response_id"] == response["response_id"]
            received_ms = interrupted["_audio_before"] // BYTES_PER_MS
            assert 300 <= received_ms < 1800
            assert interrupted["played_ms"] == received_ms
            upstream = mock.sessions[0]
            truncate = await upstream.wait_for_client_event("conversation.item.truncate", timeout=3)
            assert truncate["audio_end_ms"] == received_ms and truncate["content_index"] == 0
            truncated = await upstream.wait_for_server_event("conversation.item.truncated", timeout=3)
            assert truncated["audio_end_ms"] == received_ms
            done = await client.wait("response_done", response_id=response["response_id"], timeout=3)
            assert done["status"] == "cancelled"
            # nothing of the interrupted response was forwarded after `interrupted`
            assert done["_audio_before"] == interrupted["_audio_before"]
            assert not any(e["type"] == "error" and e.get("fatal") for e in client.events)
    run(scenario(), timeout=20)


def test_playback_report_sets_the_truncation_point():
    async def scenario():
        async with relay(REALTIME) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await _start_long_reply(client)
            await client.wait_audio(3 * 100 * BYTES_PER_MS, timeout=3)
            await client.send({"type": "playback", "played_ms": 150})
            for frame in frames(speech_like(0.4, seed=13), 4800):
                await client.send_audio(frame)
            interrupted = await client.wait("interrupted", timeout=3)
            assert interrupted["played_ms"] == 150
            truncate = await mock.sessions[0].wait_for_client_event("conversation.item.truncate", timeout=3)
            assert truncate["audio_end_ms"] == 150
    run(scenario(), timeout=20)


def test_cancel_race_is_reported_but_never_fatal():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "cancel_response"})     # nothing is active: a benign race
            error = await client.wait("error")
            assert error["code"] == "UpstreamError" and error["fatal"] is False
            assert error["upstream"]["code"] == "response_cancel_not_active"
            await client.send({"type": "text", "text": "still here?"})
            assert (await client.wait("response_done"))["status"] == "completed"
    run(scenario(), timeout=20)
