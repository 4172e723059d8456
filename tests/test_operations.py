"""Operating a node (SPEC §6, issue 6): client auth, origin allow-list, session limits, /ready,
/metrics, SIGTERM drain and multi-worker — over real sockets against a real gateway and mock."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import glob
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import jwt
import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from prometheus_client.parser import text_string_to_metric_families

from gateway.mock import MockOptions
from gateway.node import METRICS_DIR_PREFIX, remove_orphaned_metrics_dirs
from tests.relay_harness import RelayClient, gateway_process, relay, speech_like
from tests.support import run

CLIENT_KEY = "client-key-for-tests-1"
OTHER_KEY = "client-key-for-tests-2"
JWT_SECRET = "a-test-secret-that-is-long-enough-for-hs256!"


def _http(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return await asyncio.to_thread(_http, url, headers)


async def refused_status(url: str, **connect_kwargs) -> int:
    """The HTTP status of an upgrade the gateway refuses (fails the test if it is accepted)."""
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url, open_timeout=5, **connect_kwargs)
    return refused.value.response.status_code


async def push_to_talk_turn(client: RelayClient, pcm: bytes) -> None:
    """A manual turn whose reply (the mock's echo) must equal `pcm`."""
    before = len(client.audio)
    for offset in range(0, len(pcm), 960):
        await client.send_audio(pcm[offset:offset + 960])
    await client.send({"type": "commit"})
    await client.send({"type": "create_response"})
    done = await client.wait("response_done", timeout=10)
    assert done["status"] == "completed"
    assert bytes(client.audio[before:]) == pcm


def metric_samples(text: bytes) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# ---- auth ------------------------------------------------------------------------------------------


def test_auth_refuses_anonymous_upgrades_with_401_before_any_upstream_is_opened(caplog):
    async def scenario():
        async with relay(client_api_keys=CLIENT_KEY) as (gateway, mock):
            assert await refused_status(gateway.url) == 401
            assert await refused_status(gateway.url, additional_headers={
                "Authorization": "Bearer wrong-key"}) == 401
            assert mock.sessions == [] and not gateway.sessions
    with caplog.at_level(logging.INFO, logger="gateway.server"):
        run(scenario(), timeout=20)
    # each refusal is logged, with what was wrong: never the credential it carried
    assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] == [
        "upgrade refused: auth (missing credentials)", "upgrade refused: auth (invalid credentials)"]
    assert "wrong-key" not in caplog.text and CLIENT_KEY not in caplog.text


