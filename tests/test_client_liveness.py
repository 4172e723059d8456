"""A client that vanishes without closing — a phone that left the Wi-Fi, a laptop that went to
sleep — sends no FIN and no RST, and while nobody sends, TCP sees nothing wrong. Its session
would hold its key's session slot (and an upstream session) until the idle timeout, and the same
user reconnecting over another network would be refused by its own ghost. WaaV never pings its
clients (reference/waav-anchor.md B15); the gateway pings a client that has sent nothing for
--client-ping-interval-s and ends its session when nothing, not even the pong, comes back within
--client-ping-timeout-s (ClientUnresponsive, close 4005).

The settings are shortened here (0.2 s and 0.3 s instead of 20 s and 20 s). The case of a real
network that stops delivering packets runs in a network namespace (tests/black_hole.py)."""
from __future__ import annotations

import asyncio
import json

import orjson

from gateway.errors import CLOSE_CLIENT_UNRESPONSIVE
from gateway.mock import MockOptions
from tests.raw_client import RawClient, echo_turn, ready_client
from tests.relay_harness import relay, speech_like
from tests.support import run
from tests.black_hole import black_hole, prepare_namespace, run_in_namespace
from tests.test_direct_reads import masked_frame
from tests.test_faults import _stalled_client_with_a_long_reply, metric, no_leaks, session_tasks, wait_for
from tests.test_read_buffers import forwarded_text, item_create

PINGS = {"client_ping_interval_s": 0.2, "client_ping_timeout_s": 0.3}


def test_a_silent_client_that_answers_pings_keeps_its_session():
    """Pings go out every interval while the client says nothing; each pong counts as a sign of
    life, so the session outlasts many ping timeouts and still carries a turn."""
    async def scenario():
        async with relay(**PINGS) as (gateway, mock):
            client = await ready_client(gateway.url)
            session = next(iter(gateway.sessions))
            await client.wait_until(lambda: len(client.pings) >= 4, 5, "four pings")
            assert session.stats.c2u_other_frames >= 3  # the pongs reached the gateway
            assert client.errors() == [] and not client.disconnected
            await echo_turn(client, speech_like(0.3, seed=21))
            await client.close()
    run(scenario(), timeout=20)


def test_a_client_that_answers_no_ping_is_ended_and_its_slot_freed():
    """One ping, no pong: after the ping timeout the session ends with a fatal
    ClientUnresponsive and close 4005, counted under its own outcome, with nothing left behind;
    the client's key (limit 1) can open a new session at once."""
    async def scenario():
        async with relay(**PINGS, max_sessions=1) as (gateway, mock):
            tasks = session_tasks()
            ghost = await RawClient.connect(gateway.url)
            ghost.answer_pings = False
            await ghost.wait("ready")
            loop = asyncio.get_running_loop()
            await ghost.wait_until(lambda: ghost.pings, 5, "the ping")
            pinged_at = loop.time()
            error = await ghost.wait("error", 5, code="ClientUnresponsive")
            waited = loop.time() - pinged_at
            assert 0.25 <= waited < 1.5, waited  # the timeout is what is under test (0.3 s)
            assert error["fatal"] is True and "answered no ping for 0.3 s" in error["message"]
            await ghost.wait_closed(5)
            assert ghost.close_code == CLOSE_CLIENT_UNRESPONSIVE == 4005
            assert len(ghost.pings) == 1  # a ping is not repeated while it waits for its pong
            await no_leaks(gateway, mock, tasks)
            assert await metric(gateway, "gateway_sessions_total", outcome="client_unresponsive") == 1
            assert await metric(gateway, "gateway_errors_total", code="ClientUnresponsive") == 1
            assert gateway.limiter.active == 0
            client = await ready_client(gateway.url)
            await echo_turn(client, speech_like(0.2, seed=22))
            await client.close()
    run(scenario(), timeout=20)


def test_a_client_that_streams_audio_is_never_pinged():
    """Audio every 20 ms is a sign of life: no ping in 1 s of real-time streaming (five ping
    intervals), so a talking client costs the gateway nothing for liveness."""
    async def scenario():
        async with relay(**PINGS) as (gateway, mock):
            client = await ready_client(gateway.url)
            audio = speech_like(1.0, seed=23)
            for offset in range(0, len(audio), 960):  # real-time pacing is the thing under test
                client.send_binary(audio[offset:offset + 960])
                await asyncio.sleep(0.02)
            client.send_json({"type": "commit"})
            client.send_json({"type": "create_response"})
            assert (await client.wait("response_done"))["status"] == "completed"
            assert client.audio == audio
            assert client.pings == []
            await client.close()
    run(scenario(), timeout=20)


