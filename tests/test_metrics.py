"""Prometheus metrics (gateway/metrics.py): the scrape says exactly what the test did, gauges return
to zero, and with several worker processes the figures are summed."""
from __future__ import annotations

import asyncio
import base64
import math
import os
import sys

from prometheus_client.parser import text_string_to_metric_families

from _fastpath import measure_level
from gateway.config import NodeConfig
from gateway.errors import ERROR_TABLE
from gateway.metrics import (C2U, U2C, GatewayMetrics, SessionStats, mark_worker_dead, prepare_multiprocess_dir,
                             render_multiprocess)
from gateway.server import GatewayServer
from tests.raw_client import http_get
from tests.relay_harness import RelayClient, ScriptedUpstream, relay, speech_like
from tests.support import run


def scrape(body: bytes) -> dict[tuple[str, frozenset], float]:
    """Parse Prometheus text into {(sample name, labels): value} (fails on malformed output)."""
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_render_is_prometheus_text_with_every_series_at_zero():
    metrics = GatewayMetrics()
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    openmetrics, openmetrics_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert openmetrics_type.startswith("application/openmetrics-text") and openmetrics.endswith(b"# EOF\n")
    # found by a security audit: a version prometheus_client cannot compare raised (TypeError)
    for unreadable in ("text/plain;version=abc", "application/openmetrics-text;version=zz"):
        assert metrics.render(unreadable) == (body, content_type)
    samples = scrape(body)
    assert value(samples, "gateway_sessions_active") == 0
    assert value(samples, "gateway_workers") == 1
    for direction in (C2U, U2C):
        for kind in ("audio", "json"):
            assert value(samples, "gateway_frames_total", direction=direction, kind=kind) == 0
            assert value(samples, "gateway_bytes_total", direction=direction, kind=kind) == 0
    for code in ERROR_TABLE:
        assert value(samples, "gateway_errors_total", code=code) == 0
    assert not any(name.endswith("_created") for name, _ in samples)


def test_counters_match_what_the_sessions_did():
    metrics = GatewayMetrics()
    first, second = metrics.session_opened(), metrics.session_opened()
    for _frame in range(50):  # what the hot path does: plain int additions
        first.c2u_audio_frames += 1
        first.c2u_audio_bytes += 960
    first.c2u_json_frames += 2
    first.c2u_json_bytes += 150
    second.u2c_audio_frames += 7
    second.u2c_audio_bytes += 7 * 4800
    second.u2c_json_frames += 11
    second.u2c_json_bytes += 2000
    samples = scrape(metrics.render()[0])
    assert value(samples, "gateway_sessions_active") == 2
    assert value(samples, "gateway_frames_total", direction=C2U, kind="audio") == 0  # not flushed yet
    metrics.flush(first)
    metrics.flush(first)  # a second flush with nothing new adds nothing
    first.c2u_audio_frames += 5
    first.c2u_audio_bytes += 5 * 960
    assert metrics.session_closed(first, "completed") is True
    assert metrics.session_closed(first, "error") is False  # idempotent
    metrics.session_closed(second, "client_disconnected")
    samples = scrape(metrics.render()[0])
    assert value(samples, "gateway_frames_total", direction=C2U, kind="audio") == 55
    assert value(samples, "gateway_bytes_total", direction=C2U, kind="audio") == 55 * 960
    assert value(samples, "gateway_frames_total", direction=C2U, kind="json") == 2
    assert value(samples, "gateway_bytes_total", direction=C2U, kind="json") == 150
    assert value(samples, "gateway_frames_total", direction=U2C, kind="audio") == 7
    assert value(samples, "gateway_bytes_total", direction=U2C, kind="audio") == 33600
    assert value(samples, "gateway_frames_total", direction=U2C, kind="json") == 11
    assert value(samples, "gateway_bytes_total", direction=U2C, kind="json") == 2000
    assert value(samples, "gateway_sessions_total", outcome="completed") == 1
    assert value(samples, "gateway_sessions_total", outcome="client_disconnected") == 1
    assert value(samples, "gateway_sessions_total", outcome="error") == 0
    assert value(samples, "gateway_sessions_active") == 0


