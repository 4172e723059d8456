"""Soak: open, use and close many sessions in waves; the node's RSS and open fds must come back.

    .venv/bin/python bench/soak.py                      # 20,000 sessions: 40 waves x 500
    .venv/bin/python bench/soak.py --sessions 2000 --waves 10   # a quick look

The gateway runs as a subprocess (`python -m gateway --upstream mock`, so the built-in mock runs
inside it and its memory counts too). Every session: connect, `config` (push-to-talk), wait for
`ready`, five 20 ms PCM16 frames tagged with the session's number, `commit`, `create_response`,
the reply checked to be the byte-exact echo, then a `text` turn (reply audio and a final assistant
transcript must arrive; `--no-text-turn` skips it), a client close (1000). At most `--concurrency`
sessions are open at once. After each wave the soak waits until `/health` reports 0 sessions,
then samples the gateway's RSS (/proc/PID/status VmRSS) and open file descriptors (/proc/PID/fd).

Verdict (exit status 1 if any fails; all are printed):
- fds: after the last close, the same count as the baseline, +/- `--fd-tolerance` (default 2:
  none should stay; the slack is for the runtime opening a file now and then);
- RSS: after the last close, within `--rss-tolerance-mib` (default 32) of the level after wave 1.
  Not the cold start: the first waves grow the allocator's arenas and picows/uvloop buffers to
  their working size for `--concurrency` open sessions, and glibc keeps freed pages mapped, so
  RSS settles on a plateau (measured: ~100 MiB after wave 1, ~115-120 MiB from wave 5 on, with 100
  concurrent sessions and the text turn). A leak instead grows with every wave, so also:
- RSS trend: growth over the second half of the waves at most `--max-trend-kib` per 1,000
  sessions (default 1024 = 1 KiB per session; 10,000 sessions leaking 1 KiB each = 10 MiB);
- every session completed its turn with a byte-exact echo (0 failures);
- where the node serves /metrics: `gateway_sessions_active` and
  `gateway_upstream_connections_open` are 0 after the last close and `gateway_sessions_total`
  (all outcomes) equals the sessions run.
A JSON record goes to bench/results/soak-<time>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

FRAME_BYTES = 960          # 20 ms of PCM16 mono 24 kHz
FRAMES_PER_TURN = 5        # 100 ms: the smallest turn OpenAI (and the mock) accepts
MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def turn_audio(index: int) -> bytes:
    """100 ms of a tone whose every frame starts with (session index, frame index): an echo
    check that would notice bytes from another session or another frame."""
    import math
    tone = b"".join(struct.pack("<h", int(3000 * math.sin(2 * math.pi * 440 * n / 24000)))
                    for n in range(FRAME_BYTES // 2))
    return b"".join(struct.pack("<II", index, frame) + tone[8:] for frame in range(FRAMES_PER_TURN))


class SoakClient(WSListener):
    """One session's client: records the reply audio and the events it waits for."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.audio = bytearray()
        self.ready = asyncio.Event()
        self.done = asyncio.Event()
        self.closed = asyncio.Event()
        self.error: dict | None = None
        self.status: str | None = None
        self.assistant_text = ""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.BINARY:
            self.audio += frame.get_payload_as_memoryview()
        elif kind is WSMsgType.TEXT:
            event = orjson.loads(frame.get_payload_as_bytes())
            kind_name = event.get("type")
            if kind_name == "ready":
                self.ready.set()
            elif kind_name == "response_done":
                self.status = event.get("status")
                self.done.set()
            elif kind_name == "error" and self.error is None:
                self.error = event
            elif kind_name == "transcript" and event.get("role") == "assistant" and event.get("is_final"):
                self.assistant_text = event.get("text") or ""
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed.set()
        self.ready.set()
        self.done.set()


