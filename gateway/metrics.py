"""`GatewayMetrics`: the node's Prometheus metrics, rendered for ``GET /metrics``.

Cost model (measured, CPython 3.11, prometheus-client 0.26): ``Counter.inc()`` on a resolved child
costs ~0.26 us in-process and ~0.8 us in multiprocess mode (lock + mmap write); with a ``.labels()``
lookup ~1.0 / ~1.6 us; ``Histogram.observe()`` ~0.7 / ~1.8 us. Two counters per audio frame in each
direction would cost more than the fast path's encode itself. So the hot path never touches
prometheus objects: each session owns a `SessionStats` (plain int attributes, ~15 ns per ``+=``)
and the session increments those; `GatewayMetrics.flush`
adds the differences since the last flush to the counters. Call `flush(stats)` periodically (e.g. on
a 1 s timer or with the level interval) and `session_closed(stats, outcome)` once at the end (which
flushes too). Rare events (errors, drops, refusals, latencies) go straight to their metric.

Multi-worker. With ``--workers N`` every worker process writes its figures to
``multiprocess_dir`` (prometheus-client multiprocess mode, mmap files per pid) and `render()` in
any worker sums all workers' files: counters and histograms add up; the gauges use ``livesum``
(only live processes count, see `mark_worker_dead`). The master calls `prepare_multiprocess_dir`
before forking and `mark_worker_dead(pid)` when it reaps a worker. Multiprocess mode is
process-wide in prometheus-client: one process uses one mode, one directory and one GatewayMetrics.

Label values are closed sets (constants below), pre-created at start so every series exists at 0
and no child is created lazily; an unknown value is counted under ``other`` instead of failing.
"""
from __future__ import annotations

import glob
import os
import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from _fastpath import DBFS_FLOOR
from gateway.errors import ERROR_TABLE

C2U, U2C = "client_to_upstream", "upstream_to_client"
DIRECTIONS = (C2U, U2C)
KINDS = ("audio", "json")
#: how a session ended (`session_closed`)
SESSION_OUTCOMES = ("completed", "client_disconnected", "upstream_failed", "upstream_auth_failed",
                    "expired", "idle_timeout", "max_duration", "slow_client", "client_unresponsive", "drained",
                    "error", "other")
#: why audio was discarded (`count_drop`)
DROP_REASONS = ("slow_client", "pre_ready_overflow", "interrupted", "upstream_closed", "other")
#: why an upgrade was refused (`count_refusal`): auth, origin, or a `LimitRefusal.scope`
REFUSAL_REASONS = ("auth", "origin", "global", "key", "ip", "draining", "overloaded", "other")
ERROR_CODES = (*ERROR_TABLE, "other")
#: which audio a level belongs to (`observe_level`)
LEVEL_STREAMS = ("input", "output")

CONNECT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FIRST_AUDIO_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: level histogram buckets in dB below full scale (= -dBFS; Prometheus histograms want values >= 0)
LEVEL_BUCKETS_DB_BELOW_FS = (1.0, 3.0, 6.0, 12.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 120.0)
BUFFER_BUCKETS_BYTES = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
#: digital silence (-inf dBFS; the meters read it as their floor, DBFS_FLOOR) is recorded as
#: this many dB below full scale, so histogram sums stay finite
SILENCE_DB_BELOW_FS = 120.0

#: SessionStats counter fields, in the order of `GatewayMetrics._traffic` (direction, kind, unit)
_TRAFFIC_FIELDS = (
    ("c2u_audio_frames", C2U, "audio", "frames"), ("c2u_audio_bytes", C2U, "audio", "bytes"),
    ("c2u_json_frames", C2U, "json", "frames"), ("c2u_json_bytes", C2U, "json", "bytes"),
    ("u2c_audio_frames", U2C, "audio", "frames"), ("u2c_audio_bytes", U2C, "audio", "bytes"),
    ("u2c_json_frames", U2C, "json", "frames"), ("u2c_json_bytes", U2C, "json", "bytes"),
)
_TRAFFIC_NAMES = tuple(name for name, *_rest in _TRAFFIC_FIELDS)


