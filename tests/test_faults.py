"""Faults (SPEC §6, §7; issue 6 done-means 2), driven by the mock's fault knobs and by clients that
misbehave at the socket level.

Each fault gets its specified outcome — the error code, whether it is fatal, the close code, what
audio arrived — and then `no_leaks` proves nothing stayed behind: the gateway's session registry
empties, the mock has no open session, the metrics gauges `gateway_sessions_active` and
`gateway_upstream_connections_open` are back to zero, and no asyncio task the session started is
still running.

Some tests use what issue 6 adds (`GET /metrics`, node settings `idle_timeout_s`, `max_session_s`,
`session_warning_s`, `max_client_queue_ms`, `slow_client_policy`, the `IdleTimeout` code). While
one is missing, the test fails with "waiting on ..." naming it.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _fastpath import CLIENT_BATCH_BYTES
from gateway import errors as gateway_errors
from gateway.config import NodeConfig
from gateway.errors import (CLOSE_INTERNAL_ERROR, CLOSE_POLICY_VIOLATION, CLOSE_SESSION_EXPIRED,
                            CLOSE_UPSTREAM_AUTH_FAILED, ERROR_TABLE)
from gateway.mock import MockOptions
from gateway.mock.schema import default_config, render_session
from gateway.server import GatewayServer
from tests.relay_harness import SESSION, TEST_KEY, ScriptedUpstream, free_port, relay, speech_like
from tests.support import run
from tests.raw_client import RawClient, echo_turn, http_get, ready_client

DELTA_BYTES = 4800   # the mock's default delta: 100 ms of PCM16 at 24 kHz


# ---- what "nothing leaked" means ---------------------------------------------------------------

def need(**fields: Any) -> dict[str, Any]:
    """Node settings that issue 6 adds: fail clearly, naming them, until NodeConfig has them."""
    missing = [name for name in fields if name not in NodeConfig.__dataclass_fields__]
    if missing:
        pytest.fail(f"waiting on NodeConfig field(s) {missing} (issue 6 interface, not landed yet)")
    return fields


def need_code(code: str) -> gateway_errors.ErrorKind:
    if code not in ERROR_TABLE:
        pytest.fail(f"waiting on error code {code!r} in gateway/errors.py ERROR_TABLE (issue 6)")
    return ERROR_TABLE[code]


async def scrape(gateway) -> dict[tuple[str, frozenset], float]:
    """GET /metrics on the node's port, parsed: {(sample name, labels): value}."""
    status, body = await http_get(gateway.port, "/metrics")
    if status == 404:
        pytest.fail("waiting on GET /metrics (issue 6 interface, not landed yet)")
    assert status == 200, (status, body[:200])
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


async def metric(gateway, name: str, **labels: str) -> float:
    samples = await scrape(gateway)
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels} in /metrics"
    return samples[key]


