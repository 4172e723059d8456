"""A raw picows test client for `/realtime`: sends exactly the frames a test builds (fragments,
CONTINUATION frames, invalid UTF-8, pings) and records every frame it receives. Shared by the
bad-input and fault tests, with a few helpers built on it."""
from __future__ import annotations

import asyncio
import re
from typing import Any, Callable

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

MiB = 1024 * 1024

# ---- a raw picows client ----------------------------------------------------------------------

class RawClient(WSListener):
    """Records every frame from the gateway: JSON `events` in order, binary `audio_frames` in
    order (each as its own bytes object, so frame boundaries are visible), `pings` and `pongs`
    payloads, and the close code. Pings are answered, as every WebSocket client does, unless
    `answer_pings` is false (a client that is gone). All waits are on conditions with deadlines."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.events: list[dict[str, Any]] = []
        self.audio_frames: list[bytes] = []
        self.audio_bytes = 0
        self.pings: list[bytes] = []
        self.pongs: list[bytes] = []
        self.answer_pings = True
        self.close_code: int | None = None
        self.close_reason = ""
        self.disconnected = False
        self._taken: set[int] = set()
        self._waiters: list[asyncio.Future] = []
        self._sentinels = 0

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> "RawClient":
        _transport, client = await ws_connect(cls, url, max_frame_size=64 * MiB, enable_auto_pong=False,
                                              websocket_handshake_timeout=5, **kwargs)
        return client

    # -- picows callbacks
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT:
            self.events.append(orjson.loads(frame.get_payload_as_bytes()))
        elif kind is WSMsgType.BINARY:
            self.audio_frames.append(frame.get_payload_as_bytes())
            self.audio_bytes += frame.payload_size
        elif kind is WSMsgType.PING:
            self.pings.append(frame.get_payload_as_bytes())
            if self.answer_pings:
                transport.send_pong(frame.get_payload_as_bytes())
        elif kind is WSMsgType.PONG:
            self.pongs.append(frame.get_payload_as_bytes())
        elif kind is WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code().value)
            self.close_reason = frame.get_close_reason() or ""
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()
        self._wake()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    # -- waiting
    async def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait (woken by each received frame) until `predicate()` is truthy; return its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; events: "
                                     f"{[e.get('type') for e in self.events]}, close={self.close_code}")
            future = loop.create_future()
            self._waiters.append(future)
            try:
                await asyncio.wait_for(future, remaining)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    async def wait(self, type_: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """The first event of `type_` (with these field values) not returned before."""
        def find():
            for index, event in enumerate(self.events):
                if index not in self._taken and event.get("type") == type_ and \
                        all(event.get(k) == v for k, v in match.items()):
                    self._taken.add(index)
                    return event
            if self.disconnected:
                raise AssertionError(f"closed ({self.close_code}) before {type_} {match}; "
                                     f"got {[e.get('type') for e in self.events]}")
            return None
        return await self.wait_until(find, timeout, f"{type_} {match}")

    async def wait_closed(self, timeout: float = 5.0) -> None:
        await self.wait_until(lambda: self.disconnected, timeout, "the close")

    async def sentinel(self, timeout: float = 5.0) -> int:
        """Send an unknown type and wait for its InvalidMessage: every reaction of the gateway
        itself to what was sent before has then arrived (the gateway handles a socket's
        messages in order). Returns the index of the sentinel's error in `events`."""
        self._sentinels += 1
        name = f"zz_sentinel_{self._sentinels}"
        self.send_json({"type": name})

        def find():
            for index, event in enumerate(self.events):
                if event.get("type") == "error" and name in event.get("message", ""):
                    return index + 1
            if self.disconnected:
                raise AssertionError(f"closed ({self.close_code} {self.close_reason}) before {name}")
            return None
        return await self.wait_until(find, timeout, name) - 1

    def errors(self, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events[start:end] if e.get("type") == "error"]

    @property
    def audio(self) -> bytes:
        return b"".join(self.audio_frames)

    # -- sending
    def send_json(self, event: Any) -> None:
        self.transport.send(WSMsgType.TEXT, orjson.dumps(event))

    def send_text(self, data: bytes, fin: bool = True) -> None:
        self.transport.send(WSMsgType.TEXT, data, fin)

    def send_binary(self, data: bytes, fin: bool = True) -> None:
        self.transport.send(WSMsgType.BINARY, data, fin)

    def send_continuation(self, data: bytes, fin: bool) -> None:
        self.transport.send(WSMsgType.CONTINUATION, data, fin)

    async def close(self, timeout: float = 5.0) -> None:
        if not self.disconnected:
            self.transport.send_close(WSCloseCode.OK)
            await self.wait_closed(timeout)


async def ready_client(url: str, config: dict[str, Any] | None = None) -> RawClient:
    """A session in push-to-talk mode (no VAD, so a turn is exactly what the test commits)."""
    client = await RawClient.connect(url)
    client.send_json({"type": "config", "turn_detection": "none", **(config or {})})
    await client.wait("ready")
    return client


async def echo_turn(client: RawClient, audio: bytes, frame_bytes: int = 960, timeout: float = 5.0) -> None:
    """One push-to-talk turn: `audio` in frames, commit, respond; the reply is its byte-exact echo."""
    before = client.audio_bytes
    for offset in range(0, len(audio), frame_bytes):
        client.send_binary(audio[offset:offset + frame_bytes])
    client.send_json({"type": "commit"})
    client.send_json({"type": "create_response"})
    done = await client.wait("response_done", timeout)
    assert done["status"] == "completed", done
    assert client.audio[before:] == audio


async def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET on the node's port: (status, body)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        body = await reader.readexactly(int(length.group(1))) if length else await reader.read()
        writer.close()
        return status, body