class PathCounters:
    """The counters of what a session's `AudioPath` moves, until the session attaches that path
    (which has the same ones, as C integers its hot path adds to without calling Python)."""

    __slots__ = ("c2u_audio_frames", "c2u_audio_bytes", "u2c_audio_frames", "u2c_audio_bytes",
                 "u2c_json_frames", "u2c_json_bytes")

    def __init__(self) -> None:
        self.c2u_audio_frames = self.c2u_audio_bytes = self.u2c_audio_frames = self.u2c_audio_bytes = 0
        self.u2c_json_frames = self.u2c_json_bytes = 0


def _path_counter(name: str) -> property:
    return property(lambda stats: getattr(stats.path, name),
                    lambda stats, value: setattr(stats.path, name, value),
                    doc=f"``{name}``, kept by ``path`` (the session's audio path)")


class SessionStats:
    """One session's traffic figures as plain ints: the session does ``stats.c2u_json_frames += 1``.

    Counters (monotonic; the session only ever adds):
      ``c2u_*``: messages received from the client (``audio`` = binary frames, bytes = PCM bytes;
      ``json`` = text messages, bytes = message bytes; ``other`` = frames that are no message
      yet or ever: pings, pongs, fragments, only a sign of life and not flushed). ``u2c_*``:
      upstream messages for the client (``audio`` = audio deltas, bytes = decoded PCM bytes;
      ``json`` = other events, bytes = frame bytes). The ``audio`` and ``u2c_json`` counters live
      in ``path`` (`PathCounters`, replaced by the session's `AudioPath` before any traffic) and
      read and write through to it.
    Levels (set, not added): ``c2u_buffered_bytes`` = client audio waiting for `ready` (the
      coalescer's few ms are not counted), ``u2c_buffered_bytes`` = bytes queued towards the client; flushes turn
      them into the ``gateway_buffered_bytes`` gauge. Their peaks (``*_buffered_peak``) are kept
      where the queues grow too: a queue that lives less than a second between two flushes counts.
    Owned by one session on one event loop; `GatewayMetrics` reads it only in `flush`.
    """

    __slots__ = ("path", "c2u_json_frames", "c2u_json_bytes", "c2u_other_frames",
                 "c2u_buffered_bytes", "u2c_buffered_bytes", "c2u_buffered_peak", "u2c_buffered_peak",
                 "_flushed", "_buffered_reported", "_upstream_open", "closed")

    c2u_audio_frames = _path_counter("c2u_audio_frames")
    c2u_audio_bytes = _path_counter("c2u_audio_bytes")
    u2c_audio_frames = _path_counter("u2c_audio_frames")
    u2c_audio_bytes = _path_counter("u2c_audio_bytes")
    u2c_json_frames = _path_counter("u2c_json_frames")
    u2c_json_bytes = _path_counter("u2c_json_bytes")

    def __init__(self) -> None:
        self.path = PathCounters()
        self.c2u_json_frames = self.c2u_json_bytes = 0
        self.c2u_other_frames = 0
        self.c2u_buffered_bytes = self.u2c_buffered_bytes = 0
        self.c2u_buffered_peak = self.u2c_buffered_peak = 0
        self._flushed = [0] * len(_TRAFFIC_FIELDS)
        self._buffered_reported = [0, 0]
        self._upstream_open = False
        self.closed = False

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)}" for name, *_ in _TRAFFIC_FIELDS)
        return f"SessionStats({shown}, closed={self.closed})"


_multiprocess_dir_in_use: str | None = None


def _enter_multiprocess_mode(directory: str) -> None:
    """Switch this process's prometheus-client to mmap-backed values in `directory` (once)."""
    global _multiprocess_dir_in_use
    directory = os.path.abspath(directory)
    if _multiprocess_dir_in_use is not None:
        if _multiprocess_dir_in_use != directory:
            raise ValueError(f"this process already writes metrics to {_multiprocess_dir_in_use}")
        return
    if not os.path.isdir(directory):
        raise ValueError(f"metrics multiprocess dir {directory} is not a directory")
    # prometheus-client picks its value class at import time from this variable and reads the
    # directory from it whenever a value file is (re)opened, e.g. after a fork.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    _multiprocess_dir_in_use = directory


def prepare_multiprocess_dir(directory: str) -> None:
    """Create `directory` and delete stale value files of an earlier run (master, before forking)."""
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


def mark_worker_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges (sessions active etc.); its counters keep counting."""
    mark_process_dead(pid, directory)


def render_multiprocess(directory: str, accept: str | None = None) -> tuple[bytes, str]:
    """Exposition of the sum of every worker's files in `directory` (no mode switch needed)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    encode, content_type = _encoder(accept)
    return encode(registry), content_type