async def wait_for(predicate, timeout: float, what: str) -> None:
    """Wait for a condition the code under test offers no event for (a metrics figure, a task
    ending): re-checked every 10 ms up to `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _is_mock_task(task: asyncio.Task) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and "/gateway/mock/" in code.co_filename.replace("\\", "/")


def session_tasks(include_mock: bool = False) -> set[asyncio.Task]:
    """Running tasks other than the test's own (the mock's fault-injection tasks left out)."""
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task() and not task.done()
            and (include_mock or not _is_mock_task(task))}


async def no_leaks(gateway, mock, tasks_before: set[asyncio.Task], timeout: float = 5.0) -> None:
    """Every session is gone on both sides, the gauges are back to zero, no new task runs."""
    await gateway.wait_empty(timeout)
    assert gateway.sessions == set()
    for session in list(mock.open_sessions):
        await session.wait_closed(timeout)
    assert mock.open_sessions == set()
    await wait_for(lambda: not (session_tasks() - tasks_before), timeout,
                   "the sessions' tasks to end")
    deadline = time.monotonic() + timeout
    while True:   # the gauges may trail the registry by a flush: re-scrape until zero or deadline
        values = [await metric(gateway, name) for name in ("gateway_sessions_active",
                                                           "gateway_upstream_connections_open")]
        if values == [0, 0]:
            break
        assert time.monotonic() < deadline, f"gauges not back to zero: sessions, upstreams = {values}"
        await asyncio.sleep(0.02)


async def expect_fatal(client: RawClient, code: str, close_code: int, timeout: float = 5.0) -> dict:
    error = await client.wait("error", timeout, code=code)
    assert error["fatal"] is True, error
    await client.wait_closed(timeout)
    assert client.close_code == close_code, (client.close_code, client.close_reason)
    return error


# ---- upstream faults ---------------------------------------------------------------------------

@pytest.mark.parametrize("close_with_frame", [False, True], ids=["abrupt", "close-frame"])
def test_upstream_drop_mid_response(close_with_frame):
    """The mock drops the connection after its 15th event: 4 of the reply's audio deltas are out.
    The client gets ConnectionFailed (fatal, 1011) and the audio before the drop is an exact
    prefix of the echo (everything, with a close frame; an abrupt reset may lose the tail)."""
    async def scenario():
        options = MockOptions(close_after_events=15, close_with_frame=close_with_frame)
        async with relay(options) as (gateway, mock):
            tasks = session_tasks()
            client = await ready_client(gateway.url)
            audio = speech_like(1.0, seed=1)
            client.send_binary(audio)
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            await client.wait("response_started")
            error = await expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            assert "lost" in error["message"]
            assert client.audio == audio[:client.audio_bytes]
            if close_with_frame:
                assert client.audio_bytes == 4 * DELTA_BYTES
            assert not any(e.get("type") == "response_done" for e in client.events)
            await no_leaks(gateway, mock, tasks)
    run(scenario(), timeout=20)


@pytest.mark.parametrize("mode", ["http_401", "ws_error"])
def test_upstream_401_is_authentication_failed(mode):
    async def scenario():
        async with relay(MockOptions(bad_key=mode), api_key="test-key-2") as (gateway, mock):
            tasks = session_tasks()
            client = await RawClient.connect(gateway.url)
            client.send_binary(speech_like(0.2, seed=2))        # buffered before ready, then dropped
            error = await expect_fatal(client, "AuthenticationFailed", CLOSE_UPSTREAM_AUTH_FAILED)
            assert "test-key-2" not in str(error) and "test-key-2" not in client.close_reason
            assert error["upstream"]["code"] in ("http_401", "invalid_api_key")
            assert not any(e.get("type") == "ready" for e in client.events)
            await no_leaks(gateway, mock, tasks)
            assert len(mock.sessions) == (1 if mode == "ws_error" else 0)   # no retry storm
    run(scenario(), timeout=20)


def test_rate_limited_response_is_rate_limit_exceeded_and_the_session_goes_on():
    async def scenario():
        options = MockOptions(fail_responses="rate_limit_exceeded", fail_every_n=2)
        async with relay(options) as (gateway, mock):
            tasks = session_tasks()
            client = await ready_client(gateway.url)
            await echo_turn(client, speech_like(0.3, seed=3))          # response 1: completes
            before = client.audio_bytes
            client.send_binary(speech_like(0.3, seed=4))
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})              # response 2: fails (429)
            error = await client.wait("error")
            assert error["code"] == "RateLimitExceeded" and error["fatal"] is False
            assert error["upstream"]["code"] == "rate_limit_exceeded"
            done = await client.wait("response_done")
            assert done["status"] == "failed"
            assert client.audio_bytes == before                        # a failed response has no audio
            await echo_turn(client, speech_like(0.3, seed=5))          # response 3: completes
            assert not client.disconnected
            assert await metric(gateway, "gateway_errors_total", code="RateLimitExceeded") == 1
            await client.close()
            await no_leaks(gateway, mock, tasks)
    run(scenario(), timeout=20)


def test_upstream_session_expiry_mid_response_is_session_expired():
    async def scenario():
        async with relay(MockOptions(session_max_s=0.6, pacing="realtime")) as (gateway, mock):
            tasks = session_tasks()
            client = await ready_client(gateway.url)
            audio = speech_like(2.0, seed=6)
            client.send_binary(audio)
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            error = await expect_fatal(client, "SessionExpired", CLOSE_SESSION_EXPIRED)
            assert error["upstream"]["code"] == "session_expired"
            assert 0 < client.audio_bytes < len(audio) and client.audio == audio[:client.audio_bytes]
            await no_leaks(gateway, mock, tasks)
    run(scenario(), timeout=20)


def test_an_upstream_that_hangs_up_during_the_handshake_fails_the_session_at_once():
    """An upstream that accepts TCP and closes it before answering the upgrade: picows returns
    no listener instead of raising. That is a ConnectionFailed now, not a silent success that
    only the connect timeout (30 s here) would end."""
    async def hang_up(reader, writer) -> None:
        writer.close()

    async def scenario():
        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/realtime"
        try:
            async with GatewayServer(_scripted_node(url, connect_timeout_s=30.0)) as gateway:
                client = await RawClient.connect(gateway.url)
                error = await expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
                assert "closed the connection during the WebSocket handshake" in error["message"]
                assert await metric(gateway, "gateway_upstream_connections_open") == 0
        finally:
            server.close()
    run(scenario(), timeout=20)


@pytest.mark.parametrize("how", ["client_left", "model_changed"])
def test_an_upstream_handshake_the_session_gave_up_on_is_hung_up_at_once(how: str):
    """Found by a lifecycle audit: picows does not close a connection whose handshake it was
    waiting for when the connect is cancelled. A client that left before `ready` (or re-opened
    with another model) left its upstream connection open until the upstream answered or the
    connect timeout (30 s here) ran out: beyond --max-sessions, and in no gauge. The upstream
    here reads the upgrade request and never answers it; it must see the gateway hang up."""
    requests: list[asyncio.Event] = []
    hung_up: list[asyncio.Event] = []

    async def never_answer(reader, writer) -> None:
        arrived, ended = asyncio.Event(), asyncio.Event()
        requests.append(arrived)
        hung_up.append(ended)
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        while await reader.read(4096):  # until the gateway's end of stream
            pass
        ended.set()
        writer.close()

    async def scenario():
        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/realtime"
        try:
            async with GatewayServer(_scripted_node(url, connect_timeout_s=30.0)) as gateway:
                client = await RawClient.connect(gateway.url)
                await wait_for(lambda: requests and requests[0].is_set(), 5, "the upgrade request")
                if how == "client_left":
                    await client.close()
                else:
                    client.send_json({"type": "config", "model": "gpt-realtime-mini"})
                async with asyncio.timeout(5):  # not the 30 s of the connect timeout
                    await hung_up[0].wait()
                if how == "model_changed":
                    await wait_for(lambda: len(requests) == 2 and requests[1].is_set(), 5, "the re-open")
                    assert not hung_up[1].is_set()
                    await client.close()
                    async with asyncio.timeout(5):
                        await hung_up[1].wait()
                await wait_for(lambda: not gateway.sessions, 5, "the session's end")
        finally:
            server.close()
    run(scenario(), timeout=30)


def test_clients_that_vanish_while_the_upstream_opens_leave_no_error_behind(caplog):
    """Found by a chaos audit: a client that vanished while its upstream connection was being
    opened had the connect cancelled inside uvloop's create_connection, which closes the
    transport without telling picows' protocol; picows' own handshake timer then failed a
    future nobody read, and asyncio logged an ERROR ("Future exception was never retrieved")
    per such session, a connect timeout later. The connect timeout alone bounds the handshake now."""
    import gc

    async def scenario():
        async with relay(connect_timeout_s=0.5) as (gateway, mock):
            for _ in range(5):
                client = await RawClient.connect(gateway.url)
                client.transport.disconnect(False)  # gone at once, no close frame: the node opens the upstream
            await wait_for(lambda: not gateway.sessions, 5, "the sessions' end")
            await asyncio.sleep(0.8)  # past the connect timeout, when picows' timer fired
            gc.collect()              # the unread future is reported when it is collected
            await asyncio.sleep(0)
            assert not mock.open_sessions

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run(scenario(), timeout=20)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_resetting_a_connection_whose_socket_is_closed_already_raises_nothing():
    """Found by a lifecycle audit: the close grace's reset ran on a transport whose fd uvloop had
    closed (an upstream refusing the key with an event, then close 3000): setting SO_LINGER on
    its pseudo-socket raised ValueError, logged as a traceback for most such sessions."""
    from types import SimpleNamespace

    from gateway.upstream.connection import _reset

    async def scenario():
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        try:
            lost = asyncio.get_running_loop().create_future()

            class Protocol(asyncio.Protocol):
                def connection_lost(self, exc) -> None:
                    lost.set_result(None)

            underlying, _ = await asyncio.get_running_loop().create_connection(
                Protocol, "127.0.0.1", server.sockets[0].getsockname()[1])
            pseudo_socket = underlying.get_extra_info("socket")
            underlying.close()
            await lost
            with pytest.raises(ValueError):  # the state the reset met: uvloop's socket, its fd closed
                pseudo_socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\0" * 8)
            disconnects = []
            closed = SimpleNamespace(get_extra_info=lambda name: pseudo_socket)
            _reset(SimpleNamespace(is_disconnected=False, underlying_transport=closed,
                                   disconnect=disconnects.append))
            assert disconnects == [False]
        finally:
            server.close()
    run(scenario(), timeout=10)


def test_an_upstream_connection_closed_politely_is_let_go_when_the_close_ends():
    """Found by a lifecycle audit: every close() armed its own grace timer, and each held the
    upstream transport for the whole grace (5 s) after the close had ended (90 timers for 30 sessions)."""
    import gc
    import weakref

    from gateway.upstream.connection import CLOSE_GRACE_S

    async def scenario():
        async with relay() as (gateway, mock):
            client = await ready_client(gateway.url)
            (session,) = gateway.sessions
            upstream = weakref.ref(session.upstream.transport)
            del session
            await client.close()
            await wait_for(lambda: not gateway.sessions and not mock.open_sessions, 5, "the session's end")
            await wait_for(lambda: upstream() is None or upstream().is_disconnected, 5, "the upstream's end")
            started = time.monotonic()
            # gc.collect() frees the transport as soon as nothing but cycles holds it
            await wait_for(lambda: gc.collect() >= 0 and upstream() is None, CLOSE_GRACE_S + 2, "the transport let go")
            assert time.monotonic() - started < CLOSE_GRACE_S / 2
    run(scenario(), timeout=20)


def test_upstream_handshake_timeout_is_connection_failed_within_the_connect_timeout():
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.8), connect_timeout_s=0.3) as (gateway, mock):
            tasks = session_tasks()
            started = time.monotonic()
            client = await RawClient.connect(gateway.url)
            client.send_json({"type": "config", "turn_detection": "none"})
            error = await expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            elapsed = time.monotonic() - started
            assert 0.25 < elapsed < 1.0, elapsed          # the timeout itself is under test
            assert "0.3 s" in error["message"]
            await no_leaks(gateway, mock, tasks)
            # the mock's slow front lets the gateway's (abandoned) upgrade through 0.8 s later: the
            # gateway has hung up, so any such upstream session must end at once
            await wait_for(lambda: not any(map(_is_mock_task, session_tasks(include_mock=True))), 5,
                           "the mock's delayed handshake")
            for session in list(mock.open_sessions):
                await session.wait_closed(2)
            assert mock.open_sessions == set()
    run(scenario(), timeout=20)


def test_unreachable_upstream_is_connection_failed_and_leaves_nothing():
    async def scenario():
        async with relay() as (gateway, mock):
            tasks = session_tasks()
            closed_port_url = mock.url.replace(f":{mock.port}/", f":{free_port()}/")
            gateway.upstream_url = closed_port_url      # nothing listens there: connection refused
            client = await RawClient.connect(gateway.url)
            client.send_binary(speech_like(0.1, seed=13))
            error = await expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            assert "cannot reach" in error["message"] and TEST_KEY not in error["message"]
            await no_leaks(gateway, mock, tasks)
            assert mock.sessions == []
    run(scenario(), timeout=20)


def test_slow_upstream_reader_still_gets_all_audio_in_order():
    """The mock stops reading for 20 ms after every frame (TCP backpressure towards the gateway):
    the audio still arrives upstream intact and in order, and the echo is byte-exact."""
    async def scenario():
        async with relay(MockOptions(slow_read_s=0.02), coalesce_ms=100) as (gateway, mock):
            tasks = session_tasks()
            client = await ready_client(gateway.url)
            audio = speech_like(3.0, seed=7)
            await echo_turn(client, audio, frame_bytes=960, timeout=15)
            upstream = mock.sessions[-1]
            import base64
            appended = b"".join(base64.b64decode(e["audio"]) for e in upstream.received
                                if e["type"] == "input_audio_buffer.append")
            assert appended == audio
            await client.close()
            await no_leaks(gateway, mock, tasks)
    run(scenario(), timeout=30)


def test_a_client_that_leaves_while_it_is_not_being_read_ends_its_session():
    """The upstream stops reading, so the gateway stops reading the client (backpressure); the
    client then goes away. Its close frame and FIN wait unread behind its audio, yet the session
    and its upstream connection must not stay open until the upstream catches up: the gateway
    asks the kernel (HANGUP_CHECK_S) and closes both."""
    async def scenario():
        # the upstream would catch up only after a minute: ending within 20 s proves nobody waited
        async with relay(MockOptions(slow_read_s=60.0)) as (gateway, mock):
            client = await ready_client(gateway.url, {"turn_detection": "none"})
            session = next(iter(gateway.sessions))
            upstream = session.upstream.transport
            audio = speech_like(1.0, seed=21)
            for _ in range(200):  # 9.6 MB: more than the kernel buffers between us and the mock
                client.send_binary(audio)
            await wait_for(lambda: session._client_reading_paused, 10, "the gateway to stop reading the client")
            client.transport.disconnect(False)  # gone: what it had not sent yet is dropped (RST)
            await gateway.wait_empty(20)
            assert session.outcome == "client_disconnected"
            assert await metric(gateway, "gateway_upstream_connections_open") == 0
            # and the upstream socket is really gone: a polite close would wait for the stalled
            # upstream to take the audio still queued for it (here a minute; in production, ever)
            await wait_for(lambda: upstream.is_disconnected, 2, "the gateway to let go of the upstream socket")
    run(scenario(), timeout=40)


def test_audio_dropped_before_ready_is_counted_as_a_drop():
    """Audio past the pre-ready buffer is reported to the client (NotConnected) and counted in
    gateway_drops_total / gateway_dropped_bytes_total {reason="pre_ready_overflow"}, byte for byte."""
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.5), pre_ready_buffer_ms=100) as (gateway, mock):
            client = await RawClient.connect(gateway.url)
            client.send_json({"type": "config", "turn_detection": "none"})
            frame = speech_like(0.02, seed=30)                 # 960 bytes; 100 ms = 4,800 bytes
            for _ in range(10):
                client.send_binary(frame)
            error = await client.wait("error", 5, code="NotConnected")
            assert error["fatal"] is False
            await client.wait("ready", 5)
            assert await metric(gateway, "gateway_dropped_bytes_total", reason="pre_ready_overflow") == 5 * 960
            assert await metric(gateway, "gateway_drops_total", reason="pre_ready_overflow") == 5
            await client.close()
    run(scenario(), timeout=20)


def test_empty_audio_frames_before_ready_take_no_room():
    """Found by a bad-input audit: the pre-ready buffer counted bytes only, so empty frames were
    queued without limit (a million of them: 7 MiB) while the upstream was opening."""
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=1.0)) as (gateway, mock):
            client = await RawClient.connect(gateway.url)
            for _ in range(5_000):
                client.send_binary(b"")
            await client.sentinel()  # every frame before it has been handled
            (session,) = gateway.sessions
            queued = len(session._pre_ready or ())
            await client.wait("ready", 5)
            await client.close()
            return queued

    assert run(scenario(), timeout=20) == 0


# ---- misbehaving clients -----------------------------------------------------------------------

def _small_receive_buffer(_url) -> socket.socket:
    """A client socket with an 8 KiB receive buffer, so a client that stops reading pushes back
    on the gateway after kilobytes, not after the kernel's megabytes of autotuned buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    return sock