def test_gauges_return_to_zero_whatever_the_session_forgot():
    metrics = GatewayMetrics()
    stats = metrics.session_opened()
    metrics.upstream_opened(stats)
    metrics.observe_upstream_connect(0.04)
    metrics.upstream_opened(stats)  # repeated report of the same connection: counted once
    stats.u2c_buffered_bytes = 96_000
    stats.c2u_buffered_bytes = 4_800
    metrics.flush(stats)
    samples = scrape(metrics.render()[0])
    assert value(samples, "gateway_upstream_connections_open") == 1
    assert value(samples, "gateway_buffered_bytes", direction=U2C) == 96_000
    assert value(samples, "gateway_buffered_bytes", direction=C2U) == 4_800
    stats.u2c_buffered_bytes = 200_000  # the client stopped reading
    metrics.flush(stats)
    stats.u2c_buffered_bytes = 10_000
    metrics.flush(stats)
    assert value(scrape(metrics.render()[0]), "gateway_buffered_bytes", direction=U2C) == 10_000
    metrics.session_closed(stats, "slow_client")  # upstream still marked open, bytes still queued
    metrics.upstream_closed(stats)  # a late report after the close changes nothing
    samples = scrape(metrics.render()[0])
    assert value(samples, "gateway_upstream_connections_open") == 0
    assert value(samples, "gateway_buffered_bytes", direction=U2C) == 0
    assert value(samples, "gateway_buffered_bytes", direction=C2U) == 0
    assert value(samples, "gateway_sessions_active") == 0
    # the session's peak queue (as seen at flushes) went into the histogram
    assert value(samples, "gateway_session_peak_buffered_bytes_count", direction=U2C) == 1
    assert value(samples, "gateway_session_peak_buffered_bytes_sum", direction=U2C) == 200_000
    assert value(samples, "gateway_session_peak_buffered_bytes_bucket", direction=U2C, le="262144.0") == 1
    assert value(samples, "gateway_session_peak_buffered_bytes_bucket", direction=U2C, le="65536.0") == 0
    assert value(samples, "gateway_upstream_connect_seconds_count") == 1
    assert math.isclose(value(samples, "gateway_upstream_connect_seconds_sum"), 0.04)


def test_events_errors_drops_refusals_levels_and_latency():
    metrics = GatewayMetrics()
    for code in ("InvalidMessage", "InvalidMessage", "Overloaded", "NoSuchCode"):
        metrics.count_error(code)
    metrics.count_drop("slow_client", 4800)
    metrics.count_drop("slow_client", 960)
    metrics.count_drop("mystery", 10)
    for reason in ("auth", "auth", "ip", "draining"):
        metrics.count_refusal(reason)
    silence = measure_level(bytes(9600))[0]  # what the meters read digital silence as: their floor
    for level in (-20.0, -3.5, float("-inf"), float("nan"), 0.5, silence):
        metrics.observe_level("input", level)
    metrics.observe_level("output", -40.0)
    metrics.observe_level("sideways", -40.0)  # unknown stream: ignored, not an exception
    metrics.observe_first_audio(0.42)
    metrics.observe_first_audio(1.7)
    samples = scrape(metrics.render()[0])
    assert value(samples, "gateway_errors_total", code="InvalidMessage") == 2
    assert value(samples, "gateway_errors_total", code="Overloaded") == 1
    assert value(samples, "gateway_errors_total", code="other") == 1
    assert value(samples, "gateway_drops_total", reason="slow_client") == 2
    assert value(samples, "gateway_dropped_bytes_total", reason="slow_client") == 5760
    assert value(samples, "gateway_dropped_bytes_total", reason="other") == 10
    assert value(samples, "gateway_refusals_total", reason="auth") == 2
    assert value(samples, "gateway_refusals_total", reason="ip") == 1
    assert value(samples, "gateway_refusals_total", reason="draining") == 1
    level = "gateway_audio_rms_db_below_full_scale"
    assert value(samples, f"{level}_count", stream="input") == 6
    assert value(samples, f"{level}_sum", stream="input") == 20.0 + 3.5 + 120.0 + 120.0 + 0.0 + 120.0
    assert value(samples, f"{level}_bucket", stream="input", le="1.0") == 1  # the +0.5 dBFS reading
    assert value(samples, f"{level}_bucket", stream="input", le="6.0") == 2
    assert value(samples, f"{level}_bucket", stream="input", le="20.0") == 3
    assert value(samples, f"{level}_bucket", stream="input", le="90.0") == 3  # silence is beyond
    assert value(samples, f"{level}_bucket", stream="input", le="120.0") == 6
    assert value(samples, f"{level}_count", stream="output") == 1
    assert value(samples, "gateway_first_audio_seconds_count") == 2
    assert value(samples, "gateway_first_audio_seconds_bucket", le="0.5") == 1
    assert value(samples, "gateway_first_audio_seconds_bucket", le="2.0") == 2