async def one_session(url: str, index: int, audio: bytes, timeout: float, text_turn: bool) -> str | None:
    """Run one session; None when it went exactly right, else what went wrong."""
    try:
        async with asyncio.timeout(timeout):
            transport, client = await ws_connect(SoakClient, url, websocket_handshake_timeout=timeout)
            try:
                transport.send(WSMsgType.TEXT, b'{"type":"config","turn_detection":"none"}')
                await client.ready.wait()
                if client.closed.is_set():
                    return f"closed before ready ({client.error})"
                for offset in range(0, len(audio), FRAME_BYTES):
                    transport.send(WSMsgType.BINARY, audio[offset:offset + FRAME_BYTES])
                transport.send(WSMsgType.TEXT, b'{"type":"commit"}')
                transport.send(WSMsgType.TEXT, b'{"type":"create_response"}')
                await client.done.wait()
                if client.status != "completed":
                    return f"response {client.status} ({client.error})"
                if bytes(client.audio) != audio:
                    return f"echo mismatch ({len(client.audio)} of {len(audio)} bytes)"
                if text_turn:  # a text turn as well: the mock answers it with a tone and a transcript
                    client.done.clear()
                    client.audio.clear()
                    transport.send(WSMsgType.TEXT, orjson.dumps({"type": "text", "text": f"soak {index}"}))
                    await client.done.wait()
                    if client.status != "completed" or not client.audio or not client.assistant_text:
                        return f"text turn {client.status} ({len(client.audio)} audio bytes, {client.error})"
                if client.error is not None:
                    return f"error event {client.error}"
            finally:
                if not client.closed.is_set():
                    transport.send_close(WSCloseCode.OK)
                    await client.closed.wait()
    except (TimeoutError, asyncio.TimeoutError):
        return "timeout"
    except OSError as exc:
        return f"connect failed: {exc}"
    return None


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def http_get_json(port: int, path: str, timeout: float = 5.0) -> dict:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        body = await reader.readexactly(int(length[0].split(b":")[1])) if length else await reader.read()
        writer.close()
        return orjson.loads(body)