async def _stalled_client_with_a_long_reply(gateway, mock, seconds: float):
    """A push-to-talk turn of `seconds` of audio, then the client stops reading its socket and
    asks for the reply: the mock streams the whole echo as fast as the gateway takes it."""
    client = await RawClient.connect(gateway.url, socket_factory=_small_receive_buffer)
    client.send_json({"type": "config", "turn_detection": "none"})
    await client.wait("ready")
    audio = speech_like(seconds, seed=8)
    for offset in range(0, len(audio), 48_000):
        client.send_binary(audio[offset:offset + 48_000])
    client.send_json({"type": "commit"})
    upstream = mock.sessions[-1]
    await upstream.wait_for_server_event("input_audio_buffer.committed", timeout=10)
    client.transport.underlying_transport.pause_reading()
    client.send_json({"type": "create_response"})
    return client, audio, upstream


def _queued_towards_client(session) -> int:
    """Bytes the gateway holds for its client: the session's own queue (SessionStats
    `u2c_buffered_bytes`) plus the socket transport's write buffer."""
    return session.stats.u2c_buffered_bytes + session.client.underlying_transport.get_write_buffer_size()


def _pieces_of_in_order(frames: list[bytes], audio: bytes) -> None:
    """Every frame is an unaltered piece of `audio`, each after the one before: what was dropped
    are gaps between them — nothing reordered, nothing corrupted."""
    end = 0
    for frame in frames:
        index = audio.find(frame, end)
        assert index >= end, f"a {len(frame)}-byte frame is not the echo after byte {end}"
        end = index + len(frame)


