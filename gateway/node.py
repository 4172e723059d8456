"""The `serve` command: run a gateway node on uvloop until SIGINT/SIGTERM, which drain it;
SIGHUP re-reads `--api-keys-file`, the TLS certificate and a wss:// upstream's trusted CAs
(`GatewayServer.reload`).

`--upstream mock` starts the built-in mock upstream in-process on a free 127.0.0.1 port and
points the node at it, so a newcomer needs no API key. `--workers N` runs N such processes on one
port (see gateway.workers). Startup is logged; keys and tokens never are.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile

import orjson
import uvloop

import _fastpath

from gateway import config as node_config
from gateway import sockets
from gateway.config import ConfigError, NodeConfig
from gateway.metrics import GatewayMetrics
from gateway.server import GatewayServer
from gateway.workers import CANNOT_START, supervise

log = logging.getLogger("gateway.node")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    node_config.add_arguments(parser)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line. Session log lines (`"session %s: ..."`) also carry their session
    id as a field, so a log pipeline can follow one call."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if isinstance(record.msg, str) and record.msg.startswith("session %s") and record.args:
            entry["session_id"] = record.args[0]
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class _TextFormatter(logging.Formatter):
    """One line per event: a message quoting what a client chose (an upstream error repeats a
    client's item or call id) has its line breaks and other control characters escaped, so no
    client can write a line of its own into the log. A traceback keeps its lines."""

    _ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7f)}
    _ESCAPES.update({0x0a: "\\n", 0x0d: "\\r", 0x09: "\\t"})

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(self._ESCAPES)
        return super().formatMessage(record)


def setup_logging(level: str, fmt: str) -> None:
    """The node's one logger setup (text or JSON lines on stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # picows logs every connection at INFO and raw handshake bytes (client tokens, the upstream
    # Authorization header) below DEBUG: keep it to warnings, or INFO when debugging
    logging.getLogger("picows").setLevel(logging.INFO if level == "DEBUG" else logging.WARNING)


class StartupError(Exception):
    """The node could not start (a setting only checkable at start, or the address); the
    message is safe to print."""


async def start_node(config: NodeConfig, metrics_dir: str | None = None, reuse_port: bool = False):
    """Start the mock (if `--upstream mock` without a URL) and the server. Returns (server, mock).
    What stops it from starting (API keys, JWT secret, origins; the address) is a StartupError."""
    try:
        return await _start_node(config, metrics_dir, reuse_port)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None


async def _start_node(config: NodeConfig, metrics_dir: str | None, reuse_port: bool):
    mock = None
    upstream_url = config.upstream_url
    if config.upstream == "mock" and not upstream_url:
        from gateway.mock import MockOptions, MockRealtimeServer
        mock = MockRealtimeServer(MockOptions(record=False))  # a node runs for days: keep no history
        await mock.start(host="127.0.0.1", port=0)
        upstream_url = mock.url
        log.info("built-in mock upstream listening at %s", mock.url)
    # workers share one directory: their metrics files, and their session counts for the limits
    server = GatewayServer(config, upstream_url, GatewayMetrics(multiprocess_dir=metrics_dir), shared_dir=metrics_dir)
    await server.start(reuse_port=reuse_port)
    return server, mock


async def serve(config: NodeConfig, metrics_dir: str | None = None, reuse_port: bool = False) -> None:
    server, mock = await start_node(config, metrics_dir, reuse_port)
    warning = server.authenticator.auth_warning(config.host)
    if warning:
        log.warning(warning)
    log.info("realtime-gateway listening on %s://%s:%d (/realtime, /health, /ready, /metrics); upstream=%s "
             "dialect=%s default_model=%s auth=%s", "wss" if server.tls else "ws", config.host, server.port,
             config.upstream, config.upstream_dialect, config.default_model,
             "on" if server.authenticator.enabled else "off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)  # a reload, never a stop: calls go on
    try:
        await stop.wait()
        log.info("stop requested: draining %d session(s) for up to %g s", len(server.sessions),
                 config.drain_timeout_s)
        await server.drain()
    finally:
        await server.stop()
        if mock is not None:
            await mock.stop()
        log.info("stopped")


def run(args: argparse.Namespace) -> int:
    try:
        config = node_config.from_args(args)
    except ConfigError as exc:
        print(f"realtime-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    log.info("starting with %r", config)
    check_open_files(config)  # before the workers start: they inherit the limit
    check_fastpath()
    # SIGHUP means "reload" once the node runs (serve, supervise); while it starts, the keys file
    # is being read anyway, and the default action would kill it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if config.workers == 1:
        try:
            uvloop.run(serve(config))
        except StartupError as exc:
            if config.log_format == "json":  # the log's own shape, for whatever reads it
                log.error("cannot start: %s", exc)
            else:
                print(f"realtime-gateway: {exc}", file=sys.stderr)
            return 2
        return 0
    remove_orphaned_metrics_dirs()
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    try:
        return supervise(lambda _slot: _run_worker(config, metrics_dir), config.workers, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


#: the sessions per process below which the open files limit is worth a warning, --max-sessions
#: unset: the node is sized for thousands per core
FEW_SESSIONS = 1000


def check_open_files(config: NodeConfig) -> None:
    """Raise the open files limit (`sockets.raise_open_files_limit`) and say what room it leaves;
    a warning when that is fewer sessions than --max-sessions admits or, unset, than FEW_SESSIONS
    per process."""
    before, limit = sockets.raise_open_files_limit()
    per_session = 3 if config.upstream == "mock" and not config.upstream_url else 2  # the mock's end too
    room = max(0, limit - sockets.RESERVED_FDS) // per_session
    raised = f" (raised from {before})" if limit != before else ""
    if config.max_sessions > room * config.workers or (not config.max_sessions and room < FEW_SESSIONS):
        wanted = f"--max-sessions {config.max_sessions}" if config.max_sessions else "thousands"
        log.warning("the open files limit, %d%s, leaves room for ~%d sessions per process (%d sockets each), "
                    "not %s: more are refused or fail to reach the upstream; raise it (ulimit -n, systemd "
                    "LimitNOFILE=)", limit, raised, room, per_session, wanted)
    else:
        log.info("open files limit %d%s: room for ~%d sessions per process", limit, raised, room)


def check_fastpath() -> None:
    """Say which audio fast path the node runs. The pure twin costs about twice the CPU per
    session (bench/README.md), so a node that fell back to it without being asked (an install
    that did not build the extension, a start from a source tree, an extension built against
    another picows) warns, with the reason."""
    if _fastpath.IMPLEMENTATION == "compiled":
        log.info("audio fast path: compiled")
    elif _fastpath.NO_EXTENSIONS:
        log.info("audio fast path: the pure-Python twin (GATEWAY_NO_EXTENSIONS is set)")
    else:
        log.warning("the compiled audio fast path did not load (%s): running its pure-Python twin, at about "
                    "twice the CPU per session; reinstall with `pip install .` where a C compiler is present",
                    _fastpath.COMPILED_IMPORT_ERROR)


#: the workers' shared metrics directory, named after the supervisor that removes it as it stops
METRICS_DIR_PREFIX = "realtime-gateway-metrics-"


def remove_orphaned_metrics_dirs(parent: str | None = None) -> list[str]:
    """Remove the metrics directories of supervisors that are gone without removing theirs (a
    SIGKILL, an OOM kill): each would stay in /tmp for good. Only this user's, and only those
    whose supervisor's pid no process has (one that another process has since is kept)."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for name in os.listdir(parent):
        pid_text, named, _ = name[len(METRICS_DIR_PREFIX):].partition("-")
        if not name.startswith(METRICS_DIR_PREFIX) or not named or not pid_text.isdigit():
            continue  # (mkdtemp's own suffix has no "-")
        path = os.path.join(parent, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)  # raises when no process has the pid
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except OSError:  # gone meanwhile, or a pid of another user's process: alive
            continue
    return removed


def _run_worker(config: NodeConfig, metrics_dir: str) -> int:
    log.info("worker pid %d", os.getpid())
    try:
        uvloop.run(serve(config, metrics_dir=metrics_dir, reuse_port=True))
    except StartupError as exc:
        log.error("worker cannot start: %s", exc)
        return CANNOT_START  # the supervisor stops: a replacement would fail the same way
    return 0