def test_instances_are_independent():
    first, second = GatewayMetrics(), GatewayMetrics()
    first.count_error("InvalidConfig")
    first.session_opened()
    assert value(scrape(first.render()[0]), "gateway_errors_total", code="InvalidConfig") == 1
    samples = scrape(second.render()[0])
    assert value(samples, "gateway_errors_total", code="InvalidConfig") == 0
    assert value(samples, "gateway_sessions_active") == 0


def test_session_stats_repr_shows_figures():
    stats = SessionStats()
    stats.c2u_audio_bytes += 960
    assert "c2u_audio_bytes=960" in repr(stats)


# ---- multiple worker processes -----------------------------------------------------------

_WORKER = r"""
import sys
from gateway.metrics import GatewayMetrics
directory, open_sessions, render = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "render"
metrics = GatewayMetrics(multiprocess_dir=directory)
live = [metrics.session_opened() for _ in range(open_sessions)]
live[0].c2u_audio_frames += 10 * open_sessions
live[0].c2u_audio_bytes += 960 * 10 * open_sessions
metrics.flush(live[0])
metrics.upstream_opened(live[0])
metrics.observe_upstream_connect(0.05)
metrics.session_closed(metrics.session_opened(), "completed")
metrics.count_error("InvalidMessage")
if render:
    sys.stdout.write(metrics.render()[0].decode())
print("READY", flush=True)
sys.stdin.read()  # stay alive (live gauges count) until the test closes stdin
"""


async def _start_worker(directory: str, open_sessions: int, render: bool):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER, directory, str(open_sessions), "render" if render else "quiet",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    output = []
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line, "worker exited before READY"
        if line.strip() == b"READY":
            return proc, b"".join(output)
        output.append(line)


async def _stop_worker(proc) -> None:
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 10) == 0


def _check_sum(samples, workers: int, active: float, frames: float) -> None:
    assert value(samples, "gateway_workers") == workers
    assert value(samples, "gateway_sessions_active") == active
    assert value(samples, "gateway_upstream_connections_open") == workers
    assert value(samples, "gateway_frames_total", direction=C2U, kind="audio") == frames
    assert value(samples, "gateway_bytes_total", direction=C2U, kind="audio") == frames * 960