QUEUE_MS = 1000
#: the queue bound in bytes, plus what may sit in the transport above it: uvloop's write
#: high-water mark (64 KiB), and the most the audio path writes at once (a read of a fast
#: upstream can hold a megabyte of deltas: the path writes them every CLIENT_BATCH_BYTES) plus
#: the delta that crossed it
QUEUE_BOUND_BYTES = QUEUE_MS * 48 + 64 * 1024 + CLIENT_BATCH_BYTES + 2 * DELTA_BYTES


def test_client_that_never_reads_with_drop_oldest_keeps_memory_bounded_and_counts_drops():
    """120 s of reply audio (5.8 MB) towards a client that stopped reading. With
    --slow-client-policy drop-oldest and --max-client-queue-ms 1000, what the gateway holds for
    that client stays bounded, the oldest audio is dropped, counted and reported to the client
    (a non-fatal SlowClient), and when the client reads again it gets pieces of the echo, in
    order (a subsequence, no byte altered)."""
    fields = need(max_client_queue_ms=QUEUE_MS, slow_client_policy="drop-oldest")

    async def scenario():
        async with relay(**fields) as (gateway, mock):
            tasks = session_tasks()
            client, audio, upstream = await _stalled_client_with_a_long_reply(gateway, mock, 120.0)
            session = next(iter(gateway.sessions))
            peak = 0
            done = asyncio.ensure_future(upstream.wait_for_server_event("response.done", timeout=20))
            while not done.done():   # sample the queue while the reply streams in (bounded by `done`)
                peak = max(peak, _queued_towards_client(session))
                await asyncio.sleep(0.005)
            await done
            peak = max(peak, _queued_towards_client(session))
            assert peak <= QUEUE_BOUND_BYTES, peak
            assert await metric(gateway, "gateway_drops_total", reason="slow_client") > 0
            assert await metric(gateway, "gateway_dropped_bytes_total", reason="slow_client") > 0
            client.transport.underlying_transport.resume_reading()
            await client.wait("response_done", 10)
            assert 0 < client.audio_bytes < len(audio)
            # and it is told, once, in order with what it receives (not only the metrics know)
            notices = [e for e in client.events if e.get("type") == "error"]
            assert [(e["code"], e["fatal"]) for e in notices] == [("SlowClient", False)], notices
            _pieces_of_in_order(client.audio_frames, audio)
            assert not client.disconnected
            await client.close()
            await no_leaks(gateway, mock, tasks)
    run(scenario(), timeout=40)


async def _until_slow_client_is_closed(gateway, session) -> int:
    """Sample what the gateway holds for the stalled client until it ends the session; the peak."""
    peak = 0
    deadline = time.monotonic() + 20
    while gateway.sessions:   # sampling the queue until then, bounded by the deadline
        assert time.monotonic() < deadline, "the slow client was never closed"
        peak = max(peak, _queued_towards_client(session))
        await asyncio.sleep(0.005)
    return peak


def test_client_that_never_reads_with_close_policy_is_closed_with_slow_client():
    """--slow-client-policy close: past the queue bound the session ends (memory bounded until
    then); a client that reads again right away finds the audio it had, intact, then the
    SlowClient error and close code 4004."""
    fields = need(max_client_queue_ms=QUEUE_MS, slow_client_policy="close")
    kind = need_code("SlowClient")

    async def scenario():
        async with relay(**fields) as (gateway, mock):
            tasks = session_tasks()
            client, audio, upstream = await _stalled_client_with_a_long_reply(gateway, mock, 120.0)
            peak = await _until_slow_client_is_closed(gateway, next(iter(gateway.sessions)))
            assert peak <= QUEUE_BOUND_BYTES, peak
            await no_leaks(gateway, mock, tasks)
            client.transport.underlying_transport.resume_reading()
            await client.wait_closed(10)
            assert client.close_code == kind.close_code, (client.close_code, client.close_reason)
            assert kind.close_code == CLOSE_POLICY_VIOLATION or 4000 <= kind.close_code < 5000
            assert [e["code"] for e in client.errors()] == ["SlowClient"] and client.errors()[0]["fatal"]
            assert 0 < client.audio_bytes < len(audio) and client.audio == audio[:client.audio_bytes]
    run(scenario(), timeout=40)


def test_a_client_that_stops_reading_meets_the_policy_before_the_kernel_buffers_seconds():
    """20 s of reply audio (960 KB) towards a client that stopped reading, with a 1 s bound: the
    kernel's send buffer autotunes to megabytes and took it all, so the policy never applied
    (the client was 20 s behind and nothing said so). The sweep now sees a client that
    acknowledges nothing with more than the bound waiting for it: SlowClient, close 4004."""
    fields = need(max_client_queue_ms=QUEUE_MS, slow_client_policy="close")

    async def scenario():
        async with relay(**fields) as (gateway, mock):
            client, audio, upstream = await _stalled_client_with_a_long_reply(gateway, mock, 20.0)
            await _until_slow_client_is_closed(gateway, next(iter(gateway.sessions)))
            client.transport.underlying_transport.resume_reading()
            await client.wait_closed(10)
            assert [e["code"] for e in client.errors()] == ["SlowClient"]
            assert client.audio == audio[:client.audio_bytes]  # what the kernel held, intact
    run(scenario(), timeout=40)