def test_a_big_message_arriving_slowly_is_a_sign_of_life():
    """A 192 KiB message dribbles in over ~1.4 s, nearly three ping intervals plus timeouts,
    from a client that answers no ping (on a real slow link its pong would queue behind the
    message anyway). Pieces of a frame count as life: the session lives and the message arrives
    whole upstream. Once nothing more comes, the unanswered ping ends the session."""
    async def scenario():
        async with relay(MockOptions(record=True), **PINGS) as (gateway, mock):
            client = await ready_client(gateway.url)
            client.answer_pings = False
            text = "slow link " * (192 * 1024 // 10)
            frame = masked_frame(0x81, orjson.dumps(item_create(text)))
            piece = -(-len(frame) // 48)
            for offset in range(0, len(frame), piece):  # the link's pace is the thing under test
                client.transport.underlying_transport.write(frame[offset:offset + piece])
                await asyncio.sleep(0.03)
            upstream = mock.sessions[-1]
            assert forwarded_text(await upstream.wait_for_client_event("conversation.item.create", 5)) == text
            assert client.errors() == []
            error = await client.wait("error", 5, code="ClientUnresponsive")
            assert error["fatal"] is True
    run(scenario(), timeout=20)


def test_a_client_that_does_not_read_is_left_to_the_slow_client_policy():
    """A client that stopped reading cannot see a ping, let alone answer it; with
    --slow-client-policy drop-oldest the operator chose to keep it. Over ten ping timeouts of
    not reading it is not ended as unresponsive, and when it reads again it goes on."""
    async def scenario():
        async with relay(**PINGS, max_client_queue_ms=1000, slow_client_policy="drop-oldest") as (gateway, mock):
            client, audio, upstream = await _stalled_client_with_a_long_reply(gateway, mock, 60.0)
            session = next(iter(gateway.sessions))
            await upstream.wait_for_server_event("response.done", timeout=20)
            loop = asyncio.get_running_loop()
            stalled_until = loop.time() + 3.0  # the stall's length is the thing under test
            await wait_for(lambda: loop.time() >= stalled_until, 5, "three seconds of stall")
            assert session in gateway.sessions and session.client_paused
            client.transport.underlying_transport.resume_reading()
            await client.wait("response_done", 10)
            assert {e["code"] for e in client.errors()} <= {"SlowClient"}  # and no ClientUnresponsive
            await echo_turn(client, speech_like(0.2, seed=24))
            await client.close()
    run(scenario(), timeout=40)


# ---- a client whose network stops delivering packets -------------------------------------------

async def _vanishing_scenario() -> dict:
    async with relay(MockOptions(), **PINGS, max_sessions=1) as (gateway, mock):
        ghost = await ready_client(gateway.url)
        await echo_turn(ghost, speech_like(0.2, seed=25))
        black_hole(ghost.transport.underlying_transport.get_extra_info("sockname")[1])
        loop = asyncio.get_running_loop()
        started = loop.time()
        await gateway.wait_empty(10)
        ended = loop.time() - started
        await wait_for(lambda: gateway.limiter.active == 0, 5, "the ghost's slot to be released")
        released = loop.time() - started
        client = await ready_client(gateway.url)  # the user, back on another network
        await echo_turn(client, speech_like(0.2, seed=26))
        await client.close()
        return {"ended": ended, "released": released,
                "outcome": await metric(gateway, "gateway_sessions_total", outcome="client_unresponsive")}


async def _vanishing_listener_scenario() -> dict:
    """--slow-client-policy drop-oldest keeps a client that stops reading; this one vanishes
    while a 20 s reply streams to it (the mock sends it faster than real time)."""
    async with relay(MockOptions(), **PINGS, slow_client_policy="drop-oldest",
                     max_client_queue_ms=1000) as (gateway, mock):
        ghost = await ready_client(gateway.url)
        session = next(iter(gateway.sessions))
        audio = speech_like(20.0, seed=27)
        for offset in range(0, len(audio), 48_000):
            ghost.send_binary(audio[offset:offset + 48_000])
        ghost.send_json({"type": "commit"})
        await mock.sessions[-1].wait_for_server_event("input_audio_buffer.committed", timeout=10)
        ghost.send_json({"type": "create_response"})
        await ghost.wait_until(lambda: ghost.audio_bytes >= 48_000, 5, "the reply to reach the client")
        black_hole(ghost.transport.underlying_transport.get_extra_info("sockname")[1])
        loop = asyncio.get_running_loop()
        started = loop.time()
        await wait_for(lambda: session.outbox.paused or session not in gateway.sessions, 5,
                       "the client to be seen not reading")
        paused = session.outbox.paused
        await gateway.wait_empty(10)
        ended = loop.time() - started
        await wait_for(lambda: gateway.limiter.active == 0, 5, "the ghost's slot to be released")
        return {"ended": ended, "paused": paused,
                "outcome": await metric(gateway, "gateway_sessions_total", outcome="client_unresponsive")}


def _listener_in_namespace() -> None:
    import uvloop
    prepare_namespace()
    print(json.dumps(uvloop.run(asyncio.wait_for(_vanishing_listener_scenario(), 30))))


def test_a_client_that_vanishes_while_not_reading_is_ended_by_its_silent_tcp():
    """A client that is not reading cannot answer pings, so pings do not judge it; its TCP stack
    does, while it lives (the slow-client test above: a live non-reader is kept). This one's
    network goes silent mid-reply: the gateway's retransmissions go unanswered, and the session
    ends within the ping timeout of the last acknowledgement, not at the idle timeout."""
    result = run_in_namespace("tests.test_client_liveness", "_listener_in_namespace()")
    assert result["paused"] is True, result  # the path under test: a client not reading
    assert result["outcome"] == 1
    assert result["ended"] < 5, result


def _in_namespace() -> None:
    import uvloop
    prepare_namespace()
    print(json.dumps(uvloop.run(asyncio.wait_for(_vanishing_scenario(), 30))))


def test_a_client_whose_network_goes_silent_is_ended_and_its_slot_freed():
    """The client's packets stop (8 bit/s on its port): no pong comes, the session ends within
    the ping interval and timeout (plus a sweep), and the slot is released although the client
    never acknowledges the close — the node's one session (max_sessions 1) is free for the same
    user coming back."""
    result = run_in_namespace("tests.test_client_liveness", "_in_namespace()")
    assert result["outcome"] == 1
    assert 0.45 <= result["ended"] < 3, result  # 0.2 s silent + 0.3 s unanswered, a sweep late at most
    assert result["released"] < 3, result