def test_two_worker_processes_are_summed(tmp_path):
    directory = str(tmp_path / "metrics")
    prepare_multiprocess_dir(directory)

    async def scenario():
        first, _ = await _start_worker(directory, open_sessions=2, render=False)
        try:
            second, rendered = await _start_worker(directory, open_sessions=3, render=True)
            try:
                # rendered inside a worker (as GET /metrics would be): both workers' figures
                for samples in (scrape(rendered), scrape(render_multiprocess(directory)[0])):
                    _check_sum(samples, workers=2, active=5, frames=50)
                    assert value(samples, "gateway_sessions_total", outcome="completed") == 2
                    assert value(samples, "gateway_errors_total", code="InvalidMessage") == 2
                    assert value(samples, "gateway_upstream_connect_seconds_count") == 2
                # the first worker dies: its live gauges go, its counters stay in the totals
                await _stop_worker(first)
                mark_worker_dead(first.pid, directory)
                samples = scrape(render_multiprocess(directory)[0])
                _check_sum(samples, workers=1, active=3, frames=50)
                assert value(samples, "gateway_sessions_total", outcome="completed") == 2
            finally:
                await _stop_worker(second)
        finally:
            if first.returncode is None:
                first.kill()
                await first.wait()

    run(scenario(), timeout=30)
    prepare_multiprocess_dir(directory)  # a restart starts from clean files
    assert os.listdir(directory) == []


# ---- end to end: a node and a scripted upstream ------------------------------------------------

def _scripted_node(url: str) -> NodeConfig:
    return NodeConfig(host="127.0.0.1", port=0, upstream="openai", api_key="test-key-scripted", upstream_url=url)


async def _samples(gateway) -> dict[tuple[str, frozenset], float]:
    status, body = await http_get(gateway.port, "/metrics")
    assert status == 200
    return scrape(body)