def test_a_client_that_stops_reading_then_reads_again_gets_the_rest_with_drop_oldest():
    """A stall with drop-oldest, the reply streamed in real time: once more than the bound waits
    in the kernel and the client acknowledges nothing, the sweep pauses it; its audio queues and
    the oldest beyond the bound is dropped (one non-fatal SlowClient); when it reads again it
    gets what the kernel held, then the queue: pieces of the echo, in order, nothing altered."""
    fields = need(max_client_queue_ms=QUEUE_MS, slow_client_policy="drop-oldest")

    async def scenario():
        async with relay(MockOptions(pacing="realtime"), **fields) as (gateway, mock):
            client, audio, upstream = await _stalled_client_with_a_long_reply(gateway, mock, 6.0)
            async with asyncio.timeout(10):  # the sweep looks once a second: no event to wait on
                while await metric(gateway, "gateway_drops_total", reason="slow_client") == 0:
                    await asyncio.sleep(0.05)
            client.transport.underlying_transport.resume_reading()
            await client.wait("response_done", 10)
            assert [(e["code"], e["fatal"]) for e in client.errors()] == [("SlowClient", False)]
            assert 0 < client.audio_bytes < len(audio)
            _pieces_of_in_order(client.audio_frames, audio)
            assert not client.disconnected
            await client.close()
    run(scenario(), timeout=40)


def test_a_ping_flood_from_a_client_that_does_not_read_keeps_memory_bounded():
    """picows answered every ping itself, past the session's backpressure: 100,000 pings from a
    client that never reads grew the node by ~13 MB of pongs, without limit. Pings are now
    answered by the gateway while the client reads; while it does not, only the latest one is
    answered, once it reads again (RFC 6455 §5.5.3)."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RawClient.connect(gateway.url, socket_factory=_small_receive_buffer)
            await client.wait("ready")
            session = next(iter(gateway.sessions))
            client.transport.underlying_transport.pause_reading()
            mask = b"\x01\x02\x03\x04"
            def ping(index: int) -> bytes:
                payload = index.to_bytes(4, "big") + b"p" * 121
                return b"\x89\xfd" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            last = 99_999
            first = ping(0)
            flood = first * last + ping(last)   # same-payload pings, then a distinct last one
            client.transport.underlying_transport.write(flood)
            client.send_json({"type": "playback", "played_ms": 0})  # read after every ping
            await wait_for(lambda: session.stats.c2u_json_frames >= 1, 20, "the gateway to read the flood")
            assert _queued_towards_client(session) < 1 << 20
            client.transport.underlying_transport.resume_reading()
            await client.wait_until(lambda: client.pongs and client.pongs[-1][:4] == last.to_bytes(4, "big"), 10,
                                    "the latest ping answered")
            assert len(client.pongs) < 50_000  # what the kernel's buffers took before the pause
            await client.close()
    run(scenario(), timeout=40)


def test_slow_client_that_never_reads_again_is_cut_off():
    """The same, but the client never reads again: a graceful close would wait for ever to flush
    towards it, keeping the socket and its buffer. The gateway lets go of the connection within
    its close grace period (gateway.session.CLOSE_GRACE_S) plus a margin."""
    fields = need(max_client_queue_ms=QUEUE_MS, slow_client_policy="close")
    from gateway.session import CLOSE_GRACE_S

    async def scenario():
        async with relay(**fields) as (gateway, mock):
            tasks = session_tasks()
            client, audio, upstream = await _stalled_client_with_a_long_reply(gateway, mock, 120.0)
            session = next(iter(gateway.sessions))
            gateway_socket = session.client.underlying_transport.get_extra_info("socket")
            await _until_slow_client_is_closed(gateway, session)
            await no_leaks(gateway, mock, tasks)
            await wait_for(lambda: gateway_socket.fileno() == -1, CLOSE_GRACE_S + 2,
                           "the gateway to release the stalled client's socket")
    run(scenario(), timeout=40)


@pytest.mark.parametrize("when", ["before-ready", "idle", "mid-response"])
def test_client_that_vanishes_without_a_close_takes_its_upstream_with_it(when):
    """The client's TCP connection is aborted (no WebSocket close frame): the session, its
    upstream connection and its tasks go away."""
    async def scenario():
        options = MockOptions(handshake_delay_s=0.3 if when == "before-ready" else 0.0,
                              pacing="realtime")
        async with relay(options) as (gateway, mock):
            tasks = session_tasks()
            client = await RawClient.connect(gateway.url)
            if when != "before-ready":
                client.send_json({"type": "config", "turn_detection": "none"})
                await client.wait("ready")
            if when == "mid-response":
                client.send_binary(speech_like(3.0, seed=9))
                client.send_json({"type": "commit"})
                client.send_json({"type": "create_response"})
                await client.wait_until(lambda: client.audio_bytes > 0, 5, "reply audio")
            client.transport.underlying_transport.abort()
            await no_leaks(gateway, mock, tasks)
            if when == "mid-response":
                assert mock.sessions[-1].closed
    run(scenario(), timeout=20)


# ---- time limits (issue 6 flags) -----------------------------------------------------------------

def test_no_idle_time_runs_while_the_upstream_is_still_opening():
    """The idle timeout is the client's silence. A client waiting for `ready` while the upstream
    takes longer than the idle timeout to open is waiting on the gateway: it gets `ready`, not
    IdleTimeout (and would get ConnectionFailed at the connect timeout)."""
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=1.0), idle_timeout_s=0.3) as (gateway, mock):
            client = await RawClient.connect(gateway.url)
            await client.wait("ready", 5)
            assert client.errors() == []
            await client.close()
    run(scenario(), timeout=20)


def test_a_session_whose_upstream_stops_reading_still_idles_out():
    """An upstream that keeps TCP open but stops reading (a hung server) pauses the client's
    reads; the idle clock must go on, or the session would hold its slot until its maximum
    duration with the client told nothing."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        upstream._ws.transport.pause_reading()  # hung: reads nothing more, ever

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(NodeConfig(
                host="127.0.0.1", port=0, upstream="openai", api_key=TEST_KEY, upstream_url=url,
                idle_timeout_s=1.0)) as gateway:
            client = await RawClient.connect(gateway.url)
            await client.wait("ready")
            session = next(iter(gateway.sessions))
            frame = bytes(32 * 1024)
            for _ in range(400):  # 13 MB: more than the kernel buffers between us and the upstream
                client.send_binary(frame)
            await wait_for(lambda: session._client_reading_paused, 15, "the gateway to stop reading the client")
            error = await client.wait("error", 10, code="IdleTimeout")
            assert error["fatal"] is True
            await client.wait_closed(5)
    run(scenario(), timeout=40)


