"""Shared pieces of the relay's end-to-end tests: a gateway in front of a mock upstream (both
in-process, real sockets on 127.0.0.1), a scripted upstream for the unusual things the mock does
not do, a recording test client, and test audio."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
import websockets

from gateway.config import NodeConfig
from gateway.mock import MockOptions, MockRealtimeServer
from gateway.mock.schema import default_config, render_session
from gateway.server import GatewayServer

TEST_KEY = "test-key-1"
RATE = 24000
BYTES_PER_MS = 48
#: the GA session object a scripted upstream announces
SESSION = render_session(default_config("gpt-realtime", "sess_scripted", 1999999999), "ga")


@contextlib.asynccontextmanager
async def relay(mock_options: MockOptions | None = None, *, upstream_tls: ssl.SSLContext | None = None,
                **node_fields: Any):
    """A mock upstream (accepting only TEST_KEY; wss:// with `upstream_tls`, a server context) and
    a gateway pointed at it. Yields (gateway, mock)."""
    options = mock_options or MockOptions()
    if options.api_keys is None:
        options = dataclasses.replace(options, api_keys={TEST_KEY})
    mock = MockRealtimeServer(options)
    await mock.start(host="127.0.0.1", port=0, tls=upstream_tls)
    fields = {"host": "127.0.0.1", "port": 0, "upstream": "openai", "upstream_url": mock.url,
              "api_key": TEST_KEY, "connect_timeout_s": 3.0}
    fields.update(node_fields)
    gateway = GatewayServer(NodeConfig(**fields))
    await gateway.start()
    try:
        yield gateway, mock
    finally:
        await gateway.stop()
        await mock.stop()


class ScriptedUpstream:
    """One upstream connection at a time, speaking the reference's GA shapes: `session.created`
    on connect (`created_after_s` later: the real one takes its time), then `script(self)`."""

    def __init__(self, script: Callable[["ScriptedUpstream"], Awaitable[None]], created_after_s: float = 0.0,
                 created: dict | None = None) -> None:
        self.script = script
        self.created_after_s = created_after_s
        self.created = SESSION if created is None else created  # the `session` of session.created
        self.received: list[dict] = []
        self._ws = None
        self._server = None

    async def __aenter__(self) -> str:
        async def serve(ws) -> None:
            self._ws = ws
            if self.created_after_s:
                await asyncio.sleep(self.created_after_s)  # the scenario's upstream latency
            await self.send({"type": "session.created", "session": self.created})
            await self.script(self)
            await ws.wait_closed()
        self._server = await websockets.serve(serve, "127.0.0.1", 0)
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1/realtime"

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def send(self, event: dict) -> None:
        await self._ws.send(orjson.dumps({"event_id": f"event_{len(self.received)}", **event}).decode())

    async def receive(self, type_: str) -> dict:
        """The next client event of `type_` (appends and others are recorded and skipped)."""
        async for message in self._ws:
            event = orjson.loads(message)
            self.received.append(event)
            if event.get("type") == type_:
                return event
        raise AssertionError(f"connection closed before {type_}")

    async def updated(self) -> None:
        await self.send({"type": "session.updated", "session": SESSION})

    async def hang_up(self) -> None:
        """Close the connection as a failing upstream does (1011)."""
        await self._ws.close(1011, "scripted failure")

    async def refuse(self, event_id: str | None, message: str, *, code: str | None = "invalid_value",
                     param: str | None = "session.audio.output.voice") -> None:
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": code, "param": param,
                                                    "message": message, "event_id": event_id}})


class RelayClient:
    """A websockets client that records every gateway message.

    `events` are the JSON messages in order; `audio` all binary bytes in order; each event gets
    `_audio_before` = how many audio bytes had arrived before it (order is the socket's order).
    """

    def __init__(self, ws) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.audio = bytearray()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self._changed = asyncio.Condition()
        self._taken: set[int] = set()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, url: str) -> "RelayClient":
        ws = await websockets.connect(url, max_size=None, compression=None)
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.audio += message
                else:
                    event = orjson.loads(message)
                    event["_audio_before"] = len(self.audio)
                    self.events.append(event)
                async with self._changed:
                    self._changed.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.close_reason = self.ws.close_reason or ""
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(event).decode())

    async def send_audio(self, pcm: bytes) -> None:
        await self.ws.send(pcm)

    async def wait(self, type_: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """The first event of `type_` (with the given field values) not returned before."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                while True:
                    for index, event in enumerate(self.events):
                        if index in self._taken or event.get("type") != type_:
                            continue
                        if all(event.get(k) == v for k, v in match.items()):
                            self._taken.add(index)
                            return event
                    if self.closed.is_set():
                        raise AssertionError(f"connection closed ({self.close_code}) before {type_} {match}; "
                                             f"got {[e.get('type') for e in self.events]}")
                    await self._changed.wait()

    async def wait_audio(self, size: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            async with self._changed:
                while len(self.audio) < size:
                    if self.closed.is_set():
                        raise AssertionError("closed while waiting for audio")
                    await self._changed.wait()

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == type_]

    async def wait_closed(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.closed.wait(), timeout)

    async def close(self) -> None:
        await self.ws.close()
        await self.wait_closed()

    async def push_to_talk(self, audio: bytes, frame_bytes: int = 960) -> None:
        """One manual turn: `audio` in frames of `frame_bytes`, then `commit` and `create_response`."""
        for offset in range(0, len(audio), frame_bytes):
            await self.ws.send(audio[offset:offset + frame_bytes])
        await self.send({"type": "commit"})
        await self.send({"type": "create_response"})


async def one_turn(audio: bytes, **relay_args: Any) -> tuple[str, dict, dict, bytes, int]:
    """One push-to-talk turn through a fresh `relay(**relay_args)`: (the mock's URL, `ready`,
    `response_done`, the audio echoed, upstream frames the compiled reader relayed itself)."""
    async with relay(**relay_args) as (gateway, mock):
        client = await RelayClient.connect(gateway.url)
        ready = await client.wait("ready")
        await client.push_to_talk(audio)
        done = await client.wait("response_done")
        (session,) = gateway.sessions
        read_directly = session.upstream.listener.direct_frames
        await client.close()
        return mock.url, ready, done, bytes(client.audio), read_directly


def speech_like(seconds: float, seed: int, level: float = 0.3) -> bytes:
    """Non-trivial, deterministic 'speech': a random-walk-modulated chirp at about -10 dBFS."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    envelope = 0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6)))
    freq = 300 + 200 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(freq) / RATE
    noise = np.cumsum(rng.normal(0, 40, n))
    noise -= np.convolve(noise, np.ones(240) / 240, mode="same")
    signal = level * 32767 * envelope * np.sin(phase) + noise
    return np.clip(signal, -32768, 32767).astype("<i2").tobytes()


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * RATE) * 2)


def frames(pcm: bytes, size: int) -> list[bytes]:
    return [pcm[i:i + size] for i in range(0, len(pcm), size)]


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gateway_process(*flags: str, port: int | None = None, workers: int = 1, timeout: float = 30.0,
                    env: dict[str, str] | None = None, log: list[str] | None = None,
                    open_files: tuple[int, int] | None = None):
    """`python -m gateway --upstream mock --host 127.0.0.1 --port P FLAGS` as a subprocess, as an
    operator runs it. Yields `(process, port)` once every one of its `workers` logs that it is
    listening (`env` adds to its environment). A thread drains the node's log (a full pipe would block it); the log is shown if the
    node fails to start, and its lines are appended to `log` if given. `open_files` is its
    (soft, hard) limit on open files as it starts. The node is stopped (SIGTERM, then SIGKILL)
    at the end."""
    import os
    import subprocess
    import sys
    import threading

    port = port or free_port()
    env = {**{name: value for name, value in os.environ.items() if name != "OPENAI_API_KEY"}, **(env or {})}
    command = [sys.executable, "-m", "gateway", "--upstream", "mock", "--host", "127.0.0.1", "--port", str(port),
               *flags]
    if open_files:  # set by a launcher that then becomes the node (a preexec_fn is not thread-safe)
        command = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
                   f"{open_files!r}); os.execv(sys.executable, sys.argv[1:])", *command]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    log = [] if log is None else log
    listening = threading.Semaphore(0)

    def drain() -> None:
        for raw in process.stderr:
            line = raw.decode(errors="replace")
            log.append(line)
            if "realtime-gateway listening on" in line:
                listening.release()
        for _ in range(workers):  # end of the log: the node exited; wake the waiter
            listening.release()

    threading.Thread(target=drain, daemon=True).start()
    try:
        for _ in range(workers):
            if not listening.acquire(timeout=timeout) or process.poll() is not None:
                raise AssertionError("gateway did not start:\n" + "".join(log))
        yield process, port
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