def test_the_upstream_connect_time_runs_until_session_created():
    """`gateway_upstream_connect_seconds` is the wait a client's `ready` depends on: TCP, the
    WebSocket handshake and then the upstream's `session.created` — not the handshake alone."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()

    async def scenario():
        async with ScriptedUpstream(script, created_after_s=0.3) as url, GatewayServer(_scripted_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", 5)
            samples = await _samples(gateway)
            assert value(samples, "gateway_upstream_connect_seconds_count") == 1
            # 0.3 s of waiting for session.created, not the ~1 ms handshake (uvloop timers may fire
            # a hair early on the loop clock: 0.29999…)
            assert value(samples, "gateway_upstream_connect_seconds_sum") > 0.25
            await client.close()
    run(scenario(), timeout=20)


def test_audio_waiting_for_ready_is_buffered_and_counted_as_dropped_when_the_upstream_fails():
    """Client audio held before `ready` shows in gateway_buffered_bytes{client_to_upstream}; when
    the upstream then fails the session, that audio never went up: a drop, `upstream_closed`,
    byte for byte — not bytes silently counted as relayed."""
    hang_up = asyncio.Event()

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")  # never answered: the session waits for `ready`
        await hang_up.wait()
        await upstream.hang_up()

    async def buffered(gateway) -> float:
        return value(await _samples(gateway), "gateway_buffered_bytes", direction=C2U)

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_scripted_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            for _ in range(10):
                await client.ws.send(bytes(960))
            async with asyncio.timeout(10):  # the sweep publishes the figure: no event to wait on
                while await buffered(gateway) != 9600:
                    await asyncio.sleep(0.05)
            hang_up.set()
            error = await client.wait("error", 5)
            assert error["code"] == "ConnectionFailed" and error["fatal"] is True
            await gateway.wait_empty(5)
            samples = await _samples(gateway)
            assert value(samples, "gateway_dropped_bytes_total", reason="upstream_closed") == 9600
            assert value(samples, "gateway_drops_total", reason="upstream_closed") == 1
            assert value(samples, "gateway_buffered_bytes", direction=C2U) == 0
    run(scenario(), timeout=30)


def test_reply_audio_cut_by_a_barge_in_counts_as_received_and_as_dropped():
    """Found by a metrics audit: audio of a reply the user cut was counted as dropped
    (`interrupted`) but not as received, where every other drop reason counts both; so
    "received minus dropped" subtracted it twice. The upstream here sends two more deltas of
    the reply after the client's cancel reached it, as a real one does with deltas in flight."""
    delta = bytes(range(256)) * 15  # 3,840 bytes: 80 ms of PCM16

    def audio(item: str) -> dict:
        return {"type": "response.output_audio.delta", "response_id": "resp_1", "item_id": item,
                "output_index": 0, "content_index": 0, "delta": base64.b64encode(delta).decode()}

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.send({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        await upstream.send({"type": "response.output_item.added", "response_id": "resp_1", "output_index": 0,
                             "item": {"id": "item_1", "type": "message", "role": "assistant"}})
        await upstream.send(audio("item_1"))
        await upstream.receive("response.cancel")
        await upstream.send(audio("item_1"))   # in flight when the cancel came
        await upstream.send(audio("item_1"))
        await upstream.send({"type": "response.done", "response": {"id": "resp_1", "status": "cancelled"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_scripted_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.wait_audio(len(delta))
            await client.send({"type": "cancel_response"})
            await client.wait("response_done")  # every delta of the reply has passed the gateway
            (session,) = gateway.sessions
            gateway.metrics.flush(session.stats)  # what the sweep does once a second
            samples = await _samples(gateway)
            await client.close()
            return bytes(client.audio), samples

    heard, samples = run(scenario(), timeout=20)
    assert heard == delta
    assert value(samples, "gateway_dropped_bytes_total", reason="interrupted") == 2 * len(delta)
    assert value(samples, "gateway_drops_total", reason="interrupted") == 2
    assert value(samples, "gateway_bytes_total", direction="upstream_to_client", kind="audio") == 3 * len(delta)
    assert value(samples, "gateway_frames_total", direction="upstream_to_client", kind="audio") == 3


def test_audio_levels_are_in_the_metrics_for_sessions_that_did_not_ask_for_level_events():
    """SPEC §6 lists audio levels in /metrics. They used to be metered only for clients that had
    asked for `level` events, so an operator saw none for ordinary clients (silent microphones,
    clipping, across the fleet). The meters now always run; the sweep reads them."""
    async def levels(gateway) -> dict[str, tuple[float, float]]:
        samples = await _samples(gateway)
        return {stream: (value(samples, "gateway_audio_rms_db_below_full_scale_count", stream=stream),
                         value(samples, "gateway_audio_rms_db_below_full_scale_sum", stream=stream))
                for stream in ("input", "output")}

    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            pcm = speech_like(1.0, seed=5)
            for offset in range(0, len(pcm), 960):
                await client.send_audio(pcm[offset:offset + 960])
            await client.send({"type": "commit"})
            await client.send({"type": "create_response"})
            await client.wait("response_done")
            async with asyncio.timeout(10):  # the sweep reads the meters once a second
                while min(count for count, _sum in (await levels(gateway)).values()) == 0:
                    await asyncio.sleep(0.05)
            rms_dbfs = measure_level(pcm)[0]
            for stream, (count, total) in (await levels(gateway)).items():
                assert abs(total / count + rms_dbfs) < 6, (stream, total / count, rms_dbfs)  # dB below full scale
            assert client.of_type("level") == []  # the client asked for no events, and got none
            await client.close()
    run(scenario(), timeout=30)


def test_an_out_of_band_replys_audio_is_not_timed_as_the_turns_first_reply_audio():
    """Found by a protocol audit: audio of an out-of-band reply, arriving while the reply to a
    `text` was timed, was recorded as that turn's time to first reply audio (0.2 s here), and
    the turn's own reply's first audio (at least 0.8 s after the text) was not recorded."""
    second = base64.b64encode(bytes(48_000)).decode()

    def audio(response_id: str, item_id: str) -> dict:
        return {"type": "response.output_audio.delta", "response_id": response_id, "item_id": item_id, "delta": second}

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("response.create")                                  # the client's out-of-band one
        await upstream.send({"type": "response.created", "response": {"id": "resp_o", "status": "in_progress",
                                                                      "conversation_id": None}})
        item = await upstream.receive("conversation.item.create")                  # the text
        await upstream.send({"type": "conversation.item.added", "item": item["item"]})
        await upstream.receive("response.create")                                  # its reply
        await upstream.send({"type": "response.created", "response": {"id": "resp_c", "status": "in_progress",
                                                                      "conversation_id": "conv_1"}})
        for response_id, item_id in (("resp_o", "item_o"), ("resp_c", "item_c")):
            await upstream.send({"type": "response.output_item.added", "response_id": response_id,
                                 "item": {"id": item_id, "type": "message", "role": "assistant"}})
        await asyncio.sleep(0.2)                                                   # the scenario's pacing
        await upstream.send(audio("resp_o", "item_o"))
        await upstream.send({"type": "response.done", "response": {"id": "resp_o", "status": "completed",
                                                                   "conversation_id": None}})
        await asyncio.sleep(0.6)
        await upstream.send(audio("resp_c", "item_c"))
        await upstream.send({"type": "response.done", "response": {"id": "resp_c", "status": "completed",
                                                                   "conversation_id": "conv_1"}})

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(_scripted_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "response.create", "response": {"conversation": "none"}})
            await client.wait("response_started", response_id="resp_o")
            await client.send({"type": "text", "text": "hello"})
            await client.wait("response_done", response_id="resp_c", timeout=5)
            samples = await _samples(gateway)
            await client.close()
            return samples

    samples = run(scenario(), timeout=20)
    assert value(samples, "gateway_first_audio_seconds_count") == 1
    assert value(samples, "gateway_first_audio_seconds_sum") >= 0.75  # the turn's own reply, ≥ 0.8 s after the text


def test_a_queue_that_lives_between_two_sweeps_is_still_the_sessions_peak(monkeypatch):
    """Found by a metrics audit: a session's largest queue was sampled at the sweep (once a
    second), so audio held before a `ready` that came within the second counted 0, the usual
    case. Here no sweep runs at all while the session lives."""
    import gateway.server
    monkeypatch.setattr(gateway.server, "SWEEP_INTERVAL_S", 60.0)

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()

    async def scenario():
        # session.created waits until the client's audio is held
        async with ScriptedUpstream(script, created_after_s=0.3) as url, GatewayServer(_scripted_node(url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            for _ in range(10):
                await client.ws.send(bytes(960))
            await client.wait("ready", 5)
            await client.close()
            await gateway.wait_empty(5)
            return await _samples(gateway)

    samples = run(scenario(), timeout=20)
    assert value(samples, "gateway_session_peak_buffered_bytes_count", direction=C2U) == 1
    assert value(samples, "gateway_session_peak_buffered_bytes_sum", direction=C2U) == 9600


def test_audio_levels_are_read_once_a_second_however_often_the_sweep_runs():
    """Found by a metrics audit: the sweep reads the meters, and runs more often than once a
    second with short timeouts (here every 0.25 s, --idle-timeout-s 1): the README's "once a
    second" became four times a second, and each reading a quarter of a second's."""
    async def scenario():
        async with relay(idle_timeout_s=1.0) as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            loop = asyncio.get_running_loop()
            started = loop.time()
            for frame in range(100):  # 2 s of audio in real time: the session stays active
                await client.send_audio(bytes([1, 2]) * 480)
                await asyncio.sleep(max(0.0, started + (frame + 1) * 0.02 - loop.time()))
            elapsed = loop.time() - started
            samples = await _samples(gateway)
            await client.close()
            return value(samples, "gateway_audio_rms_db_below_full_scale_count", stream="input"), elapsed

    count, elapsed = run(scenario(), timeout=20)
    assert 1 <= count <= elapsed + 1, (count, elapsed)