def test_idle_session_gets_idle_timeout_then_close():
    fields = need(idle_timeout_s=0.5)
    kind = need_code("IdleTimeout")

    async def scenario():
        async with relay(**fields) as (gateway, mock):
            tasks = session_tasks()
            client = await ready_client(gateway.url)
            started = time.monotonic()
            error = await client.wait("error", 5, code="IdleTimeout")
            elapsed = time.monotonic() - started
            assert 0.4 < elapsed < 1.5, elapsed            # time is what is under test here
            assert error["fatal"] is True
            await client.wait_closed(5)
            assert client.close_code == kind.close_code
            await no_leaks(gateway, mock, tasks)
    run(scenario(), timeout=20)


def test_idle_timeout_counts_client_traffic():
    """Audio from the client every 200 ms for 1.5 s keeps a session with a 0.5 s idle timeout
    open (GA sends nothing back for appends: only the client's direction is active)."""
    fields = need(idle_timeout_s=0.5)
    need_code("IdleTimeout")

    async def scenario():
        async with relay(**fields) as (gateway, mock):
            client = await ready_client(gateway.url)
            audio = speech_like(1.6, seed=10)
            for offset in range(0, len(audio), 9600):    # pacing is the thing under test
                client.send_binary(audio[offset:offset + 9600])
                await asyncio.sleep(0.2)
            assert client.errors() == [] and not client.disconnected
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            assert (await client.wait("response_done"))["status"] == "completed"
            assert client.audio == audio
            await client.wait("error", 5, code="IdleTimeout")   # and then idle does end it
            await client.wait_closed(5)
    run(scenario(), timeout=20)


def test_idle_timeout_counts_upstream_traffic():
    """A 2 s reply paced in real time, with a silent client, outlasts a 0.5 s idle timeout."""
    fields = need(idle_timeout_s=0.5)
    need_code("IdleTimeout")

    async def scenario():
        async with relay(MockOptions(pacing="realtime"), **fields) as (gateway, mock):
            client = await ready_client(gateway.url)
            audio = speech_like(2.0, seed=11)
            client.send_binary(audio)
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            done = await client.wait("response_done", 6)
            assert done["status"] == "completed" and client.audio == audio
            assert client.errors() == []
            await client.wait("error", 5, code="IdleTimeout")
            await client.wait_closed(5)
    run(scenario(), timeout=20)


def test_max_session_duration_warns_with_closing_then_ends_the_session():
    fields = need(max_session_s=1.2, session_warning_s=0.8)

    async def scenario():
        async with relay(**fields) as (gateway, mock):
            tasks = session_tasks()
            started = time.monotonic()
            client = await ready_client(gateway.url)
            closing = await client.wait("closing", 3)
            warned_at = time.monotonic() - started
            assert 0.2 < warned_at < 0.8, warned_at
            assert isinstance(closing["reason"], str) and closing["reason"]
            assert 0.5 <= closing["seconds_left"] <= 0.8, closing
            await echo_turn(client, speech_like(0.2, seed=12))   # still usable after the warning
            await client.wait_closed(3)
            ended_at = time.monotonic() - started
            assert 1.0 < ended_at < 2.0, ended_at
            # the end is the node's maximum duration: SessionExpired (fatal), its close code
            assert [(e["code"], e["fatal"]) for e in client.errors()] == [("SessionExpired", True)]
            assert "upstream" not in client.errors()[0]          # the node's limit, not OpenAI's
            assert client.close_code == CLOSE_SESSION_EXPIRED, client.close_code
            await no_leaks(gateway, mock, tasks)
    run(scenario(), timeout=20)


def test_fault_storm_leaves_nothing_behind():
    """Many sessions, each ending a different bad way, at once: nothing stays open."""
    async def scenario():
        async with relay(MockOptions(pacing="realtime")) as (gateway, mock):
            tasks = session_tasks()

            async def vanish(index: int) -> None:
                client = await ready_client(gateway.url)
                client.send_binary(speech_like(0.5, seed=index))
                client.send_json({"type": "commit"})
                client.send_json({"type": "create_response"})
                await client.wait("response_started")
                client.transport.underlying_transport.abort()

            async def too_big(index: int) -> None:
                client = await ready_client(gateway.url)
                client.send_binary(bytes(gateway.config.max_message_bytes + 1))
                await client.wait_closed(10)
                assert client.close_code == 1009

            async def polite(index: int) -> None:
                client = await ready_client(gateway.url)
                await client.close()

            await asyncio.gather(*(action(i) for i in range(10) for action in (vanish, too_big, polite)))
            await no_leaks(gateway, mock, tasks, timeout=10)
    run(scenario(), timeout=40)


def test_an_upstream_that_stops_reading_backpressures_the_client_and_loses_nothing():
    """Max buffered audio towards the upstream: when the upstream stops reading, the gateway stops
    reading the client (TCP backpressure) instead of buffering its audio without bound; when the
    upstream reads again, every byte arrives, in order."""
    import socket

    async def scenario():
        async with relay() as (gateway, mock):
            client = await ready_client(gateway.url)
            session = next(iter(gateway.sessions))
            upstream_session = mock.sessions[0]
            upstream_transport = session.upstream.transport.underlying_transport
            # small kernel buffers on both ends, so the stall reaches the gateway's own buffer
            upstream_transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
            upstream_session.transport.underlying_transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            upstream_session.transport.underlying_transport.pause_reading()   # the upstream stalls
            audio = speech_like(30.0, seed=21)                              # 1.44 MB: far past any buffer
            for offset in range(0, len(audio), 4800):
                client.send_binary(audio[offset:offset + 4800])
            peak = 0
            await wait_for(lambda: session._client_reading_paused, 10, "the gateway to stop reading the client")
            for _ in range(50):   # the client keeps pushing; the gateway's buffer must stay put
                peak = max(peak, upstream_transport.get_write_buffer_size())
                await asyncio.sleep(0.01)
            assert peak <= 256 * 1024, peak   # uvloop's high-water mark plus the frames in flight
            upstream_session.transport.underlying_transport.resume_reading()  # the upstream recovers
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            assert (await client.wait("response_done", 30))["status"] == "completed"
            assert client.audio == audio                                      # every byte, in order
            await client.close()
    run(scenario(), timeout=60)


