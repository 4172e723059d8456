"""Load generator for bench/relay.py: N full-duplex voice sessions from one process.

Run by bench/relay.py as a child pinned to core 1 (next to the upstream); it talks to its parent
over stdout, one JSON object per line:
    {"event": "half_connected", ...} with --await-parent: half of them are (then a line on stdin
                                     lets it go on; so does one after `connected`)
    {"event": "connected", ...}      all sessions are connected (and `ready`, for --protocol relay)
    {"event": "window_start"}        the steady-state measurement window begins (after warmup)
    {"event": "window_end"}          it ends; sessions finish their current 100 ms block and stop
    {"event": "result", ...}         after the drain: counters, round trips, pacing, own CPU
The parent samples the relay's /proc counters when it reads window_start / window_end.

Audio: PCM16 LE mono 24 kHz, 20 ms frames (960 bytes), 50 frames/s per session, paced in real
time by ONE drift-corrected scheduler (tick k is due at t0 + k * tick, never "sleep 20 ms"), with
session start phases spread evenly over the 20 ms frame period (staggered starts).

Content matching: five frames make one 100 ms block (4,800 bytes); the first 8 bytes of every
block are replaced by (block index, session index) as two little-endian uint32, the rest is a
fixed -20 dBFS 440 Hz tone. The round trip of a block is the time from sending the client frame
that COMPLETED it (stamped right after that send) to receiving its last byte back; the block is
identified by the index read from the returned bytes (not by counting), its session tag and
every byte of its body are checked, and every mismatch is counted. Returned audio may be chunked
arbitrarily (each piece is checked at the offset it lands on); the byte stream is what counts.
Text frames after `ready` are counted: the parent expects one (a transcript) per block.
Bytes lost = audio bytes sent - audio bytes received after the drain (must be 0).

TLS: a `wss://` url is verified against `--ca` (certificate and host name; one context for all
sessions); that is the only difference from `ws://`, made at connect time.

Protocols: `relay` (our client protocol: wait for the JSON `ready` text frame before streaming;
text frames afterwards are counted as transcripts/events) and `binary` (nginx pass-through to
the binary echo: no handshake).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import ssl
import struct
import sys
import time
from array import array

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

SAMPLE_RATE = 24000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * 2 * FRAME_MS // 1000  # 960
FRAMES_PER_BLOCK = 5
BLOCK_BYTES = FRAME_BYTES * FRAMES_PER_BLOCK  # 4800 = 100 ms
HEADER = struct.Struct("<II")  # block index, session index
TICKS_PER_FRAME = 10  # scheduler granularity: 2 ms ticks, sessions spread over 10 phase slots
TICK_S = FRAME_MS / 1000 / TICKS_PER_FRAME


def _tone_block() -> bytes:
    """100 ms of a 440 Hz tone at -20 dBFS (amplitude 3277), PCM16 LE."""
    samples = array("h", (int(3277 * math.sin(2 * math.pi * 440 * n / SAMPLE_RATE))
                          for n in range(BLOCK_BYTES // 2)))
    if sys.byteorder != "little":
        samples.byteswap()
    return samples.tobytes()


TEMPLATE = _tone_block()
TEMPLATE_BODY = TEMPLATE[HEADER.size:]


def emit(event: dict) -> None:
    sys.stdout.buffer.write(orjson.dumps(event) + b"\n")
    sys.stdout.buffer.flush()


class Run:
    """State shared by all sessions of one run (the measurement window and the collectors)."""

    def __init__(self, protocol: str):
        self.protocol = protocol
        # perf_counter bounds of the measurement window (inf until it starts)
        self.in_window_start = math.inf
        self.in_window_end = math.inf
        self.window_rtts = array("d")  # seconds, blocks whose completing frame was sent in the window
        self.errors = 0
        self.error_samples: list[str] = []
        self.unexpected_disconnects = 0
        self.mismatches = 0
        self.mismatch_samples: list[str] = []
        self.all_drained = asyncio.Event()
        self.undrained = 0


class LoadSession(WSListener):
    """One client session: sends paced blocks, checks and times the audio that comes back."""

    def __init__(self, run: Run, index: int):
        self.run = run
        self.index = index
        self.transport: WSTransport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.block = bytearray(TEMPLATE)
        self.send_block = 0  # index of the block being sent
        self.send_frame = 0  # next frame within it (0..4)
        self.sent_at = array("d")  # completion time of each block, by block index
        self.sent_bytes = 0
        self.recv_bytes = 0
        self.rx_block = 0  # index of the next block expected back
        self.rx_fill = 0  # bytes of the current returned block seen so far
        self.rx_header = bytearray(HEADER.size)
        self.rx_body_differs = False  # a piece of the current returned block did not match
        self.text_frames = 0
        self.stopping = False
        self.stopped = False
        self.draining = False
        self.closing = False

    # -- sending ---------------------------------------------------------------------------
    def send_next_frame(self) -> None:
        """Send the next 20 ms frame; called by the scheduler once per frame period."""
        if self.stopped:
            return
        if self.send_frame == 0:
            if self.stopping:  # stop on a block boundary so the echo has nothing pending
                self.stopped = True
                return
            HEADER.pack_into(self.block, 0, self.send_block, self.index)
        start = self.send_frame * FRAME_BYTES
        self.transport.send(WSMsgType.BINARY, memoryview(self.block)[start:start + FRAME_BYTES])
        self.sent_bytes += FRAME_BYTES
        self.send_frame += 1
        if self.send_frame == FRAMES_PER_BLOCK:
            # stamped after the send: the slot's other sessions went first, and their sends are
            # not this block's round trip (the tick's own lateness is reported as pacing lag)
            self.sent_at.append(time.perf_counter())
            self.send_frame = 0
            self.send_block += 1

    # -- receiving -------------------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.run.protocol == "binary":
            self.ready.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.BINARY or msg_type is WSMsgType.CONTINUATION:
            self._on_audio(frame.get_payload_as_memoryview(), time.perf_counter())
        elif msg_type is WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if b'"error"' in payload:
                self.run.errors += 1
                if len(self.run.error_samples) < 5:
                    self.run.error_samples.append(payload[:300].decode("utf-8", "replace"))
            elif not self.ready.done():
                if b'"ready"' in payload:
                    self.ready.set_result(None)
            else:
                self.text_frames += 1
        elif msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.stopped = True  # the scheduler must not send on a dead transport
        if not self.closing:
            self.run.unexpected_disconnects += 1
            if not self.ready.done():
                self.ready.set_exception(ConnectionError("disconnected before ready"))
        if self.draining:
            self._drained()

    def _on_audio(self, payload: memoryview, now: float) -> None:
        size = len(payload)
        self.recv_bytes += size
        pos = 0
        while pos < size:
            fill = self.rx_fill
            if fill == 0 and size - pos >= BLOCK_BYTES:
                # Whole block in this chunk (the usual case): check all of it.
                block_index, session_index = HEADER.unpack_from(payload, pos)
                if bytes(payload[pos + HEADER.size:pos + BLOCK_BYTES]) != TEMPLATE_BODY:
                    self._mismatch(f"s{self.index} block {block_index}: body differs")
                self._block_done(block_index, session_index, now)
                pos += BLOCK_BYTES
                continue
            # A piece of a block: keep its header bytes, check its body bytes against the
            # template at the offset they land on (a reordered, repeated or altered piece of
            # a block shows here, whatever the relay's chunking).
            take = min(BLOCK_BYTES - fill, size - pos)
            if fill < HEADER.size:
                head = min(HEADER.size - fill, take)
                self.rx_header[fill:fill + head] = payload[pos:pos + head]
            body_from = max(fill, HEADER.size)
            if fill + take > body_from and \
                    bytes(payload[pos + body_from - fill:pos + take]) != TEMPLATE[body_from:fill + take]:
                self.rx_body_differs = True
            pos += take
            fill += take
            if fill == BLOCK_BYTES:
                block_index, session_index = HEADER.unpack_from(self.rx_header, 0)
                if self.rx_body_differs:
                    self._mismatch(f"s{self.index} block {block_index}: body differs")
                    self.rx_body_differs = False
                self._block_done(block_index, session_index, now)
                fill = 0
            self.rx_fill = fill
        if self.draining and self.recv_bytes >= self.sent_bytes:
            self._drained()

    def _block_done(self, block_index: int, session_index: int, now: float) -> None:
        if block_index != self.rx_block or session_index != self.index:
            self._mismatch(f"s{self.index}: expected block {self.rx_block}, got block {block_index} "
                           f"of session {session_index}")
        if session_index == self.index and block_index < len(self.sent_at):
            sent = self.sent_at[block_index]
            if self.run.in_window_start <= sent < self.run.in_window_end:
                self.run.window_rtts.append(now - sent)
        self.rx_block += 1

    def _mismatch(self, what: str) -> None:
        self.run.mismatches += 1
        if len(self.run.mismatch_samples) < 5:
            self.run.mismatch_samples.append(what)

    def _drained(self) -> None:
        if self.draining:
            self.draining = False
            self.run.undrained -= 1
            if self.run.undrained == 0:
                self.run.all_drained.set()


def percentile(sorted_values, q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def client_tls_context(ca: str) -> ssl.SSLContext:
    """Verifies the relay's certificate chain against `ca` and its name against the url's host
    (PROTOCOL_TLS_CLIENT: CERT_REQUIRED and check_hostname)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    return context


