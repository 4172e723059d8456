"""`GatewayServer`: the picows server of a node — routes `/realtime` and `GET /health`.

`/realtime[?model=...]` upgrades to a WebSocket relayed by a `RelaySession`; `/health` answers
200 `{"status":"ok","sessions":N}`; any other path is 404. The server keeps a registry of live
sessions (`sessions`), and `stop()` closes every one of them (1001) before returning.
"""
from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qs, urlsplit

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server
from picows.common import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from gateway.config import NodeConfig
from gateway.errors import CLOSE_GOING_AWAY, CLOSE_MESSAGE_TOO_BIG, InvalidMessage
from gateway.framing import MessageAssembler, MessageTooBig
from gateway.session import RelaySession

log = logging.getLogger("gateway.server")

#: a single client frame may exceed the message limit only by this much before picows itself
#: drops the connection; within it the gateway answers with a proper error and close 1009
_FRAME_SLACK_BYTES = 64 * 1024
_BINARY = WSMsgType.BINARY
#: picows' initial read buffer per client socket (it doubles on demand and never shrinks); the
#: default 16 KiB is mostly idle for 960-byte audio frames and dominated RSS per session
CLIENT_READ_BUFFER_INIT_BYTES = 4 * 1024


class ClientListener(WSListener):
    """picows listener for one client socket: reassembles messages, hands them to the session."""

    __slots__ = ("session", "assembler", "_limit", "_on_audio")

    def __init__(self, session: RelaySession, max_message_bytes: int) -> None:
        self.session = session
        self.assembler = MessageAssembler(max_message_bytes)
        self._limit = max_message_bytes
        self._on_audio = session.on_client_audio

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.session.attach(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # Hot path, 50 times a second per session: a whole binary message (an audio frame) goes
        # straight to the session, skipping the assembler (see gateway.framing).
        if frame.msg_type is _BINARY and frame.fin and self.assembler.partial is None \
                and frame.payload_size <= self._limit:
            try:
                self._on_audio(frame.get_payload_as_memoryview())
            except Exception:  # a bug must not take the socket down silently: log, report, go on
                log.exception("session %s: error handling client audio", self.session.session_id)
            return
        if frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        try:
            message = self.assembler.feed(frame)
        except MessageTooBig as exc:
            self.session.fail(InvalidMessage(str(exc), fatal=True, close_code=CLOSE_MESSAGE_TOO_BIG))
            return
        if message is None:
            return
        msg_type, payload = message
        try:
            if msg_type is WSMsgType.BINARY:
                self.session.on_client_audio(payload)
            else:
                self.session.on_client_text(payload)
        except Exception:  # a bug must not take the socket down silently: log, report, go on
            log.exception("session %s: error handling a client message", self.session.session_id)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.session.on_client_closed()


class GatewayServer:
    """A node's listening socket. `await start()` returns the bound port."""

    def __init__(self, config: NodeConfig, upstream_url: str | None = None) -> None:
        self.config = config
        self.upstream_url = upstream_url or config.upstream_url
        if not self.upstream_url:
            raise ValueError("GatewayServer needs an upstream URL")
        self.sessions: set[RelaySession] = set()
        self._server: asyncio.Server | None = None
        self.port: int | None = None
        self._empty = asyncio.Event()
        self._empty.set()

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        self._server = await ws_create_server(
            self._route, self.config.host if host is None else host,
            self.config.port if port is None else port,
            max_frame_size=self.config.max_message_bytes + _FRAME_SLACK_BYTES,
            websocket_handshake_timeout=10, read_buffer_init_size=CLIENT_READ_BUFFER_INIT_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/realtime"

    def _route(self, request: WSUpgradeRequest):
        parts = urlsplit(request.path.decode("latin-1"))
        if parts.path == "/realtime":
            models = parse_qs(parts.query).get("model")
            session = RelaySession(self.config, self.upstream_url, models[0] if models else None,
                                   on_closed=self._forget)
            self.sessions.add(session)
            self._empty.clear()
            return ClientListener(session, self.config.max_message_bytes)
        if parts.path == "/health" and request.method == b"GET":
            body = orjson.dumps({"status": "ok", "sessions": len(self.sessions)})
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_ok_response(body, extra_headers={"Content-Type": "application/json"}),
                None)
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(404, b"not found\n"), None)

    def _forget(self, session: RelaySession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._empty.set()

    async def wait_empty(self, timeout: float) -> None:
        """Wait until no session is registered (tests prove nothing stays open)."""
        await asyncio.wait_for(self._empty.wait(), timeout)

    async def stop(self) -> None:
        """Stop listening, close every session (1001 going away), wait for them to finish."""
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.close(CLOSE_GOING_AWAY, "gateway shutting down")
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            self._server = None

    async def __aenter__(self) -> "GatewayServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


__all__ = ["GatewayServer", "ClientListener", "WSCloseCode"]