def test_upstream_events_with_wrongly_typed_fields_lose_the_event_not_the_session():
    """The reference asks clients to read events leniently (§10.17; WaaV B9). An audit had the
    gateway raise on `session.updated` with a string `session`, or an `error` whose `error` is a
    string or whose `event_id` is a number: picows dropped the upstream with 1011 and the client
    was told the upstream had gone. Now a wrongly typed field counts as absent (an item id
    that is a list: no item id), and the session goes on."""
    malformed = [
        {"type": "session.updated", "session": "x"},
        {"type": "error", "error": "oops"},
        {"type": "error", "error": {"code": 3, "message": "numbered", "event_id": 3, "param": ["p"]}},
        {"type": "response.created", "response": "r"},
        {"type": "response.output_item.added", "response_id": "resp_1", "item": ["not", "an", "object"]},
        {"type": "response.done", "response": {"id": "resp_1", "status": "failed", "status_details": "bad"}},
        {"type": "response.output_audio_transcript.delta", "item_id": ["item_1"], "delta": "an item id to drop"},
    ]

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        for event in malformed:
            await upstream.send(event)
        item = await upstream.receive("conversation.item.create")  # the session still relays
        await upstream.send({"type": "error", "error": {"message": f"got {item['item']['content'][0]['text']}"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(NodeConfig(
                host="127.0.0.1", port=0, upstream="openai", api_key=TEST_KEY, upstream_url=url)) as gateway:
            client = await RawClient.connect(gateway.url)
            await client.wait("ready")
            await client.wait("error", 5, message="oops")
            await client.wait("error", 5, message="numbered")
            client.send_json({"type": "text", "text": "still here", "respond": False})
            await client.wait("error", 5, message="got still here")
            errors = [event for event in client.events if event.get("type") == "error"]
            assert client.close_code is None and not client.disconnected
            await client.close()
            return errors, [event for event in client.events if event.get("type") == "response_done"], \
                [event for event in client.events if event.get("type") == "transcript"]

    errors, done, transcripts = run(scenario(), timeout=20)
    assert [(t["text"], t["item_id"]) for t in transcripts] == [("an item id to drop", None)]
    assert [(error["code"], error["fatal"], error["message"]) for error in errors] == [
        ("UpstreamError", False, "oops"),
        ("UpstreamError", False, "numbered"),
        ("UpstreamError", False, "upstream error"),  # the failed response, its reason unreadable
        ("UpstreamError", False, "got still here"),
    ], errors
    assert done == [{"type": "response_done", "response_id": "resp_1", "status": "failed", "usage": None}]


def test_upstream_values_of_the_wrong_type_reach_the_client_as_absent_not_as_they_came():
    """Found by an upstream audit: ids, statuses and positions the client protocol types as
    strings and whole milliseconds went out as the upstream sent them (an object for a
    response_id, a number for an item_id, -5 ms), and 1e300 ms lost the whole event."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        for event in (
            {"type": "input_audio_buffer.speech_started", "audio_start_ms": -5, "item_id": {"x": 1}},
            {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1e300, "item_id": 7},
            {"type": "response.created", "response": {"id": {"x": 1}, "status": "in_progress"}},
            {"type": "response.output_audio_transcript.delta", "item_id": 3, "response_id": [1], "delta": "hi"},
            {"type": "response.done", "response": {"id": 12345, "status": ["completed"], "usage": "lots"}},
        ):
            await upstream.send(event)
        await upstream.send({"type": "error", "error": {"message": "end"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_scripted_node(url)) as gateway:
            client = await RawClient.connect(gateway.url)
            await client.wait("ready")
            await client.wait("error", 5, message="end")
            await client.close()
            return [{k: v for k, v in event.items() if k not in ("_audio_before",)} for event in client.events
                    if event.get("type") not in ("ready", "error")]

    assert run(scenario(), timeout=20) == [
        {"type": "speech_started", "audio_ms": 0, "item_id": None},
        {"type": "speech_stopped", "audio_ms": 0, "item_id": None},
        {"type": "response_started", "response_id": None},
        {"type": "transcript", "role": "assistant", "text": "hi", "is_final": False, "item_id": None},
        {"type": "response_done", "response_id": None, "status": None, "usage": None},
    ]


def _scripted_node(url: str, connect_timeout_s: float = 3.0) -> NodeConfig:
    return NodeConfig(host="127.0.0.1", port=0, upstream="openai", api_key=TEST_KEY, upstream_url=url,
                      connect_timeout_s=connect_timeout_s)


def _reshaped(session: dict, path: tuple[str, ...], value: Any) -> dict:
    """SESSION with the field at `path` replaced by `value`."""
    session = orjson.loads(orjson.dumps(session))
    parent = session
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return session


@pytest.mark.parametrize("event, path, value", [
    ("session.created", ("audio",), "pcm"),
    ("session.updated", ("audio",), "pcm"),
    ("session.updated", ("audio", "output"), "x"),
    ("session.updated", ("audio", "input"), ["x"]),
    ("session.updated", ("audio", "input", "transcription"), 7),
], ids=["created_audio_string", "updated_audio_string", "updated_output_string", "updated_input_list",
        "updated_transcription_number"])
def test_a_session_object_with_a_wrongly_typed_part_still_reaches_ready(event, path, value):
    """Found by an upstream audit: the nested parts of `session` were read as `x or {}`, which
    keeps a string or a list; reading it raised after the update's answer was taken, so `ready`
    never came and the client got 'did not answer the session configuration' two seconds later
    (for session.created, the configuration was never even sent)."""
    async def script(upstream: ScriptedUpstream) -> None:
        update = await upstream.receive("session.update")
        await upstream.send({"type": "session.updated", "session": _reshaped(SESSION, path, value)
                             if event == "session.updated" else SESSION})
        assert update["session"]["instructions"] == "Be brief."

    async def scenario():
        created = _reshaped(SESSION, path, value) if event == "session.created" else None
        async with ScriptedUpstream(script, created=created) as url, GatewayServer(_scripted_node(url)) as gateway:
            client = await RawClient.connect(gateway.url)
            client.send_json({"type": "config", "instructions": "Be brief."})
            ready = await client.wait("ready", 5)
            fatal = [e for e in client.events if e.get("type") == "error" and e["fatal"]]
            await client.close()
            return ready, fatal

    ready, fatal = run(scenario(), timeout=20)
    assert fatal == [] and ready["model"] == "gpt-realtime"


@pytest.mark.parametrize("done", [
    {"type": "response.done", "response": {"status": "completed", "output": []}},
    {"type": "response.done", "response": None},
    {"type": "response.done", "response": {"id": 1, "status": "completed"}},
], ids=["id_missing", "response_null", "id_number"])
def test_a_reply_whose_end_names_no_readable_id_still_ends(done):
    """Found by an upstream audit: the conversation's reply ended only on a response.done
    naming it, so one without a readable id left the gateway waiting for it for good: every
    later reply it should ask for (after a text, a function result) was held, silently."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("response.create")
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress",
                                                                       "conversation_id": "conv_1"}})
        await upstream.send(done)
        await upstream.receive("response.create")  # the second text's reply is asked for
        await upstream.send({"type": "error", "error": {"message": "asked again"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_scripted_node(url)) as gateway:
            client = await RawClient.connect(gateway.url)
            await client.wait("ready")
            client.send_json({"type": "text", "text": "first"})
            await client.wait("response_done", 5)
            client.send_json({"type": "text", "text": "second"})
            await client.wait("error", 5, message="asked again")
            await client.close()

    run(scenario(), timeout=20)


def test_a_server_error_before_ready_is_no_refusal_of_the_configuration():
    """Found by an upstream audit: before `ready` any error with a null event_id was taken for
    the refusal of the gateway's update: a server_error became 'upstream rejected the
    configuration' and `ready` listed the whole session as ignored, though the upstream then
    applied it."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.send({"type": "error", "error": {"type": "server_error", "code": "server_error",
                                                        "message": "The server had an error.", "event_id": None}})
        await upstream.updated()

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_scripted_node(url)) as gateway:
            client = await RawClient.connect(gateway.url)
            ready = await client.wait("ready", 5)
            error = await client.wait("error", 5)
            await client.close()
            return ready, error

    ready, error = run(scenario(), timeout=20)
    assert ready["ignored"] == []
    assert (error["code"], error["message"]) == ("UpstreamError", "The server had an error.")


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_the_gateway_relays_in_the_output_format_the_upstream_confirms(dialect):
    """Found by an upstream audit: asked for PCM16, an upstream that confirmed G.711 had `ready`
    say g711_ulaw while the gateway still cut and metered replies as PCM16 (48 bytes a ms, not
    8); a beta upstream's format names were taken as they came (`5`, 'pcm24'), and one of them
    could break the session's handling of updates."""
    async def script(upstream: ScriptedUpstream) -> None:
        update = await upstream.receive("session.update")
        if dialect == "ga":
            session = _reshaped(SESSION, ("audio", "output", "format"), {"type": "audio/pcmu"})
        else:
            session = {**update["session"], "output_audio_format": "g711_ulaw", "input_audio_format": "pcm24"}
        await upstream.send({"type": "session.updated", "session": session})

    async def scenario():
        created = SESSION if dialect == "ga" else render_session(default_config("gpt-realtime", "sess_b", 1999999999),
                                                                 "beta")
        async with ScriptedUpstream(script, created=created) as url, GatewayServer(NodeConfig(
                host="127.0.0.1", port=0, upstream="openai", api_key=TEST_KEY, upstream_url=url,
                connect_timeout_s=3.0, upstream_dialect=dialect)) as gateway:
            client = await RawClient.connect(gateway.url)
            ready = await client.wait("ready", 5)
            (session,) = gateway.sessions
            relayed = session.output_bytes_per_ms
            await client.close()
            return ready, relayed

    ready, relayed = run(scenario(), timeout=20)
    assert ready["output_audio_format"] == "g711_ulaw" and relayed == 8
    if dialect == "beta":
        assert ready["input_audio_format"] is None  # a name it does not know is no format


def test_a_ping_flood_from_an_upstream_that_does_not_read_keeps_memory_bounded():
    """The upstream leg had picows' auto-pong: an audit's upstream that stopped reading and sent
    1.2 million pings grew the node to 454 MB of queued pongs, held until the idle timeout. Pings
    are now answered as on the client leg: while the upstream does not read, only the latest one,
    once it reads again."""
    count = 100_000
    def ping(index: int) -> bytes:  # server to client: unmasked
        return b"\x89\x7d" + index.to_bytes(4, "big") + b"p" * 121

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        upstream._ws.transport.pause_reading()
        upstream._ws.transport.write(ping(0) * (count - 1) + ping(count - 1))
        await upstream.send({"type": "error", "error": {"message": "after the flood"}})

    async def scenario():
        upstream = ScriptedUpstream(script)
        async with upstream as url, GatewayServer(NodeConfig(
                host="127.0.0.1", port=0, upstream="openai", api_key=TEST_KEY, upstream_url=url)) as gateway:
            client = await RawClient.connect(gateway.url)
            await client.wait("ready")
            await client.wait("error", 20, message="after the flood")
            session = next(iter(gateway.sessions))
            listener = session.upstream.listener
            assert listener.transport.underlying_transport.get_write_buffer_size() < 1 << 20
            assert listener._pong is not None and listener._pong[:4] == (count - 1).to_bytes(4, "big")
            upstream._ws.transport.resume_reading()
            await wait_for(lambda: listener._pong is None, 20, "the held pong to go out")
            await client.close()  # read again: the client was not while the upstream did not read
    run(scenario(), timeout=40)


def test_the_nodes_own_key_is_redacted_whatever_its_shape():
    """Redaction went by pattern (`sk-…`, "Bearer …", "api key provided: …"): an Azure key, 32
    hex digits, quoted by an upstream in other words would have reached the client."""
    key = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.send({"type": "error", "error": {
            "code": "access_denied", "message": f"Access denied: subscription key {key} has no quota",
            "param": key, "event_id": None}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(NodeConfig(
                host="127.0.0.1", port=0, upstream="openai", api_key=key, upstream_url=url)) as gateway:
            client = await RawClient.connect(gateway.url)
            await client.wait("ready")
            error = await client.wait("error", 5)
            await client.close()
            return error

    error = run(scenario(), timeout=20)
    assert error["message"] == "Access denied: subscription key [redacted] has no quota", error
    assert error["upstream"]["param"] == "[redacted]" and key not in orjson.dumps(error).decode()


def test_a_client_sending_far_faster_than_the_upstream_takes_is_read_in_bounded_pieces():
    """picows doubled its read buffer whenever a read filled it and relayed a whole read before
    a pause could take effect: an audit's client streaming at ~2,000x real time grew one
    session by ~75 MB (41 MB of appends queued upstream, against a 64 KiB high-water mark).
    Each read now hands picows at most read_buffers.MAX_READ_BYTES, so what waits upstream
    stays near one read's worth. The peak is taken after every loop iteration, where each read
    is relayed whole."""
    from gateway.read_buffers import MAX_READ_BYTES
    frame = b"\x82\xfe" + (960).to_bytes(2, "big") + bytes(4) + speech_like(0.02, seed=5)  # mask key 0
    burst = frame * 20_000  # 19.2 MB of audio, written at once

    async def scenario():
        async with relay() as (gateway, mock):
            client = await ready_client(gateway.url)
            session = next(iter(gateway.sessions))
            upstream = session.upstream.listener.transport.underlying_transport
            loop = asyncio.get_running_loop()
            peak = 0

            def sample() -> None:
                nonlocal peak
                peak = max(peak, upstream.get_write_buffer_size())
                if not upstream.is_closing():
                    loop.call_soon(sample)
            sample()
            client.transport.underlying_transport.write(burst)
            await wait_for(lambda: session.stats.c2u_audio_bytes == 20_000 * 960, 60, "every frame relayed")
            await client.close()
            return peak

    peak = run(scenario(), timeout=90)
    assert peak < 4 * MAX_READ_BYTES, peak