async def connect_all(run: Run, url: str, indices: range, concurrency: int, timeout_s: float,
                      tls: ssl.SSLContext | None):
    """Open the sessions `indices` (at most `concurrency` handshakes in flight); wait for `ready`.
    `tls`: the context of a wss:// url (None for ws://)."""
    gate = asyncio.Semaphore(concurrency)
    failure_samples: list[str] = []

    async def open_one(index: int):
        async with gate:
            try:
                _, session = await ws_connect(lambda: LoadSession(run, index), url, ssl_context=tls,
                                              websocket_handshake_timeout=timeout_s,
                                              read_buffer_init_size=8 * 1024)
                await asyncio.wait_for(session.ready, timeout_s)
                return session
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                if len(failure_samples) < 5:
                    failure_samples.append(f"{type(exc).__name__}: {exc}")
                return None

    results = await asyncio.gather(*(open_one(i) for i in indices))
    sessions = [s for s in results if s is not None]
    return sessions, len(indices) - len(sessions), failure_samples


async def run_load(args) -> dict:
    loop = asyncio.get_running_loop()
    run = Run(args.protocol)
    t_connect = time.perf_counter()
    # --await-parent: open half the sessions, say so, and wait for a line on stdin before the
    # rest (and again once all are ready, before streaming). The parent samples the relay's
    # memory at both points: what the second half adds is memory per session, free of what the
    # relay's allocator kept from its start-up and reuses for the first sessions.
    half = args.sessions // 2 if args.await_parent else 0
    tls = client_tls_context(args.ca) if args.ca else None
    sessions, connect_failures, failure_samples = await connect_all(
        run, args.url, range(half), args.connect_concurrency, args.connect_timeout, tls)
    if args.await_parent:
        emit({"event": "half_connected", "sessions": len(sessions)})
        await loop.run_in_executor(None, sys.stdin.readline)
    rest, rest_failures, rest_samples = await connect_all(
        run, args.url, range(half, args.sessions), args.connect_concurrency, args.connect_timeout, tls)
    sessions += rest
    connect_failures += rest_failures
    failure_samples = (failure_samples + rest_samples)[:5]
    connect_s = time.perf_counter() - t_connect
    emit({"event": "connected", "sessions": len(sessions), "failures": connect_failures,
          "connect_s": round(connect_s, 3)})
    if args.await_parent:
        await loop.run_in_executor(None, sys.stdin.readline)
    if not sessions:
        return {"event": "result", "sessions_ready": 0, "connect_failures": connect_failures,
                "connect_failure_samples": failure_samples}

    gc.collect()
    gc.freeze()
    gc.disable()  # no collector pauses in the paced loop; sessions create no cycles per frame

    # Staggered phases: session i starts at slot i % TICKS_PER_FRAME of the 20 ms period.
    slots: list[list[LoadSession]] = [[] for _ in range(TICKS_PER_FRAME)]
    for i, session in enumerate(sessions):
        slots[i % TICKS_PER_FRAME].append(session)

    window_lags = array("d")
    t0 = time.perf_counter() + 0.05
    window_start = t0 + args.warmup
    window_end = window_start + args.duration
    cpu_start = cpu_end = None
    finished = loop.create_future()
    state = {"tick": 0, "phase": "warmup", "stop_tick": None}

    def on_tick() -> None:
        now = time.perf_counter()
        # Drift correction: run every tick that is due (catching up if late), then schedule the
        # next one against the absolute timeline.
        while True:
            tick = state["tick"]
            due = t0 + tick * TICK_S
            if due > now:
                break
            lag = now - due
            if state["phase"] == "window":
                window_lags.append(lag)
            for session in slots[tick % TICKS_PER_FRAME]:
                session.send_next_frame()
            state["tick"] = tick + 1
            now = time.perf_counter()
        phase_changes(now)
        if not finished.done():
            # The loop's timers have 1 ms resolution: round the delay UP to whole ms, or the
            # timer fires early and the scheduler spins (tens of µs per tick, for nothing).
            delay = t0 + state["tick"] * TICK_S - time.perf_counter()
            loop.call_later(math.ceil(max(delay, 0.0) * 1000) / 1000, on_tick)

    def phase_changes(now: float) -> None:
        nonlocal cpu_start, cpu_end
        if state["phase"] == "warmup" and now >= window_start:
            state["phase"] = "window"
            run.in_window_start = now
            cpu_start = os.times()
            emit({"event": "window_start"})
        elif state["phase"] == "window" and now >= window_end:
            state["phase"] = "stopping"
            run.in_window_end = now
            cpu_end = os.times()
            emit({"event": "window_end"})
            for session in sessions:
                session.stopping = True
        elif state["phase"] == "stopping" and all(s.stopped for s in sessions):
            state["phase"] = "done"
            finished.set_result(now)

    loop.call_at(loop.time() + (t0 - time.perf_counter()), on_tick)
    stop_time = await finished
    window_real = run.in_window_end - run.in_window_start

    # Drain: wait until every session got back everything it sent (or the timeout).
    for session in sessions:
        if session.recv_bytes < session.sent_bytes and not session.transport.is_disconnected:
            session.draining = True
            run.undrained += 1
    if run.undrained:
        try:
            await asyncio.wait_for(run.all_drained.wait(), args.drain_timeout)
        except asyncio.TimeoutError:
            pass
    drain_s = time.perf_counter() - stop_time

    for session in sessions:
        session.closing = True
        if not session.transport.is_disconnected:
            session.transport.send_close()
            session.transport.disconnect()

    cpu_s = (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system)
    rtts = sorted(run.window_rtts)
    lag_sorted = sorted(window_lags)
    sent = sum(s.sent_bytes for s in sessions)
    received = sum(s.recv_bytes for s in sessions)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {
        "event": "result",
        "sessions_ready": len(sessions),
        "connect_failures": connect_failures,
        "connect_failure_samples": failure_samples,
        "connect_s": round(connect_s, 3),
        "window_s": round(window_real, 3),
        "sent_bytes": sent,
        "received_bytes": received,
        "lost_bytes": sent - received,
        "sessions_short": sum(1 for s in sessions if s.recv_bytes < s.sent_bytes),
        "drain_s": round(drain_s, 3),
        "blocks_timed": len(rtts),
        "rtt_ms": {"p50": ms(percentile(rtts, 50)), "p90": ms(percentile(rtts, 90)),
                   "p99": ms(percentile(rtts, 99)), "max": ms(rtts[-1] if rtts else None)},
        "content_mismatches": run.mismatches,
        "mismatch_samples": run.mismatch_samples,
        "blocks_received": sum(s.rx_block for s in sessions),
        "text_frames": sum(s.text_frames for s in sessions),
        "errors": run.errors,
        "error_samples": run.error_samples,
        "unexpected_disconnects": run.unexpected_disconnects,
        "pacing_lag_ms": {"p50": ms(percentile(lag_sorted, 50)), "p99": ms(percentile(lag_sorted, 99)),
                          "max": ms(lag_sorted[-1] if lag_sorted else None)},
        "loadgen_cpu_pct": round(100 * cpu_s / window_real, 1) if window_real > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="ws:// or wss://host:port/path of the relay under test")
    parser.add_argument("--ca", default=None,
                        help="PEM file of the CAs a wss:// relay's certificate is verified against")
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--protocol", choices=("relay", "binary"), default="relay")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of streaming before the window")
    parser.add_argument("--duration", type=float, default=15.0, help="steady-state window, seconds")
    parser.add_argument("--drain-timeout", type=float, default=5.0, help="seconds to wait for the echo tail")
    parser.add_argument("--connect-timeout", type=float, default=20.0, help="per-session handshake + ready")
    parser.add_argument("--connect-concurrency", type=int, default=32)
    parser.add_argument("--await-parent", action="store_true",
                        help="wait for a line on stdin after `half_connected` and after `connected`")
    args = parser.parse_args()
    if args.url.startswith("wss://") != bool(args.ca):
        parser.error("--ca goes with a wss:// url, and a wss:// url needs --ca")
    result = uvloop.run(run_load(args))
    emit(result)


if __name__ == "__main__":
    main()