def test_auth_accepts_bearer_query_token_subprotocol_and_jwt():
    async def scenario():
        token = jwt.encode({"sub": "tenant-7", "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")
        async with relay(client_api_keys=CLIENT_KEY, jwt_secret=JWT_SECRET) as (gateway, mock):
            clients = [
                RelayClient(await websockets.connect(
                    gateway.url, additional_headers={"Authorization": f"Bearer {CLIENT_KEY}"})),
                RelayClient(await websockets.connect(f"{gateway.url}?token={CLIENT_KEY}")),
                RelayClient(await websockets.connect(
                    gateway.url, subprotocols=["realtime-gateway", f"realtime-gateway.bearer.{CLIENT_KEY}"])),
                RelayClient(await websockets.connect(
                    gateway.url, additional_headers={"Authorization": f"Bearer {token}"})),
            ]
            assert clients[2].ws.subprotocol == "realtime-gateway"  # the token is never echoed
            for client in clients:
                ready = await client.wait("ready", timeout=5)
                assert CLIENT_KEY not in orjson.dumps(ready).decode()
            # beyond the default 30 s of clock-skew leeway (--jwt-leeway-s)
            expired = jwt.encode({"sub": "tenant-7", "exp": int(time.time()) - 120}, JWT_SECRET, algorithm="HS256")
            assert await refused_status(gateway.url, additional_headers={"Authorization": f"Bearer {expired}"}) == 401
            for client in clients:
                await client.close()
    run(scenario(), timeout=30)


def test_a_node_allows_jwt_clock_skew_by_default():
    """Found by an auth audit: the node had no leeway setting, so a token minted by an issuer
    whose clock is a second ahead (iat/nbf in the node's future) was refused. The node now allows
    --jwt-leeway-s (default 30 s) either way, and still refuses a token minted two minutes ahead."""
    async def scenario(port: int):
        url = f"ws://127.0.0.1:{port}/realtime"
        now = int(time.time())

        def token(ahead_s: int) -> dict[str, str]:
            claims = {"sub": "tenant-7", "iat": now + ahead_s, "nbf": now + ahead_s, "exp": now + 300}
            return {"Authorization": f"Bearer {jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"}

        # +2 on a whole-second clock: 1-2 s ahead of the node when it checks, never behind it
        skewed = RelayClient(await websockets.connect(url, additional_headers=token(2), compression=None))
        await skewed.wait("ready", timeout=10)
        assert await refused_status(url, additional_headers=token(120)) == 401
        await skewed.close()
    with gateway_process(env={"GATEWAY_JWT_SECRET": JWT_SECRET}) as (process, port):
        run(scenario(port), timeout=30)


def test_the_session_limit_claim_of_client_jwts_can_be_named():
    """Identity providers that namespace custom claims: --jwt-max-sessions-claim names the one
    that caps a token's concurrent sessions."""
    async def scenario():
        claim = "https://example.com/max_sessions"
        token = jwt.encode({"sub": "tenant-7", "exp": int(time.time()) + 60, claim: 1}, JWT_SECRET, algorithm="HS256")
        bearer = {"Authorization": f"Bearer {token}"}
        async with relay(jwt_secret=JWT_SECRET, jwt_max_sessions_claim=claim) as (gateway, mock):
            first = RelayClient(await websockets.connect(gateway.url, additional_headers=bearer))
            await first.wait("ready")
            assert await refused_status(gateway.url, additional_headers=bearer) == 429
            await first.close()
    run(scenario(), timeout=20)


def test_per_key_session_limit_refuses_then_admits_after_a_close():
    async def scenario():
        keys = f"{CLIENT_KEY},{OTHER_KEY}"
        async with relay(client_api_keys=keys, max_sessions_per_key=1) as (gateway, mock):
            bearer = {"Authorization": f"Bearer {CLIENT_KEY}"}
            first = RelayClient(await websockets.connect(gateway.url, additional_headers=bearer))
            await first.wait("ready")
            assert await refused_status(gateway.url, additional_headers=bearer) == 429
            other = RelayClient(await websockets.connect(
                gateway.url, additional_headers={"Authorization": f"Bearer {OTHER_KEY}"}))
            await other.wait("ready")  # the limit is per key, not global
            await first.close()
            # the gateway releases the slot in the same teardown that closes the upstream
            await mock.sessions[0].wait_closed(5)
            again = RelayClient(await websockets.connect(gateway.url, additional_headers=bearer))
            await again.wait("ready")
            await again.close()
            await other.close()
    run(scenario(), timeout=30)


def test_a_token_subject_does_not_share_the_limit_of_a_key_with_the_same_id(tmp_path, caplog):
    """Found by an auth audit: per-key limits counted key ids and JWT subjects in one namespace,
    so a token with `sub: keyfile#1` was refused while key-file line 1 was in use (and could
    block it in turn)."""
    token = jwt.encode({"sub": "keyfile#1", "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")

    async def scenario():
        keys = tmp_path / "keys.txt"
        keys.write_text(f"{CLIENT_KEY}\n")  # a bare key: id keyfile#1
        async with relay(api_keys_file=str(keys), jwt_secret=JWT_SECRET, max_sessions_per_key=1) as (gateway, mock):
            by_key = RelayClient(await websockets.connect(
                gateway.url, additional_headers={"Authorization": f"Bearer {CLIENT_KEY}"}))
            await by_key.wait("ready")
            by_token = RelayClient(await websockets.connect(
                gateway.url, additional_headers={"Authorization": f"Bearer {token}"}))
            await by_token.wait("ready")
            # each is still held to its own limit of one
            for credential in (CLIENT_KEY, token):
                assert await refused_status(gateway.url, additional_headers={
                    "Authorization": f"Bearer {credential}"}) == 429
            await by_key.close()
            await by_token.close()

    caplog.set_level(logging.INFO, logger="gateway")
    run(scenario(), timeout=20)
    # the log names whose sessions and refusals they were (as README promises), never the secrets
    lines = [record.getMessage() for record in caplog.records]
    assert sum(" client key:keyfile#1 from 127.0.0.1 connected, opening upstream" in line for line in lines) == 1
    assert sum(" client jwt:keyfile#1 from 127.0.0.1 connected, opening upstream" in line for line in lines) == 1
    assert [line for line in lines if line.startswith("upgrade refused")] == [
        "upgrade refused: key (key:keyfile#1)", "upgrade refused: key (jwt:keyfile#1)"]
    assert CLIENT_KEY not in caplog.text and token not in caplog.text


def test_global_and_per_ip_limits():
    async def scenario():
        async with relay(max_sessions=2) as (gateway, mock):
            a = await RelayClient.connect(gateway.url)
            b = await RelayClient.connect(gateway.url)
            await a.wait("ready")
            await b.wait("ready")
            assert await refused_status(gateway.url) == 503
            await a.close()
            await b.close()
        async with relay(max_sessions_per_ip=1) as (gateway, mock):
            a = await RelayClient.connect(gateway.url)
            await a.wait("ready")
            # the client address is known only once the socket is up (picows' upgrade callback
            # does not see it), so this refusal is an error event and a close, not an HTTP status
            b = await RelayClient.connect(gateway.url)
            refused = await b.wait("error")
            assert refused["code"] == "Overloaded" and refused["fatal"] is True
            await b.wait_closed()
            assert b.close_code == 1013
            assert len(gateway.sessions) == 1 and len(mock.sessions) == 1  # no upstream for it
            await a.close()
    run(scenario(), timeout=30)


def test_per_ip_limit_behind_a_proxy_that_writes_ports_and_ipv6_brackets(caplog):
    """Found by an auth audit: `3.3.3.3:5555` or `[2001:db8::1]:443` in X-Forwarded-For from a
    trusted proxy counted against the proxy itself, so every client behind it shared one slot.
    The log names the address each session and refusal counted against (a logging audit found
    it nowhere at INFO)."""
    async def scenario():
        async with relay(max_sessions_per_ip=1, trusted_proxies=("127.0.0.1",)) as (gateway, mock):
            async def connect(forwarded_for: str) -> RelayClient:
                return RelayClient(await websockets.connect(
                    gateway.url, additional_headers={"X-Forwarded-For": forwarded_for}, compression=None))

            v4 = await connect("3.3.3.3:5555")
            v6 = await connect("[2001:db8::1]:443")
            await v4.wait("ready")
            await v6.wait("ready")        # another client behind the same proxy: its own slot
            again = await connect("3.3.3.3:6666")   # the first client again, from another port
            refused = await again.wait("error")
            assert refused["code"] == "Overloaded" and "address" in refused["message"]
            await again.wait_closed()
            assert again.close_code == 1013
            assert len(gateway.sessions) == 2
            # IPv6 is counted per /64: another address of the same network is the same client,
            # one in the next /64 is not; a dual-stack socket's ::ffff:3.3.3.3 is 3.3.3.3
            for same_client in ("2001:db8::2", "::ffff:3.3.3.3"):
                refused = await connect(same_client)
                assert (await refused.wait("error"))["code"] == "Overloaded"
                await refused.wait_closed()
            neighbour = await connect("[2001:db8:0:1::1]:443")
            await neighbour.wait("ready")
            assert len(gateway.sessions) == 3
            await v4.close()
            await v6.close()
            await neighbour.close()
    caplog.set_level(logging.INFO, logger="gateway")
    run(scenario(), timeout=20)
    lines = [record.getMessage() for record in caplog.records]
    assert sum(" client anonymous:anonymous from 3.3.3.3 connected" in line for line in lines) == 1
    assert sum(" client anonymous:anonymous from 2001:db8::1 connected" in line for line in lines) == 1
    assert "upgrade refused: ip (anonymous:anonymous from 3.3.3.3)" in lines


def test_origin_allow_list():
    async def scenario():
        async with relay(allowed_origins=("https://app.example.com", "https://*.voice.example.com")) as (gateway, mock):
            for origin in ("https://app.example.com", "https://eu.voice.example.com"):
                client = RelayClient(await websockets.connect(gateway.url, origin=origin))
                await client.wait("ready")
                await client.close()
            assert await refused_status(gateway.url, origin="https://evil.example.net") == 403
            assert await refused_status(gateway.url, origin="https://voice.example.com.evil.net") == 403
            for malformed in ("https://[evil", "http://[::1", "https://app.example.com]"):  # were HTTP 500
                assert await refused_status(gateway.url, origin=malformed) == 403, malformed
    run(scenario(), timeout=20)


def test_a_plain_get_of_realtime_leaves_no_session_behind():
    """An HTTP GET without the upgrade headers (scanners do this) must not register a session."""
    async def scenario():
        async with relay() as (gateway, mock):
            for _ in range(3):
                status, _ = await http_get(f"http://127.0.0.1:{gateway.port}/realtime")
                assert status == 400
            status, body = await http_get(f"http://127.0.0.1:{gateway.port}/health")
            assert status == 200 and orjson.loads(body)["sessions"] == 0
            assert not gateway.sessions and mock.sessions == []
    run(scenario(), timeout=20)


# ---- metrics -----------------------------------------------------------------------------------------


def test_metrics_count_exactly_what_the_sessions_did():
    async def scenario():
        pcm = speech_like(1.0, seed=5)
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await push_to_talk_turn(client, pcm)
            await client.close()                     # a close frame, 1000: a completed session
            dropped = await RelayClient.connect(gateway.url)
            await dropped.wait("ready")
            dropped.ws.transport.abort()             # gone without a close frame
            await gateway.wait_empty(5)
            status, body = await http_get(f"http://127.0.0.1:{gateway.port}/metrics")
            assert status == 200
            samples = metric_samples(body)
            assert samples[("gateway_sessions_active", ())] == 0
            assert samples[("gateway_upstream_connections_open", ())] == 0
            assert samples[("gateway_sessions_total", (("outcome", "completed"),))] == 1
            assert samples[("gateway_sessions_total", (("outcome", "client_disconnected"),))] == 1
            c2u = (("direction", "client_to_upstream"), ("kind", "audio"))
            u2c = (("direction", "upstream_to_client"), ("kind", "audio"))
            assert samples[("gateway_bytes_total", c2u)] == len(pcm)
            assert samples[("gateway_frames_total", c2u)] == len(range(0, len(pcm), 960))
            assert samples[("gateway_bytes_total", u2c)] == len(pcm)
            assert samples[("gateway_upstream_connect_seconds_count", ())] == 2  # both sessions connected upstream
            assert samples[("gateway_first_audio_seconds_count", ())] == 1
    run(scenario(), timeout=30)


def test_metrics_show_the_process_s_open_files_memory_and_cpu():
    """Found in session 20: /metrics had no process figures, so a node nearing its open files
    limit (two sockets per session) or growing in memory showed nothing until sessions failed.
    They are prometheus-client's ProcessCollector names, read from /proc at each scrape."""
    import resource

    async def scenario():
        async with relay() as (gateway, _mock):
            clients = [await RelayClient.connect(gateway.url) for _ in range(5)]
            for client in clients:
                await client.wait("ready")
            samples = metric_samples((await http_get(f"http://127.0.0.1:{gateway.port}/metrics"))[1])
            open_fds = len(os.listdir("/proc/self/fd")) - 1
            with open("/proc/self/status") as status:
                rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            for client in clients:
                await client.close()
            return samples, open_fds, rss

    samples, open_fds, rss = run(scenario(), timeout=30)
    assert abs(samples[("process_open_fds", ())] - open_fds) <= 2 and open_fds >= 5 * 3   # client, upstream, mock
    assert samples[("process_max_fds", ())] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert 0.8 * rss < samples[("process_resident_memory_bytes", ())] < 1.25 * rss
    times = os.times()
    assert 0 < samples[("process_cpu_seconds_total", ())] <= times.user + times.system


def test_time_to_first_audio_is_timed_on_the_reply_that_answers_the_turn():
    """Found by a flow audit: a `text` sent while a reply plays is answered after it, but its
    turn end was timed by the next audio of the reply still playing: a sample of ~0 s. The
    first audio of the first reply created after the turn end is what answers it."""
    async def scenario():
        async with relay(MockOptions(pacing="realtime", delta_ms=100)) as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await client.send({"type": "text", "text": "tell me a rather long story about the sea please"})
            playing = await client.wait("response_started")
            await client.wait("transcript")  # the reply is under way (real-time pacing: ~3.5 s of it)
            await client.send({"type": "text", "text": "and then?"})
            done = await client.wait("response_done", response_id=playing["response_id"])
            answer = await client.wait("response_started")
            await client.wait("response_done", response_id=answer["response_id"])
            samples = metric_samples((await http_get(f"http://127.0.0.1:{gateway.port}/metrics"))[1])
            await client.close()
            return samples, (done["_audio_before"] - playing["_audio_before"]) / 48_000

    samples, first_reply_s = run(scenario(), timeout=30)
    assert first_reply_s > 1.0  # the second text waited for most of it
    assert samples[("gateway_first_audio_seconds_count", ())] == 2
    assert samples[("gateway_first_audio_seconds_sum", ())] >= first_reply_s - 0.5


def test_metrics_count_errors_by_code():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.ws.send("{not json")
            await client.wait("error", code="InvalidMessage")
            await client.close()
            await gateway.wait_empty(5)
            _, body = await http_get(f"http://127.0.0.1:{gateway.port}/metrics")
            assert metric_samples(body)[("gateway_errors_total", (("code", "InvalidMessage"),))] == 1
    run(scenario(), timeout=20)


# ---- drain ---------------------------------------------------------------------------------------------


def test_drain_tells_clients_lets_turns_finish_and_refuses_new_sessions():
    async def scenario():
        pcm = speech_like(0.5, seed=8)
        async with relay(drain_timeout_s=10.0) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            drained = asyncio.get_running_loop().create_task(gateway.drain())
            closing = await client.wait("closing")
            assert closing["reason"] == "draining" and 0 < closing["seconds_left"] <= 10
            status, body = await http_get(f"http://127.0.0.1:{gateway.port}/ready")
            assert status == 503 and orjson.loads(body)["ready"] is False
            assert await refused_status(gateway.url) == 503
            await push_to_talk_turn(client, pcm)       # the live call still works
            await client.close()
            await asyncio.wait_for(drained, 5)         # ends as soon as the last session ends
    run(scenario(), timeout=30)


# ---- overload ------------------------------------------------------------------------------------------


async def late_sweep(gateway) -> float:
    """Hold the event loop for longer than the sweep interval (1 s), so the next sweep runs late,
    and return the lag it measured. The sweep is known to have run by its rescheduling itself,
    not by a new lag value: two late sweeps in a row may measure the same lag to the microsecond."""
    due = gateway._sweep_due
    time.sleep(1.5)  # the scenario: a loop busy with something else, not a wait for an event
    for _ in range(300):  # bounded: the late sweep runs as soon as the loop is free
        if gateway._sweep_due != due:
            assert gateway.loop_lag_s >= 0.1
            return gateway.loop_lag_s
        await asyncio.sleep(0.01)
    raise AssertionError("no late sweep")


def test_a_node_whose_event_loop_falls_behind_says_it_is_full_until_it_catches_up():
    """More sessions than the CPU carries show as an event loop running late: every frame of
    every session waits that long. Past --overload-lag-ms the node refuses new sessions (503
    Overloaded) and /ready answers 503, so a load balancer sends them elsewhere; the sessions it
    has go on; the first sweep on time again lifts it. The loop is held here by blocking it,
    twice: one late sweep alone may be one long task, not overload."""
    async def scenario():
        async with relay(overload_lag_ms=100) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            ready_url = f"http://127.0.0.1:{gateway.port}/ready"
            assert (await http_get(ready_url))[0] == 200
            await late_sweep(gateway)
            assert (await http_get(ready_url))[0] == 200  # one late sweep may be one long task
            await late_sweep(gateway)
            status, body = await http_get(ready_url)
            assert status == 503 and orjson.loads(body) == {"ready": False, "draining": False, "overloaded": True}
            assert await refused_status(gateway.url) == 503
            metrics = metric_samples((await http_get(f"http://127.0.0.1:{gateway.port}/metrics"))[1])
            assert metrics[("gateway_refusals_total", (("reason", "overloaded"),))] == 1
            assert metrics[("gateway_event_loop_lag_seconds", ())] >= 0.1
            await push_to_talk_turn(client, speech_like(0.3, seed=9))  # the admitted session goes on
            for _ in range(300):  # the next sweep runs on time
                status, body = await http_get(ready_url)
                if status == 200:
                    break
                await asyncio.sleep(0.01)
            assert status == 200 and orjson.loads(body)["overloaded"] is False
            second = await RelayClient.connect(gateway.url)
            await second.wait("ready")
            await second.close()
            await client.close()
    run(scenario(), timeout=30)


def test_drain_closes_what_remains_with_1001_at_the_deadline(caplog):
    """...and the log says which session was cut off (operators look calls up by id)."""
    async def scenario():
        async with relay(drain_timeout_s=0.5) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            session_id = next(iter(gateway.sessions)).session_id
            await gateway.drain()
            await client.wait_closed(5)
            assert client.close_code == 1001
            assert not gateway.sessions
            await mock.sessions[0].wait_closed(5)
            return session_id

    caplog.set_level("INFO", logger="gateway")
    session_id = run(scenario(), timeout=20)
    assert f"session {session_id}: closed by the gateway (drained, code 1001" in caplog.text


# ---- the node as an operator runs it -------------------------------------------------------------------


def test_sigterm_drains_live_calls_then_exits():
    async def scenario(port: int, process: subprocess.Popen):
        url = f"ws://127.0.0.1:{port}/realtime"
        pcm = speech_like(1.0, seed=9)
        busy = await RelayClient.connect(url)
        idle = await RelayClient.connect(url)
        await busy.send({"type": "config", "turn_detection": "none"})
        await busy.wait("ready")
        await idle.wait("ready")
        for offset in range(0, len(pcm), 960):               # a turn is in flight ...
            await busy.send_audio(pcm[offset:offset + 960])
        process.send_signal(signal.SIGTERM)                   # ... when the node is told to stop
        await busy.wait("closing")
        await busy.send({"type": "commit"})
        await busy.send({"type": "create_response"})
        assert (await busy.wait("response_done", timeout=10))["status"] == "completed"
        assert bytes(busy.audio) == pcm                        # the in-flight turn completed intact
        await busy.close()
        await idle.wait_closed(10)                             # the idle call is closed at the deadline
        assert idle.close_code == 1001
    with gateway_process("--drain-timeout-s", "2") as (process, port):
        run(scenario(port, process), timeout=30)
        assert process.wait(10) == 0


async def logged(log: list[str], text: str, count: int = 1, timeout: float = 10.0) -> list[str]:
    """The node's log lines containing `text`, once there are `count` of them (another process's
    log announces nothing to us: look, within a deadline)."""
    async with asyncio.timeout(timeout):
        while len(lines := [line for line in log if text in line]) < count:
            await asyncio.sleep(0.02)
    return lines


async def admitted(url: str, key: str) -> None:
    """A session with this key gets `ready`; then it is closed."""
    client = RelayClient(await websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {key}"}, compression=None))
    await client.wait("ready", timeout=10)
    await client.close()


async def _keyed_client(url: str, key: str) -> RelayClient:
    return RelayClient(await websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"},
                                                compression=None))


def test_sighup_reloads_the_api_keys_file_and_live_calls_go_on(tmp_path):
    """Found by an auth audit: SIGHUP killed the node at once (live calls dropped without a close
    frame). Now it re-reads --api-keys-file for new upgrades; a file it cannot use keeps the keys
    in use, and the log says why without quoting a key."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"first:{CLIENT_KEY}\n")
    log: list[str] = []

    async def scenario(port: int, process: subprocess.Popen):
        url = f"ws://127.0.0.1:{port}/realtime"
        live = await _keyed_client(url, CLIENT_KEY)
        await live.send({"type": "config", "turn_detection": "none"})
        await live.wait("ready")
        assert await refused_status(url, additional_headers={"Authorization": f"Bearer {OTHER_KEY}"}) == 401

        keys.write_text(f"first:{CLIENT_KEY}\nsecond:{OTHER_KEY}\n")
        process.send_signal(signal.SIGHUP)
        await logged(log, "reloaded 2 client keys")
        await admitted(url, OTHER_KEY)

        keys.write_text(f"first:{CLIENT_KEY}\nthird:short-secret-x\n")  # a key too short to load
        process.send_signal(signal.SIGHUP)
        [line] = await logged(log, "client keys not reloaded")
        assert "keeping the 2 in use" in line and "line 2: the key must be at least 16 characters" in line
        await admitted(url, OTHER_KEY)  # the keys in use stay in use

        await push_to_talk_turn(live, speech_like(0.5, seed=11))  # the call admitted first went on
        assert not live.closed.is_set() and process.poll() is None
        await live.close()

    with gateway_process("--api-keys-file", str(keys), log=log) as (process, port):
        run(scenario(port, process), timeout=40)
    assert not any(secret in line for line in log for secret in (CLIENT_KEY, OTHER_KEY, "short-secret-x"))


def test_sighup_without_a_keys_file_changes_nothing(caplog):
    """GATEWAY_API_KEYS and GATEWAY_JWT_SECRET come from the environment, which a signal cannot
    change: the reload says so and keeps them."""
    async def scenario():
        async with relay(client_api_keys=CLIENT_KEY) as (gateway, mock):
            before = gateway.authenticator
            gateway.reload_keys()
            assert gateway.authenticator is before
            await admitted(gateway.url, CLIENT_KEY)
    with caplog.at_level(logging.INFO, logger="gateway.server"):
        run(scenario(), timeout=20)
    assert "SIGHUP: no --api-keys-file to reload; client keys unchanged" in caplog.text


def test_sighup_reaches_every_worker(tmp_path):
    """With --workers the supervisor forwards SIGHUP: every worker reloads, none stops."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"first:{CLIENT_KEY}\n")
    log: list[str] = []

    async def scenario(port: int, process: subprocess.Popen):
        url = f"ws://127.0.0.1:{port}/realtime"
        live = await _keyed_client(url, CLIENT_KEY)
        await live.wait("ready", timeout=10)
        keys.write_text(f"first:{CLIENT_KEY}\nsecond:{OTHER_KEY}\n")
        process.send_signal(signal.SIGHUP)
        await logged(log, "reloaded 2 client keys", count=2)
        for _ in range(8):  # the two workers take connections at random: 8 reach both all but surely
            await admitted(url, OTHER_KEY)
        await live.send({"type": "text", "text": "still there?"})
        assert (await live.wait("response_done", timeout=10))["status"] == "completed"
        assert process.poll() is None and not any("worker" in line and "died" in line for line in log)
        await live.close()

    with gateway_process("--workers", "2", "--api-keys-file", str(keys), workers=2, log=log) as (process, port):
        run(scenario(port, process), timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


def test_workers_share_the_port_and_survive_the_death_of_one():
    import resource

    async def scenario(port: int):
        url = f"ws://127.0.0.1:{port}/realtime"
        clients = [await RelayClient.connect(url) for _ in range(16)]
        for client in clients:
            await client.wait("ready", timeout=10)
        pids: dict[int, int] = {}
        for _ in range(60):  # each GET lands on a random worker; 60 reach both with certainty
            _, body = await http_get(f"http://127.0.0.1:{port}/health")
            health = orjson.loads(body)
            pids[health["pid"]] = health["sessions"]
        assert len(pids) == 2 and sum(pids.values()) == 16 and all(pids.values())
        # one series per worker, as prometheus-client's ProcessCollector gives one per process
        # (a scrape updates its own worker's; the sweep, every 10 s, the other's)
        samples = metric_samples((await http_get(f"http://127.0.0.1:{port}/metrics"))[1])
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]   # the node raised its soft limit to this
        for pid in pids:
            assert samples[("process_max_fds", (("pid", str(pid)),))] == limit
            assert samples[("process_open_fds", (("pid", str(pid)),))] > 0   # (as of its latest update)
            assert samples[("process_resident_memory_bytes", (("pid", str(pid)),))] > 10 << 20
        victim = max(pids, key=pids.get)
        os.kill(victim, signal.SIGKILL)
        survivors = []
        for client in clients:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(client.closed.wait(), 0.5 if survivors else 5)
            if not client.closed.is_set():
                survivors.append(client)
        assert len(survivors) == 16 - pids[victim]
        for client in survivors:                              # the other worker's calls go on
            await client.send({"type": "text", "text": "still there?"})
            assert (await client.wait("response_done", timeout=10))["status"] == "completed"
        replacement = None
        async with asyncio.timeout(15):                       # the supervisor replaces the dead worker
            while replacement is None:
                _, body = await http_get(f"http://127.0.0.1:{port}/health")
                pid = orjson.loads(body)["pid"]
                if pid not in pids:
                    replacement = pid
        for client in survivors:
            await client.close()
    with gateway_process("--workers", "2", workers=2) as (process, port):
        run(scenario(port), timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


def test_session_limits_hold_for_the_whole_node_across_workers():
    """With --workers 2 each worker used to count only its own sessions, so a key limited to 1
    got 2. Now the limits are the node's: whichever worker a connection lands on, a key capped
    at one session gets exactly one, and when the worker holding it is killed, its sessions
    are forgotten and the key may connect again (through the other worker or the replacement)."""
    async def scenario(port: int):
        url = f"ws://127.0.0.1:{port}/realtime"
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        first = RelayClient(await websockets.connect(url, additional_headers=auth, compression=None))
        await first.wait("ready", timeout=10)
        for _ in range(8):  # the two workers take connections at random: 8 reach both with certainty
            assert await refused_status(url, additional_headers=auth) == 429
        holder = None
        for _ in range(60):
            _, body = await http_get(f"http://127.0.0.1:{port}/health")
            health = orjson.loads(body)
            if health["sessions"] == 1:
                holder = health["pid"]
                break
        assert holder is not None
        os.kill(holder, signal.SIGKILL)
        await first.wait_closed(5)
        # The client's socket closes before the dying worker's listening socket may: a connect in
        # between lands in the dead listener's queue and is reset. Only a zombie has closed all.
        async with asyncio.timeout(10):
            while _alive(holder):
                await asyncio.sleep(0.01)
        async with asyncio.timeout(15):  # the supervisor reaps it and forgets its sessions
            while True:
                try:
                    again = RelayClient(await websockets.connect(url, additional_headers=auth, compression=None))
                    break
                except InvalidStatus as refused:
                    assert refused.response.status_code == 429
                    await asyncio.sleep(0.05)
        await again.wait("ready", timeout=10)
        await again.close()
    with gateway_process("--workers", "2", "--max-sessions-per-key", "1", workers=2,
                         env={"GATEWAY_API_KEYS": CLIENT_KEY}) as (process, port):
        run(scenario(port), timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


def test_workers_do_not_outlive_a_killed_supervisor():
    """SIGKILL cannot be forwarded: the workers must still go (the kernel tells them), or they
    would hold the port and their sessions with nobody to stop or replace them."""
    async def worker_pids(port: int) -> set[int]:
        pids: set[int] = set()
        for _ in range(60):  # each GET lands on a random worker
            _, body = await http_get(f"http://127.0.0.1:{port}/health")
            pids.add(orjson.loads(body)["pid"])
        return pids

    async def gone(pids: set[int]) -> None:
        async with asyncio.timeout(10):  # another process's exit announces nothing to us: look
            while any(_alive(pid) for pid in pids):
                await asyncio.sleep(0.05)

    with gateway_process("--workers", "2", workers=2) as (process, port):
        pids = run(worker_pids(port), timeout=30)
        assert len(pids) == 2 and process.pid not in pids
        process.kill()
        process.wait(5)
        run(gone(pids), timeout=15)
    # its metrics directory outlived it; the next supervisor to start removes such orphans
    (orphan,) = glob.glob(os.path.join(tempfile.gettempdir(), f"{METRICS_DIR_PREFIX}{process.pid}-*"))
    assert orphan in remove_orphaned_metrics_dirs() and not os.path.exists(orphan)


def test_only_metrics_directories_of_supervisors_that_are_gone_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: no process has its pid (until one is given it again)
    names = {"orphan": f"{METRICS_DIR_PREFIX}{dead.pid}-abc", "running": f"{METRICS_DIR_PREFIX}{os.getpid()}-abc",
             "unnamed": f"{METRICS_DIR_PREFIX}abc123", "other": f"other-{dead.pid}-abc"}
    for name in names.values():
        (tmp_path / name).mkdir()
    assert remove_orphaned_metrics_dirs(str(tmp_path)) == [str(tmp_path / names["orphan"])]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        name for kind, name in names.items() if kind != "orphan")


def _alive(pid: int) -> bool:
    """Running (an exited process that PID 1 has not reaped yet is a zombie: not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped between open and read
        return False


def test_the_node_raises_its_open_files_limit_and_says_what_room_is_left():
    """Found in session 20: a node kept the soft limit it was started with, 1024 on most
    machines (systemd's default for services, login shells): ~320 sessions with the built-in
    mock (three sockets each), ~480 with a real upstream. Beyond it, upstream connects failed
    with EMFILE and libuv closed waiting connections unheard, with the hard limit far higher.
    The node now raises the soft limit to the hard one as it starts, and warns when what is
    left is less than --max-sessions (or, unset, a thousand per process)."""
    import resource
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)  # what this machine allows
    assert hard >= 256, hard
    log: list[str] = []
    with gateway_process(open_files=(128, hard), log=log) as (process, port):
        with open(f"/proc/{process.pid}/limits") as limits:
            assert next(line for line in limits if line.startswith("Max open files")).split()[3:5] == [str(hard)] * 2

        async def sixty_sessions():  # 180 sockets and more: beyond the 128 it started with
            clients = await asyncio.gather(*(RelayClient.connect(f"ws://127.0.0.1:{port}/realtime")
                                             for _ in range(60)))
            try:
                readies = await asyncio.gather(*(client.wait("ready") for client in clients))
                return len(readies), [error for client in clients for error in client.of_type("error")]
            finally:
                await asyncio.gather(*(client.close() for client in clients))

        assert run(sixty_sessions(), timeout=60) == (60, [])
    room = (hard - 64) // 3
    assert any(f"open files limit{',' if room < 1000 else ''} {hard} (raised from 128)" in line
               and f"room for ~{room} sessions per process" in line for line in log), "".join(log)

    log.clear()
    with gateway_process("--max-sessions", "300", open_files=(256, 256), log=log):
        pass
    assert any("WARNING gateway.node: the open files limit, 256, leaves room for ~64 sessions per process "
               "(3 sockets each), not --max-sessions 300" in line for line in log), "".join(log)
