"""Every fault knob of the mock, each shown to have its effect on a real client connection.

Time is the thing under test for handshake_delay_s, close_after_s, session_max_s and
slow_read_s, so those tests measure elapsed time (with tolerance); nothing here sleeps to
synchronise.
"""
from __future__ import annotations

import asyncio
import base64
import time

import orjson
import pytest

from gateway.mock import MockOptions, MockRealtimeServer
from tests.support import run
from tests.test_mock_upstream import RawClient, open_dialect, update


def test_handshake_delay_holds_the_upgrade() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(handshake_delay_s=0.4)) as server:
            started = time.monotonic()
            client = await RawClient.open(server)
            opened = time.monotonic() - started
            assert 0.38 <= opened < 2.0
            await client.expect("session.created")  # the delayed connection works normally
            await client.send({"type": "input_audio_buffer.clear"})
            await client.expect("input_audio_buffer.cleared")
        async with MockRealtimeServer() as fast_server:
            started = time.monotonic()
            await RawClient.open(fast_server)
            assert time.monotonic() - started < opened - 0.25
    run(scenario(), timeout=10)


def test_close_after_s_drops_without_close_frame() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(close_after_s=0.3)) as server:
            started = time.monotonic()
            client = await RawClient.open(server)
            await client.expect("session.created")
            code, _ = await client.closed(timeout=5)
            elapsed = time.monotonic() - started
            assert code is None  # no close frame: the TCP connection was just dropped
            assert 0.28 <= elapsed < 2.0
            await server.sessions[0].wait_closed(2)
    run(scenario(), timeout=10)


def test_close_after_s_with_close_frame_variant() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(close_after_s=0.2, close_with_frame=True)) as server:
            client = await RawClient.open(server)
            await client.expect("session.created")
            assert await client.closed() == (1011, "mock fault injection")
    run(scenario(), timeout=10)


def test_close_after_events_drops_after_exactly_n_server_events() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(close_after_events=3)) as server:
            client = await RawClient.open(server)
            for _ in range(5):
                await client.send({"type": "input_audio_buffer.clear"})
            code, _ = await client.closed()
            assert code is None
            assert [e["type"] for e in client.events] == [
                "session.created", "input_audio_buffer.cleared", "input_audio_buffer.cleared"]
            assert server.sessions[0].events_sent == 3
    run(scenario(), timeout=10)


def test_session_max_s_expires_with_session_expired_then_1001() -> None:
    async def scenario() -> None:
        async with MockRealtimeServer(MockOptions(session_max_s=0.3)) as server:
            started = time.monotonic()
            client = await RawClient.open(server)
            created = await client.expect("session.created")
            mock = server.sessions[0]
            assert created["session"]["expires_at"] == int(mock.created_at + 0.3)
            error = await client.expect("error", timeout=5)
            assert 0.28 <= time.monotonic() - started < 2.0
            assert error["error"] == {
                "type": "invalid_request_error", "code": "session_expired",
                "message": "Your session hit the maximum duration of 0.005 minutes.",
                "param": None, "event_id": None}
            assert await client.closed() == (1001, "invalid_request_error.session_expired")
        async with MockRealtimeServer(MockOptions(session_max_s=1800)) as server:
            client = await RawClient.open(server)
            mock = await server.wait_for_session(0)
            mock._expire()  # the message names whole minutes
            error = await client.recv_until("error")
            assert error[-1]["error"]["message"] == "Your session hit the maximum duration of 30 minutes."
    run(scenario(), timeout=10)


@pytest.mark.parametrize("dialect, minutes", [("ga", 60), ("beta", 30)])
def test_the_default_session_lifetime_is_the_dialects(dialect: str, minutes: int) -> None:
    """OpenAI: GA sessions last 60 minutes, beta ones 30 (since December 2024)."""
    async def scenario() -> None:
        options = MockOptions(beta="serve") if dialect == "beta" else MockOptions()
        async with MockRealtimeServer(options) as server:
            client = await RawClient.open(server, headers={"OpenAI-Beta": "realtime=v1"} if dialect == "beta" else None)
            created = await client.expect("session.created")
            left = created["session"]["expires_at"] - time.time()
            assert minutes * 60 - 5 < left <= minutes * 60
    run(scenario(), timeout=10)


def test_slow_read_backpressures_the_sender() -> None:
    """With slow_read_s the mock stops reading after each frame; a client pushing 10 large
    appends is held back by TCP flow control (its sends block), unlike against a normal mock."""
    frame = orjson.dumps({"type": "input_audio_buffer.append",
                          "audio": base64.b64encode(bytes(1_500_000)).decode()}).decode()

    async def push(options: MockOptions) -> tuple[float, float]:
        async with MockRealtimeServer(options) as server:
            client = await open_dialect(server, "ga")
            await update(client, "ga", turn_detection=None)
            mock = server.sessions[0]
            started = time.monotonic()
            for _ in range(10):
                await client.ws.send(frame)
            sent = time.monotonic() - started
            for _ in range(10):
                await mock.wait_for_client_event("input_audio_buffer.append", timeout=10)
            return sent, time.monotonic() - started

    async def scenario() -> None:
        normal_sent, normal_received = await push(MockOptions())
        slow_sent, slow_received = await push(MockOptions(slow_read_s=0.2))
        assert slow_sent >= 0.4  # the client's sends waited for the mock to read
        assert slow_received >= 0.6
        assert slow_received > 3 * normal_received
    run(scenario(), timeout=20)


def test_model_not_found_failure_and_fail_every_n() -> None:
    async def scenario() -> None:
        options = MockOptions(fail_responses="model_not_found", fail_every_n=3)
        async with MockRealtimeServer(options) as server:
            client = await RawClient.open(server, path="/v1/realtime?model=gpt-nope")
            await client.expect("session.created")
            statuses = []
            for _ in range(3):
                await client.send({"type": "response.create"})
                statuses.append((await client.recv_until("response.done"))[-1]["response"])
            assert [r["status"] for r in statuses] == ["completed", "completed", "failed"]
            assert statuses[2]["status_details"] == {"type": "failed", "error": {
                "type": "invalid_request_error", "code": "model_not_found",
                "message": "The model `gpt-nope` does not exist or you do not have access to it."}}
    run(scenario(), timeout=10)


def test_stop_closes_open_sessions_with_1001() -> None:
    async def scenario() -> None:
        server = MockRealtimeServer()
        await server.start()
        client = await RawClient.open(server)
        await client.expect("session.created")
        await server.stop()
        assert await client.closed() == (1001, "server shutting down")
        assert server.sessions[0].closed
        assert not server.open_sessions
        try:
            await asyncio.wait_for(RawClient.open(server), 2)
        except OSError:
            pass
        else:
            raise AssertionError("a stopped server accepted a connection")
    run(scenario(), timeout=10)
