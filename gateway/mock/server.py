"""`MockRealtimeServer`: the listening side of the mock, and the handshake decisions (§2).

Paths (query strings as OpenAI / Azure use them):
- `/v1/realtime?model=M`                                   OpenAI (GA, or beta by header)
- `/openai/v1/realtime?model=DEPLOYMENT`                    Azure GA
- `/openai/realtime?api-version=V&deployment=DEPLOYMENT`    Azure preview (beta dialect)
- `/health`                                                plain HTTP 200 "ok"

Instead of `model`, OpenAI takes `call_id` (a sideband connection to a WebRTC/SIP call) or
`intent=transcription` (§2.1). The mock has no calls, so every `call_id` is unknown: HTTP 404
with an empty body, as OpenAI answers one. It has no transcription sessions either: an
`intent=transcription` connection is accepted without a model and served a realtime session,
whose transcription-shaped updates get OpenAI's error for those (§8).

Auth: `Authorization: Bearer KEY`, `api-key: KEY` (Azure), `?api-key=KEY` (Azure browsers) or
the browser subprotocol `openai-insecure-api-key.KEY`. The beta dialect is chosen by the header
`OpenAI-Beta: realtime=v1`, the subprotocol `openai-beta.realtime-v1`, or the Azure preview path.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import orjson
from picows import (WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener,
                    ws_create_server)

from gateway.sockets import LISTEN_BACKLOG, listening_sockets

from .errors import ERRORS, mask_key
from .options import MockOptions
from .session import HandshakeInfo, MockSession

GA_PATHS = ("/v1/realtime", "/openai/v1/realtime")
AZURE_PREVIEW_PATH = "/openai/realtime"
HEALTH_PATHS = ("/health", "/healthz")
INSECURE_KEY_PROTOCOL = "openai-insecure-api-key."
BETA_PROTOCOL = "openai-beta.realtime-v1"


class MockRealtimeServer:
    """A faithful in-process OpenAI Realtime server (see package docs).

    `await start(host, port)` binds (port 0 = any free port) and returns the port; `sessions`
    lists every accepted WebSocket connection in connection order (including ones refused
    after the 101, e.g. bad key in "ws_error" mode) — with `record=False`, only the open ones,
    so a long-running mock does not grow; `await stop()` closes every session with
    1001 and stops listening. Also an async context manager binding 127.0.0.1:0.
    """

    def __init__(self, options: Optional[MockOptions] = None) -> None:
        self.options = options or MockOptions()
        self.sessions: list[MockSession] = []
        self.host = "127.0.0.1"
        self.port = 0
        self.open_sessions: set[MockSession] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._front: Optional[asyncio.AbstractServer] = None
        self._session_waiters: list[tuple[int, asyncio.Future[MockSession]]] = []
        self._pipes: set[asyncio.Task[Any]] = set()
        self._tls: Optional[ssl.SSLContext] = None

    @property
    def url(self) -> str:
        scheme = "wss" if self._tls is not None else "ws"
        return f"{scheme}://{self.host}:{self.port}/v1/realtime"

    async def __aenter__(self) -> "MockRealtimeServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, tls: Optional[ssl.SSLContext] = None) -> int:
        """Start listening; returns the bound port. With `tls` (a server context) it speaks
        wss://, as OpenAI and Azure do."""
        self.host = host
        self._tls = tls
        delay = self.options.handshake_delay_s
        # sockets bound here, not by uvloop: its address lookup would start libuv's thread pool in
        # the node that embeds this mock (see gateway.sockets)
        listening = listening_sockets(host, 0 if delay > 0 else port)
        self._servers = [await ws_create_server(self._route, sock=sock, max_frame_size=self.options.max_message_bytes,
                                                websocket_handshake_timeout=max(5.0, delay + 5.0),
                                                backlog=LISTEN_BACKLOG, ssl=tls,
                                                # aiofastnet's TLS server logs a refused handshake
                                                # with an exception class, not an instance, and the
                                                # loop's handler fails on it: uvloop's TLS instead
                                                use_aiofastnet=tls is None)
                         for sock in listening]
        ws_port = listening[0].getsockname()[1]
        if delay > 0:
            # picows' listener factory is synchronous, so a slow handshake is made in front of
            # it: a TCP relay that holds each new connection for `delay` before passing it on.
            self._front = await asyncio.start_server(
                lambda r, w: self._delayed_pipe(r, w, ws_port, delay), host, port)
            self.port = self._front.sockets[0].getsockname()[1]
        else:
            self.port = ws_port
        return self.port

    async def stop(self) -> None:
        """Close every session (1001 "server shutting down"), stop listening."""
        for server in (self._front, *self._servers):
            if server is not None:
                server.close()
        for session in list(self.open_sessions):
            session.close(1001, b"server shutting down")
        for session in list(self.open_sessions):
            try:
                await session.wait_closed(2.0)
            except asyncio.TimeoutError:
                if session.transport is not None:
                    session.transport.disconnect(graceful=False)
        for task in list(self._pipes):
            task.cancel()
        if self._pipes:
            await asyncio.gather(*self._pipes, return_exceptions=True)
        self._front = None
        self._servers = []

    async def wait_for_session(self, index: int = 0, timeout: float = 5.0) -> MockSession:
        """The `index`-th session (connection order), waiting up to `timeout` s for it."""
        if index < len(self.sessions):
            return self.sessions[index]
        future: asyncio.Future[MockSession] = asyncio.get_running_loop().create_future()
        entry = (index, future)
        self._session_waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            if entry in self._session_waiters:
                self._session_waiters.remove(entry)

    # -- called by MockSession ----------------------------------------------------------------

    def _register(self, session: MockSession) -> None:
        self.sessions.append(session)
        self.open_sessions.add(session)
        for index, future in list(self._session_waiters):
            if index < len(self.sessions) and not future.done():
                future.set_result(self.sessions[index])

    def _unregister(self, session: MockSession) -> None:
        self.open_sessions.discard(session)
        if not self.options.record:
            # a long-running mock (the node's --upstream mock, load tests) must not keep every
            # finished conversation, with its audio, for ever
            self.sessions.remove(session)

    # -- handshake -------------------------------------------------------------------------------

    def _route(self, request: WSUpgradeRequest) -> Any:
        url = urlsplit(request.path.decode("latin-1"))
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        if path in HEALTH_PATHS:
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(b"ok\n"), None)
        if path not in GA_PATHS and path != AZURE_PREVIEW_PATH:
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(404, b"Not Found"), None)
        headers = request.headers
        protocols = [p.strip() for value in headers.getall("Sec-WebSocket-Protocol", [])
                     for p in value.split(",") if p.strip()]
        if "call_id" in query:
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(404, b""), None)
        model = query.get("deployment") if path == AZURE_PREVIEW_PATH else query.get("model")
        if not model and query.get("intent") != "transcription":
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                400, _rest_error("Missing required parameter: 'model'.", "missing_required_parameter",
                                 "model")), None)

        key = _key_of(headers, protocols, query)
        problem: Optional[str] = None
        if not key:
            problem = "missing_auth"
        elif self.options.api_keys is not None and key not in self.options.api_keys:
            problem = "invalid_api_key"
        wants_beta = (path == AZURE_PREVIEW_PATH or BETA_PROTOCOL in protocols
                      or "realtime=v1" in headers.get("OpenAI-Beta", ""))
        dialect = "beta" if wants_beta else "ga"

        if problem is not None and self.options.bad_key == "http_401":
            spec = ERRORS[problem]
            message = spec.message.format(masked_key=mask_key(key or ""))
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                401, _rest_error(message, spec.code, None),
                extra_headers={"Content-Type": "application/json"}), None)
        if problem is not None:
            info = HandshakeInfo(dialect, model, path, key, problem, masked_key=mask_key(key or ""))
        elif wants_beta and self.options.beta == "reject":
            info = HandshakeInfo(dialect, model, path, key, "beta_api_shape_disabled")
        else:
            info = HandshakeInfo(dialect, model, path, key)
        extra = {"Sec-WebSocket-Protocol": "realtime"} if "realtime" in protocols else None
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response(extra_headers=extra), MockSession(self, info))

    async def _delayed_pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            ws_port: int, delay: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        upstream_writer: Optional[asyncio.StreamWriter] = None
        try:
            await asyncio.sleep(delay)
            upstream_reader, upstream_writer = await asyncio.open_connection(self.host, ws_port)
            await asyncio.gather(_pump(reader, upstream_writer), _pump(upstream_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()
            self._pipes.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    finally:
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except (OSError, RuntimeError):
                pass


def _key_of(headers: Any, protocols: list[str], query: dict[str, str]) -> Optional[str]:
    authorization = headers.get("Authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    if headers.get("api-key"):
        return headers["api-key"].strip()
    for protocol in protocols:
        if protocol.startswith(INSECURE_KEY_PROTOCOL):
            return protocol[len(INSECURE_KEY_PROTOCOL):] or None
    return query.get("api-key") or None


def _rest_error(message: str, code: Optional[str], param: Optional[str]) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": code}})