async def scrape_metrics(port: int, timeout: float = 5.0) -> dict[tuple[str, frozenset], float] | None:
    """GET /metrics parsed to {(sample, labels): value}; None if the node has no /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        body = await reader.readexactly(int(length[0].split(b":")[1])) if length else await reader.read()
        writer.close()
    if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        return None
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


async def wait_sessions_zero(port: int, timeout: float) -> float:
    """Poll /health until it reports 0 sessions (bounded); returns how long that took."""
    started = time.monotonic()
    while True:
        health = await http_get_json(port, "/health")
        if health.get("sessions") == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"sessions still open after {timeout} s: {health}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gateway(port: int, extra: list[str], log) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "gateway", "--upstream", "mock", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "WARNING", *extra],
                            stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT)


async def wait_listening(process: subprocess.Popen, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError("gateway exited during start")
        try:
            await http_get_json(port, "/health", timeout=2)
            return
        except (OSError, TimeoutError, asyncio.TimeoutError, orjson.JSONDecodeError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def soak(args) -> int:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/realtime"
    per_wave = args.sessions // args.waves
    log = tempfile.TemporaryFile()
    process = start_gateway(port, args.gateway_arg or [], log)
    rows = []
    failures: dict[str, int] = {}
    metrics = None
    started = time.monotonic()
    try:
        await wait_listening(process, port)
        base_rss, base_fds = rss_bytes(process.pid), open_fds(process.pid)
        rows.append({"wave": 0, "sessions": 0, "seconds": 0.0, "rate": 0.0, "rss": base_rss,
                     "fds": base_fds, "failed": 0, "settle_s": 0.0})
        print(f"gateway pid {process.pid} on :{port}; baseline RSS {base_rss / MiB:.1f} MiB, {base_fds} fds; "
              f"{args.waves} waves x {per_wave} sessions, concurrency {args.concurrency}", flush=True)
        gate = asyncio.Semaphore(args.concurrency)
        done = 0

        async def bounded(index: int) -> None:
            async with gate:
                problem = await one_session(url, index, turn_audio(index), args.session_timeout,
                                            not args.no_text_turn)
            if problem is not None:
                key = problem.split(" (")[0]
                failures[key] = failures.get(key, 0) + 1
                if sum(failures.values()) <= 5:
                    print(f"  session {index}: {problem}", flush=True)

        for wave in range(1, args.waves + 1):
            wave_started = time.monotonic()
            failed_before = sum(failures.values())
            await asyncio.gather(*(bounded(done + i) for i in range(per_wave)))
            done += per_wave
            elapsed = time.monotonic() - wave_started
            settle = await wait_sessions_zero(port, 30)
            row = {"wave": wave, "sessions": done, "seconds": round(elapsed, 2),
                   "rate": round(per_wave / elapsed, 1), "rss": rss_bytes(process.pid),
                   "fds": open_fds(process.pid), "failed": sum(failures.values()) - failed_before,
                   "settle_s": round(settle, 3)}
            rows.append(row)
            print(f"  wave {wave:3d}: {done:6d} sessions, {row['rate']:7.1f}/s, RSS {row['rss'] / MiB:6.1f} MiB, "
                  f"{row['fds']} fds, {row['failed']} failed", flush=True)
            if process.poll() is not None:
                raise RuntimeError("gateway died")
        metrics = await scrape_metrics(port)
    finally:
        total_s = time.monotonic() - started
        alive = process.poll() is None
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.seek(0)
        gateway_log = log.read().decode(errors="replace")
        log.close()

    return report(args, rows, failures, total_s, alive, gateway_log, metrics)


def report(args, rows, failures, total_s, alive, gateway_log, metrics) -> int:
    base, first, final = rows[0], rows[1], rows[-1]
    half = rows[len(rows) // 2]
    trend_kib_per_1k = ((final["rss"] - half["rss"]) / 1024) / max(1, (final["sessions"] - half["sessions"]) / 1000)
    print()
    print("| after | sessions | RSS MiB | Δ vs wave 1 MiB | open fds | sessions/s | failed |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    step = max(1, (len(rows) - 1) // 10)
    shown = [rows[0]] + rows[1::step] + ([final] if rows[1::step][-1] is not final else [])
    for row in shown:
        label = "baseline (start)" if row["wave"] == 0 else f"wave {row['wave']}"
        delta = "" if row["wave"] == 0 else f"{(row['rss'] - first['rss']) / MiB:+.1f}"
        rate = "" if row["wave"] == 0 else f"{row['rate']:.0f}"
        print(f"| {label} | {row['sessions']:,} | {row['rss'] / MiB:.1f} | {delta} | {row['fds']} | {rate} | "
              f"{'' if row['wave'] == 0 else row['failed']} |")
    checks = {
        "fds back to baseline": abs(final["fds"] - base["fds"]) <= args.fd_tolerance,
        "RSS back to the wave-1 level": final["rss"] - first["rss"] <= args.rss_tolerance_mib * MiB,
        "no RSS growth over the second half": trend_kib_per_1k <= args.max_trend_kib,
        "every session echoed exactly": not failures,
        "gateway alive": alive,
    }
    if metrics is not None:   # the node's own account after the last close
        ended = sum(value for (name, _labels), value in metrics.items() if name == "gateway_sessions_total")
        checks["/metrics: sessions_active and upstream_connections_open at 0"] = (
            metrics.get(("gateway_sessions_active", frozenset())) == 0
            and metrics.get(("gateway_upstream_connections_open", frozenset())) == 0)
        checks[f"/metrics: {final['sessions']:,} sessions ended (counted {ended:,.0f})"] = ended == final["sessions"]
    print()
    print(f"{final['sessions']:,} sessions in {total_s:.0f} s ({final['sessions'] / total_s:.0f}/s incl. settling); "
          f"RSS {base['rss'] / MiB:.1f} MiB at start, {first['rss'] / MiB:.1f} after wave 1, "
          f"{final['rss'] / MiB:.1f} at the end; trend over the second half {trend_kib_per_1k:+.1f} KiB per "
          f"1,000 sessions; fds {base['fds']} -> {final['fds']}")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if failures:
        print(f"  failures: {failures}")
    if not alive or not all(checks.values()):
        print("gateway log (tail):\n" + gateway_log[-3000:])
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps({"args": vars(args), "rows": rows, "failures": failures, "seconds": total_s,
                                   "checks": checks, "trend_kib_per_1k_sessions": trend_kib_per_1k},
                                  option=orjson.OPT_INDENT_2))
    print(f"record: {path.relative_to(ROOT)}")
    return 0 if all(checks.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20_000, help="sessions in all (default 20000)")
    parser.add_argument("--waves", type=int, default=40, help="waves (default 40)")
    parser.add_argument("--concurrency", type=int, default=100, help="sessions open at once (default 100)")
    parser.add_argument("--session-timeout", type=float, default=15.0, help="seconds per session (default 15)")
    parser.add_argument("--no-text-turn", action="store_true", help="skip the text turn after the audio turn")
    parser.add_argument("--rss-tolerance-mib", type=float, default=32.0,
                        help="allowed RSS above the wave-1 level after the last close (default 32)")
    parser.add_argument("--max-trend-kib", type=float, default=1024.0,
                        help="allowed RSS growth per 1,000 sessions over the second half of the waves "
                             "(default 1024, i.e. 1 KiB per session)")
    parser.add_argument("--fd-tolerance", type=int, default=2, help="allowed fds above baseline (default 2)")
    parser.add_argument("--gateway-arg", action="append", metavar="ARG",
                        help="extra flag for the gateway, repeatable (e.g. --gateway-arg=--coalesce-ms=40)")
    args = parser.parse_args()
    if args.waves < 2 or args.sessions < args.waves:
        parser.error("need at least 2 waves and one session per wave")
    return uvloop.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
