"""The `serve` command: run one gateway node on uvloop until SIGINT/SIGTERM.

`--upstream mock` starts the built-in mock upstream in-process on a free 127.0.0.1 port and
points the node at it, so a newcomer needs no API key. Startup is logged; keys never are.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

import orjson
import uvloop

from gateway import config as node_config
from gateway.config import ConfigError, NodeConfig
from gateway.server import GatewayServer

log = logging.getLogger("gateway.node")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    node_config.add_arguments(parser)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(time.time(), 3), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str, fmt: str) -> None:
    """The node's one logger setup (text or JSON lines on stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def start_node(config: NodeConfig):
    """Start the mock (if `--upstream mock` without a URL) and the server. Returns (server, mock)."""
    mock = None
    upstream_url = config.upstream_url
    if config.upstream == "mock" and not upstream_url:
        from gateway.mock import MockOptions, MockRealtimeServer
        mock = MockRealtimeServer(MockOptions(record=False))  # a node runs for days: keep no history
        await mock.start(host="127.0.0.1", port=0)
        upstream_url = mock.url
        log.info("built-in mock upstream listening at %s", mock.url)
    server = GatewayServer(config, upstream_url)
    await server.start()
    return server, mock


async def serve(config: NodeConfig) -> None:
    server, mock = await start_node(config)
    log.info("realtime-gateway listening on %s:%d (/realtime, /health); upstream=%s dialect=%s "
             "default_model=%s", config.host, server.port, config.upstream, config.upstream_dialect,
             config.default_model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: closing %d session(s)", len(server.sessions))
        await server.stop()
        if mock is not None:
            await mock.stop()


def run(args: argparse.Namespace) -> int:
    try:
        config = node_config.from_args(args)
    except ConfigError as exc:
        print(f"realtime-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    log.info("starting with %r", config)
    uvloop.run(serve(config))
    return 0