def _encoder(accept: str | None):
    """prometheus_client's exposition for a scrape's Accept header. It raises on a version it
    cannot compare (`text/plain;version=abc`: TypeError), and anyone may send one: such a scrape
    gets the default text format, as one with no Accept does."""
    try:
        return choose_encoder(accept or "")
    except (TypeError, ValueError):
        return choose_encoder("")


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _open_fds() -> int:
    """This process's open file descriptors. Linux 6.2 and later give the count as the size of
    /proc/self/fd (~3 µs); listing it instead takes ~4 ms at 5,000 sockets, a stall of the loop."""
    count = os.stat("/proc/self/fd").st_size
    return count if count > 0 else len(os.listdir("/proc/self/fd")) - 1  # less the listing's own


class GatewayMetrics:
    """Every metric of a node, in its own registry (fresh per instance; tests make their own).

    `multiprocess_dir`: with ``--workers N``, the shared directory every worker writes to; None for
    a single process. Methods never raise on an unknown label value (counted as ``other``).
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = os.path.abspath(multiprocess_dir) if multiprocess_dir else None
        if self.multiprocess_dir is not None:
            _enter_multiprocess_mode(self.multiprocess_dir)
        elif _multiprocess_dir_in_use is not None:
            raise ValueError("this process is in multiprocess metrics mode; pass its multiprocess_dir")
        # `_created` timestamp series double the scrape size and say nothing useful here (the
        # multiprocess collector never emits them either, so both modes render the same series).
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=reg, multiprocess_mode="livesum")

        self.sessions_active = gauge("gateway_sessions_active", "Client sessions open now")
        self.sessions_total = Counter("gateway_sessions", "Client sessions ended, by outcome",
                                      ["outcome"], registry=reg)
        self.frames_total = Counter(
            "gateway_frames", "Messages received to relay, by direction and kind: client messages; upstream "
            "audio deltas and other upstream events", ["direction", "kind"], registry=reg)
        self.bytes_total = Counter(
            "gateway_bytes", "Bytes of those messages: audio in the session's format (PCM16 or G.711, "
            "decoded from base64 upstream), JSON as received", ["direction", "kind"], registry=reg)
        self.upstream_connect_seconds = Histogram(
            "gateway_upstream_connect_seconds", "Time to open an upstream session (until session.created)",
            registry=reg, buckets=CONNECT_BUCKETS_S)
        self.first_audio_seconds = Histogram(
            "gateway_first_audio_seconds", "From the end of the user's turn to the first reply audio sent",
            registry=reg, buckets=FIRST_AUDIO_BUCKETS_S)
        self.errors_total = Counter("gateway_errors", "Error events sent to clients, by wire code",
                                    ["code"], registry=reg)
        self.audio_level = Histogram(
            "gateway_audio_rms_db_below_full_scale",
            "Audio RMS level in dB below full scale (-dBFS): 0 = full scale, 120 = digital silence; "
            "every session, once a second (per --level-interval-ms for clients that asked for level events)",
            ["stream"], registry=reg, buckets=LEVEL_BUCKETS_DB_BELOW_FS)
        self.buffered_bytes = gauge("gateway_buffered_bytes", "Audio bytes queued now, by direction",
                                    ("direction",))
        self.session_peak_buffered_bytes = Histogram(
            "gateway_session_peak_buffered_bytes", "Largest queue a session held",
            ["direction"], registry=reg, buckets=BUFFER_BUCKETS_BYTES)
        self.drops_total = Counter("gateway_drops", "Audio chunks discarded, by reason", ["reason"], registry=reg)
        self.dropped_bytes_total = Counter("gateway_dropped_bytes", "Audio bytes discarded, by reason",
                                           ["reason"], registry=reg)
        self.upstream_open = gauge("gateway_upstream_connections_open", "Upstream connections open now")
        tls_handshakes = Counter(
            "gateway_upstream_tls_handshakes", "TLS handshakes of wss:// upstream connections the upstream accepted, by "
            "whether they resumed an earlier session (no: a full handshake, the certificate chain verified)", ["resumed"],
            registry=reg)
        self._tls_handshakes = {True: tls_handshakes.labels("yes"), False: tls_handshakes.labels("no")}
        self.direct_read_frames = Counter(
            "gateway_direct_read_frames", "Frames the compiled reader read and relayed itself "
            "(--direct-reads; the rest go through picows)", registry=reg)
        self.direct_read_sockets = gauge("gateway_direct_read_sockets",
                                         "Sockets the compiled reader reads now (--direct-reads)")
        self._reader_frames_seen = 0
        self.refusals_total = Counter("gateway_refusals", "Upgrades refused, by reason", ["reason"], registry=reg)
        self.workers = gauge("gateway_workers", "Live worker processes (1 per process, summed)")
        self.loop_lag = Gauge("gateway_event_loop_lag_seconds", "How late the once-a-second sweep ran, "
                              "the latest (the worst of the workers): the event loop's backlog",
                              registry=reg, multiprocess_mode="livemax")
        self.workers.set(1)
        # the process's own, named as prometheus-client's ProcessCollector names them (it cannot be
        # used with --workers): with workers, one series per worker (a `pid` label), as that
        # collector gives one per process, so that open / max is each worker's own headroom
        def per_process(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=reg, multiprocess_mode="liveall")

        self.open_fds = per_process("process_open_fds", "Open file descriptors (sockets: 2 per session, 3 with "
                                    "the built-in mock)")
        self.max_fds = per_process("process_max_fds", "The limit on open file descriptors")
        self.resident_memory = per_process("process_resident_memory_bytes", "Resident memory")
        self.cpu_seconds = Counter("process_cpu_seconds", "CPU time, user and system (of every worker, summed)",
                                   registry=reg)
        self._cpu_seen = 0.0
        self.observe_process()  # a worker's series has its figures from its start, not 0

        # Children resolved once: flush/observe never look labels up.
        self._traffic = [(self.frames_total if unit == "frames" else self.bytes_total).labels(direction, kind)
                         for _name, direction, kind, unit in _TRAFFIC_FIELDS]
        self._outcomes = {outcome: self.sessions_total.labels(outcome) for outcome in SESSION_OUTCOMES}
        self._errors = {code: self.errors_total.labels(code) for code in ERROR_CODES}
        self._levels = {stream: self.audio_level.labels(stream) for stream in LEVEL_STREAMS}
        self._buffered = [self.buffered_bytes.labels(direction) for direction in DIRECTIONS]
        self._peaks = [self.session_peak_buffered_bytes.labels(direction) for direction in DIRECTIONS]
        self._drops = {reason: (self.drops_total.labels(reason), self.dropped_bytes_total.labels(reason))
                       for reason in DROP_REASONS}
        self._refusals = {reason: self.refusals_total.labels(reason) for reason in REFUSAL_REASONS}

    def observe_process(self) -> None:
        """Update the process_* metrics (the open files and memory from /proc, where there is one)."""
        self.max_fds.set(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        times = os.times()
        cpu = times.user + times.system
        self.cpu_seconds.inc(max(0.0, cpu - self._cpu_seen))
        self._cpu_seen = cpu
        try:
            with open("/proc/self/statm", "rb") as statm:
                self.resident_memory.set(int(statm.read().split()[1]) * _PAGE_BYTES)
            self.open_fds.set(_open_fds())
        except (OSError, ValueError, IndexError):
            pass

    # -- sessions ---------------------------------------------------------------------------

    def session_opened(self) -> SessionStats:
        """A session started: sessions_active + 1. Returns the stats object the session fills."""
        self.sessions_active.inc()
        return SessionStats()

    def flush(self, stats: SessionStats) -> None:
        """Add `stats`' traffic since the last flush to the counters; update buffer gauges/peaks."""
        flushed = stats._flushed
        for index, name in enumerate(_TRAFFIC_NAMES):
            delta = getattr(stats, name) - flushed[index]
            if delta:
                self._traffic[index].inc(delta)
                flushed[index] += delta
        for index, current in enumerate((stats.c2u_buffered_bytes, stats.u2c_buffered_bytes)):
            delta = current - stats._buffered_reported[index]
            if delta:
                self._buffered[index].inc(delta)
                stats._buffered_reported[index] = current
        stats.c2u_buffered_peak = max(stats.c2u_buffered_peak, stats.c2u_buffered_bytes)
        stats.u2c_buffered_peak = max(stats.u2c_buffered_peak, stats.u2c_buffered_bytes)

    def session_closed(self, stats: SessionStats, outcome: str) -> bool:
        """A session ended: final flush, its queued bytes and upstream leave the gauges,
        sessions_active - 1, sessions_total{outcome} + 1. Idempotent: True only the first time."""
        if stats.closed:
            return False
        self.flush(stats)
        stats.closed = True
        for index in (0, 1):
            if stats._buffered_reported[index]:
                self._buffered[index].dec(stats._buffered_reported[index])
                stats._buffered_reported[index] = 0
        self._peaks[0].observe(stats.c2u_buffered_peak)
        self._peaks[1].observe(stats.u2c_buffered_peak)
        self.upstream_closed(stats)
        self.sessions_active.dec()
        self._outcomes.get(outcome, self._outcomes["other"]).inc()
        return True

    # -- upstream ---------------------------------------------------------------------------

    def upstream_opened(self, stats: SessionStats, tls_resumed: bool | None = None) -> None:
        """The session's upstream is connected (once per connection; a re-open after
        `upstream_closed` counts again); over wss://, whether its TLS handshake resumed."""
        if not stats._upstream_open:
            stats._upstream_open = True
            self.upstream_open.inc()
            if tls_resumed is not None:
                self._tls_handshakes[tls_resumed].inc()

    def observe_upstream_connect(self, seconds: float) -> None:
        """An upstream session exists: `seconds` from the start of its TCP connect to its
        `session.created` (the whole wait a client's `ready` depends on, not just the handshake)."""
        self.upstream_connect_seconds.observe(seconds)

    def upstream_closed(self, stats: SessionStats) -> None:
        """The session's upstream connection is gone (idempotent)."""
        if stats._upstream_open:
            stats._upstream_open = False
            self.upstream_open.dec()

    # -- the direct reader ------------------------------------------------------------------

    def observe_reader(self, frames: int, attached: int) -> None:
        """The reader's lifetime frame count and attached sockets, sampled (per sweep and
        scrape): the counter advances by what is new since the last sample."""
        if frames < self._reader_frames_seen:  # a new reader (the server was restarted)
            self._reader_frames_seen = 0
        if frames > self._reader_frames_seen:
            self.direct_read_frames.inc(frames - self._reader_frames_seen)
            self._reader_frames_seen = frames
        self.direct_read_sockets.set(attached)

    # -- events -----------------------------------------------------------------------------

    def observe_first_audio(self, seconds: float) -> None:
        """Turn end (speech_stopped / commit / response request) to the first reply audio sent."""
        self.first_audio_seconds.observe(seconds)

    def observe_level(self, stream: str, rms_dbfs: float) -> None:
        """One RMS level (dBFS, <= 0; -inf for silence) of ``input`` or ``output`` audio.
        Call it per level interval or per coalesced chunk, not per frame."""
        child = self._levels.get(stream)
        if child is not None:
            # recorded as -dBFS, 0 at most; the meters' floor, -inf and NaN (no samples) are silence
            child.observe(-rms_dbfs if DBFS_FLOOR < rms_dbfs <= 0.0 else (0.0 if rms_dbfs > 0.0 else SILENCE_DB_BELOW_FS))

    def count_error(self, code: str) -> None:
        """An `error` event with this wire code was sent to a client."""
        self._errors.get(code, self._errors["other"]).inc()

    def count_drop(self, reason: str, nbytes: int) -> None:
        """`nbytes` of audio (one chunk) were discarded for `reason` (see DROP_REASONS)."""
        chunks, dropped = self._drops.get(reason, self._drops["other"])
        chunks.inc()
        dropped.inc(nbytes)

    def count_refusal(self, reason: str) -> None:
        """An upgrade was refused: ``auth``, ``origin``, ``draining`` or a `LimitRefusal.scope`."""
        self._refusals.get(reason, self._refusals["other"]).inc()

    # -- exposition -------------------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """``(body, content_type)`` for ``GET /metrics``, summed over all workers in multiprocess
        mode. `accept` is the request's Accept header: Prometheus' text format 0.0.4 by default,
        OpenMetrics or text 1.0.0 when the scraper asks for them."""
        if self.multiprocess_dir is not None:
            return render_multiprocess(self.multiprocess_dir, accept)
        encode, content_type = _encoder(accept)
        return encode(self.registry), content_type

