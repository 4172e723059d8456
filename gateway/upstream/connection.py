"""`UpstreamConnection`: one picows client connection to an OpenAI Realtime endpoint.

Opens the socket with the provider's auth header (never logged), the dialect's extra headers and
a bounded handshake; classifies failures into gateway errors (HTTP 401/403 ->
`AuthenticationFailed`; 429 -> `RateLimitExceeded`, fatal; refused / timeout / other HTTP ->
`ConnectionFailed`).

Complete upstream messages are classified by the `UpstreamLeg` base (compiled): an output-audio
delta of the session's open item goes straight into its `AudioPath` (the client batch); another
audio delta goes to the owner's `on_upstream_audio(item_id, pcm)`, any other event to
`on_upstream_event(payload)` (payload valid only during the call). After the last complete frame
of each socket read the path writes what that read produced in one go (a leg whose path was
taken away calls the owner's `on_upstream_read_end()` instead); the end of the connection is
`on_upstream_closed(code, reason, refused_with)`.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import re
import socket
import ssl
import struct
from datetime import datetime, timezone
from typing import Protocol
from urllib.parse import parse_qs, quote, urlsplit

from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport, ws_connect
from picows.common import WSHandshakeError, WSInvalidHeaderError
from python_socks import ProxyError  # picows' dependency: what its CONNECT tunnel raises

from _fastpath import HEADER_ROOM, AudioPath, UpstreamLeg, release_handshake

from gateway import sockets
from gateway.config import safe_location
from gateway.errors import (CLOSE_TRY_AGAIN_LATER, AuthenticationFailed, ConnectionFailed, GatewayError,
                            RateLimitExceeded, UpstreamError)
from gateway.framing import (FragmentOutOfOrder, MessageAssembler, MessageTooBig, PeerParserErrorsAtInfo, close_reply,
                             close_status)
from gateway.upstream.trust import ResumingContext, client_tls_context

log = logging.getLogger("gateway.upstream")
_PICOWS_LOG = PeerParserErrorsAtInfo(logging.getLogger("picows.client"), {})
_TEXT = WSMsgType.TEXT

#: largest upstream message accepted (session.updated echoes tools; retrieved items carry audio)
MAX_UPSTREAM_MESSAGE_BYTES = 64 * 1024 * 1024
#: picows defaults to aiofastnet's transports when that package is installed (it is, as picows'
#: dependency); uvloop's own TCP transports cost the same CPU per frame here but ~12 KiB less
#: memory per session (an aiofastnet transport embeds a 256-entry iovec array): 46 -> 34 KiB.
#: The client leg's listener (gateway.server) uses uvloop's transports as well.
USE_AIOFASTNET = False
#: picows grows its read buffer on demand (doubling, never shrinking; gateway/read_buffers.py gives
#: its pages back after a burst); start small so sessions stay light: 8 KiB holds a 100 ms
#: output-audio delta (~6.6 KB of JSON) and its transcript delta
READ_BUFFER_INIT_BYTES = 8 * 1024
#: longest event sent through picows' own write buffer, which it masks a copy into and never
#: shrinks (a forwarded 4 MiB `conversation.item.create` kept 4 MiB per session); a longer one is
#: copied once into a bytearray of its own, masked there and freed with it
COPY_SEND_MAX_BYTES = 8 * 1024
#: seconds a graceful close may take before the connection is reset (an upstream that does not
#: read keeps our close frame, and the socket, for as long as it stalls)
CLOSE_GRACE_S = 5.0


class UpstreamOwner(Protocol):
    session_id: str  # for the log lines about this connection

    def on_upstream_event(self, payload) -> None: ...
    def on_upstream_audio(self, item_id: str, pcm: bytes) -> None: ...
    def on_upstream_read_end(self) -> None: ...
    def on_upstream_closed(self, code: int | None, reason: str, refused_with: int | None) -> None: ...
    def on_upstream_paused(self) -> None: ...
    def on_upstream_resumed(self) -> None: ...


def build_upstream_url(base_url: str, model: str) -> str:
    """Add `?model=` unless the URL already names a model or an Azure deployment."""
    query = parse_qs(urlsplit(base_url).query)
    if "model" in query or "deployment" in query:
        return base_url
    separator = "&" if "?" in base_url else "?"
    return f"{base_url}{separator}model={quote(model, safe='')}"


class UpstreamListener(UpstreamLeg):
    """picows listener for the upstream socket: the `UpstreamLeg` base classifies whole text
    messages (see the module docstring); this class handles the rest and the lifecycle."""

    __slots__ = ("owner", "_assembler", "transport", "close_code", "close_reason", "closing", "_write_paused",
                 "_pong", "close_grace", "refused_extension", "failed")

    def __init__(self, owner: UpstreamOwner, path: AudioPath | None) -> None:
        super().__init__()
        self.owner = owner
        self.path = path
        self._assembler = MessageAssembler(MAX_UPSTREAM_MESSAGE_BYTES)
        self.transport: WSTransport | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.closing = False
        self._write_paused = False
        self._pong: bytes | None = None  # the latest ping's payload, while the upstream does not read
        self.close_grace: asyncio.TimerHandle | None = None  # cuts off a polite close that does not end
        self.refused_extension: str | None = None
        #: the gateway failed the connection (`fail_protocol`): what still comes is not processed
        self.failed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        response = transport.response
        extension = response.headers.get("Sec-WebSocket-Extensions") if response is not None else None
        if extension:
            # RFC 6455 §9.1: the gateway offered none, so it fails the connection (its frames would
            # come compressed, unreadable). Frames that came with the 101 are read next, in this
            # same call: nobody hears them (`connect` raises)
            self.refused_extension = extension.split(";")[0].strip()[:40]
            self.owner, self.path = _NOBODY, None
            transport.disconnect(False)
            return
        if self.closing:  # the owner gave up while the handshake was in flight: don't linger
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def pause_writing(self) -> None:
        """The upstream is not taking our data as fast as we send it (its socket and our write
        buffer are past the high-water mark): tell the owner, which stops reading its client."""
        self._write_paused = True
        self.owner.on_upstream_paused()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._pong is not None and self.transport is not None:
            self.transport.send_pong(self._pong)
            self._pong = None
        self.owner.on_upstream_resumed()

    def on_event(self, payload) -> None:
        if not self.failed and self.close_code is None:
            self.owner.on_upstream_event(payload)

    def on_audio(self, item_id: str, pcm: bytes) -> None:
        if not self.failed and self.close_code is None:
            self.owner.on_upstream_audio(item_id, pcm)

    def on_read_end(self) -> None:
        self.owner.on_upstream_read_end()

    def on_other_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        try:
            self._handle_other_frame(transport, frame)
        finally:
            # while a fragmented message is assembled, no frame may bypass the assembler
            self.assembling = self._assembler.partial is not None

    def _handle_other_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Control frames and fragmented or oversized messages."""
        if self.refused_extension is not None or self.failed or self.close_code is not None:
            # came with the refused 101 (the answer was no WebSocket), after the gateway failed
            # the connection (RFC 6455 §7.1.7), or after the upstream's close (nothing follows
            # one, §5.5.1; its code and reason stand): no pong, no close frame, nothing processed
            return
        if transport.is_close_frame_sent and frame.msg_type is not WSMsgType.CLOSE:
            # behind a close of ours (picows' parser failed the connection: a close status no
            # endpoint may send, say): only the upstream's close is read, to end the handshake
            return
        if frame.rsv1 | frame.rsv2 | frame.rsv3:
            # no extension was negotiated (RFC 6455 §5.2: fail the connection): compressed audio
            # would be played as noise, a compressed event misread
            self.fail_protocol(transport, "reserved bits set without an extension")
            return
        if frame.msg_type is WSMsgType.PING:
            # answered here, not by picows' auto-pong, whose pongs ignore backpressure: an
            # upstream that pings without reading would fill our write buffer without bound.
            # While it does not read, only its latest ping is answered, once it does (RFC 6455 §5.5.3)
            if self._write_paused:
                self._pong = frame.get_payload_as_bytes()
            else:
                transport.send_pong(frame.get_payload_as_bytes())
            return
        if frame.msg_type is WSMsgType.CLOSE:
            status = close_status(frame)
            # no status in it: reported as RFC 6455's 1005 ("no status received"), never sent
            self.close_code = 1005 if status is None else status
            self.close_reason = frame.get_close_reason()
            self.path = None  # what follows in this read is not relayed either
            if transport.is_close_frame_sent:  # this answers ours
                transport.disconnect()
            elif close_reply(status) == WSCloseCode.PROTOCOL_ERROR:
                self.fail_protocol(transport, f"a close frame with status {status}, which no endpoint may send")
            else:
                transport.send_close(close_reply(status))  # its code echoed
                transport.disconnect()
            return
        try:
            message = self._assembler.feed(frame)
        except MessageTooBig:
            transport.send_close(WSCloseCode.MESSAGE_TOO_BIG)
            transport.disconnect()
            return
        except FragmentOutOfOrder as exc:  # raised out of picows' callback, it closed with 1011
            self.fail_protocol(transport, str(exc))
            return
        if message is not None and message[0] is WSMsgType.TEXT:
            # a fragmented message is rare: the owner parses it in full (audio deltas too)
            self.owner.on_upstream_event(message[1])

    def fail_protocol(self, transport: WSTransport, why: str,
                      code: WSCloseCode = WSCloseCode.PROTOCOL_ERROR) -> None:
        """The upstream broke RFC 6455: close with `code` (the owner hears it as a refusal, below).
        The rest of what came is not processed: not relayed through the path, nor handled."""
        log.info("session %s: upstream broke the WebSocket protocol: %s", self.owner.session_id, why)
        self.failed = True
        self.path = None
        if not transport.is_close_frame_sent:  # (picows would send a second one)
            transport.send_close(code, why.encode()[:123])
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.forget_reads()
        if self.close_grace is not None:  # the close ended: the timer need not hold the transport on
            self.close_grace.cancel()
            self.close_grace = None
        # a close frame we sent first, though the owner never asked us to close: picows' parser
        # (an oversized frame: 1009; a broken one: 1002) or the assembler refused what came; or
        # one failing the connection (`fail_protocol`), also as the answer to a forbidden close
        handshake = transport.close_handshake
        sent = handshake.sent if handshake is not None else None
        refused = sent is not None and not self.closing and (self.failed or not handshake.recv_then_sent)
        if sent is not None:
            # picows keeps the error of a frame its parser refused (always after sending its close)
            # for `wait_disconnected`, which nobody awaits: asyncio would log it as "never
            # retrieved", a traceback per failure
            asyncio.get_running_loop().create_task(_disconnected(transport))
        self.owner.on_upstream_closed(self.close_code, self.close_reason, int(sent.code) if refused else None)


async def _disconnected(transport: WSTransport) -> None:
    with contextlib.suppress(Exception):  # the session has said what happened
        await transport.wait_disconnected()


class _Nobody:
    """The owner of an upstream connection refused at its handshake: hears nothing."""

    def on_upstream_event(self, payload) -> None: pass
    def on_upstream_audio(self, item_id: str, pcm: bytes) -> None: pass
    def on_upstream_read_end(self) -> None: pass
    def on_upstream_closed(self, code: int | None, reason: str, refused_with: int | None) -> None: pass
    def on_upstream_paused(self) -> None: pass
    def on_upstream_resumed(self) -> None: pass


_NOBODY = _Nobody()

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] +([1-5][0-9]{2})(?: |$)")


def _handshake_status(exc: WSHandshakeError) -> int | None:
    """The HTTP status the upstream answered the upgrade with. picows parses only
    `HTTP/1.1 <a code Python knows> <reason>`; an HTTP/1.0 answer, a bare `HTTP/1.1 401`,
    Cloudflare's 520-527 or a head over its size limit come as a parse error, with the head
    still in `raw_header`."""
    if exc.response is not None and exc.response.status is not None:
        return int(exc.response.status)
    match = _STATUS_LINE.match((exc.raw_header or b"").split(b"\r\n", 1)[0])
    return int(match.group(1)) if match else None


#: a longer Retry-After is no hint a client could act on (OpenAI's own clients honour at most 60 s)
MAX_RETRY_AFTER_S = 3600.0


def _retry_after_s(exc: WSHandshakeError) -> float | None:
    """Seconds the upstream asked us to wait (a 429's or 503's hint), or None. OpenAI's own
    clients read `retry-after-ms` first, then `retry-after` (seconds, or an HTTP date); one
    that is unreadable, negative or over MAX_RETRY_AFTER_S is no hint."""
    headers: dict[str, str] = {}
    for line in (exc.raw_header or b"").decode("latin-1").split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon and name == name.strip():  # not a folded line, nor a name with spaces (RFC 9112 §5)
            headers.setdefault(name.lower(), value.strip())
    for seconds in (_seconds(headers.get("retry-after-ms"), 0.001), _seconds(headers.get("retry-after"), 1.0)):
        if seconds is not None:
            return seconds
    return None


def _seconds(value: str | None, unit: float) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value) * unit
    except ValueError:  # an HTTP date (seconds only)
        if unit != 1.0:
            return None
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (ValueError, TypeError, OverflowError):
            return None
        seconds = max(seconds, 0.0)  # a date passed: now
    return round(seconds, 3) if 0.0 <= seconds <= MAX_RETRY_AFTER_S else None


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


class UpstreamConnection:
    """One upstream session socket. `send_*` are no-ops once closed."""

    __slots__ = ("listener", "_handshaking")

    def __init__(self, owner: UpstreamOwner, path: AudioPath | None = None) -> None:
        self.listener = UpstreamListener(owner, path)
        # the socket `connect` opened, until its handshake is over: picows does not close a
        # connection whose handshake it was waiting for when `connect` was cancelled
        self._handshaking: socket.socket | None = None

    async def _connected_socket(self, url) -> socket.socket:
        # left to picows, uvloop would look a host name up on libuv's thread pool, whose threads then
        # stay for good; gateway.sockets looks it up in a thread that ends with the lookup (see there)
        self._handshaking = await sockets.connect(url.host, url.port)
        return self._handshaking

    def _abandon_handshake(self) -> None:
        """End the connection `connect` gave up on while its handshake was in flight (the session
        left, or re-opened with another model, or the time ran out). Until the upstream answers,
        or picows' own handshake timeout fires, it would hold a socket and an upstream session
        the node no longer counts. Shutting the socket down ends it at once: the transport reads
        its end and closes it (the fd is the transport's to close; a closed one reads -1 here)."""
        sock, self._handshaking = self._handshaking, None
        if sock is not None and self.transport is None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def transport(self) -> WSTransport | None:
        # set by the listener as soon as the handshake completes: the first upstream frame
        # (session.created) can be handled, and answered, before `connect()` returns
        return self.listener.transport

    async def connect(self, url: str, headers: list[tuple[str, str]], timeout_s: float,
                      proxy: str | None = None) -> None:
        """Open the socket within `timeout_s`, tunnelled through the HTTP `proxy` if one is given.
        Raises AuthenticationFailed, RateLimitExceeded or ConnectionFailed."""
        where = safe_location(url)
        through = f" through proxy {safe_location(proxy)}" if proxy else ""
        try:
            async with asyncio.timeout(timeout_s):
                transport, _listener = await ws_connect(
                    lambda: self.listener, url, extra_headers=headers,
                    # no handshake timer of picows' own: the timeout above bounds the handshake too,
                    # and picows' timer outlives a connect cancelled inside uvloop's create_connection
                    # (the transport is closed without the protocol being told), then fails a future
                    # nobody reads: an asyncio ERROR line per session that left while connecting
                    websocket_handshake_timeout=None, read_buffer_init_size=READ_BUFFER_INIT_BYTES,
                    max_frame_size=MAX_UPSTREAM_MESSAGE_BYTES, enable_auto_ping=False, enable_auto_pong=False,
                    use_aiofastnet=USE_AIOFASTNET, socket_factory=self._connected_socket, logger_name=_PICOWS_LOG,
                    # picows would follow a redirect with the same headers: the key, to any host
                    max_redirects=0,
                    ssl_context=client_tls_context() if urlsplit(url).scheme == "wss" else None,
                    proxy=proxy)
        except WSHandshakeError as exc:
            status = _handshake_status(exc)
            if status == 101:  # an upgrade, answered wrong: no refusal
                what = f" ({exc.name} header)" if isinstance(exc, WSInvalidHeaderError) else ""
                raise ConnectionFailed(f"upstream {where} answered the upgrade with an invalid WebSocket "
                                       f"handshake{what}") from None
            if status in (401, 403):
                raise AuthenticationFailed(f"upstream {where} refused the API key (HTTP {status})",
                                           upstream={"code": f"http_{status}", "type": "handshake"}) from None
            upstream = {"code": f"http_{status}", "type": "handshake"}
            retry_after = _retry_after_s(exc) if status in (429, 503) else None
            if retry_after is not None:  # the upstream's hint, for the client's backoff
                upstream["retry_after_s"] = retry_after
            later = f"; retry after {_format_seconds(retry_after)} s" if retry_after is not None else ""
            if status == 429:  # SPEC §3: rate limits are RateLimitExceeded; without a session, fatal
                raise RateLimitExceeded(f"upstream {where} is rate limiting new sessions (HTTP 429{later})",
                                        upstream=upstream, fatal=True) from None
            if status == 503:  # unavailable for now (OpenAI's "overloaded"): 1013, try again later
                raise ConnectionFailed(f"upstream {where} is unavailable (HTTP 503{later})", upstream=upstream,
                                       close_code=CLOSE_TRY_AGAIN_LATER) from None
            raise ConnectionFailed(f"upstream {where} refused the WebSocket handshake"
                                   + (f" (HTTP {status})" if status else "")) from None
        except TimeoutError:
            self._abandon_handshake()
            raise ConnectionFailed(f"upstream {where}{through} did not answer within {timeout_s:g} s") from None
        except ProxyError as exc:  # the proxy's own words: a status, or that it hung up
            raise ConnectionFailed(f"upstream proxy {safe_location(proxy or '')} gave no tunnel to {where}: "
                                   f"{exc}") from None
        except ssl.SSLCertVerificationError as exc:  # before OSError: it is one
            raise ConnectionFailed(f"upstream {where} presented a TLS certificate that does not verify: "
                                   f"{exc.verify_message or exc.reason}") from None
        except ssl.SSLError as exc:
            raise ConnectionFailed(f"TLS with upstream {where} failed: {exc.reason or type(exc).__name__}") from None
        except OSError as exc:  # with a proxy, every TCP connect is to the proxy
            target = f"proxy {safe_location(proxy)}" if proxy else where
            raise ConnectionFailed(f"cannot reach upstream {target}: {exc.strerror or type(exc).__name__}") from None
        except GatewayError:
            raise
        except asyncio.CancelledError:
            self._abandon_handshake()
            self.close()
            raise
        except Exception as exc:  # picows/ssl errors: classify, never leak internals beyond the type
            raise ConnectionFailed(f"cannot connect to upstream {where}: {type(exc).__name__}") from None
        if self.listener.refused_extension is not None:
            release_handshake(transport)
            raise ConnectionFailed(f"upstream {where} answered with a WebSocket extension the gateway did not "
                                   f"offer ({self.listener.refused_extension})")
        if _listener is None or transport.is_disconnected:
            # the peer closed (or reset) the TCP connection before answering the upgrade: picows
            # returns no listener rather than raising, and no disconnect callback will come
            transport.disconnect(False)
            raise ConnectionFailed(f"upstream {where} closed the connection during the WebSocket handshake")
        self._handshaking = None
        release_handshake(transport)  # its request holds the API key: let it go
        ssl_object = transport.underlying_transport.get_extra_info("ssl_object")
        if ssl_object is not None and isinstance(ssl_object.context, ResumingContext):
            # the next session to this host resumes it: kept by the context that made it (a
            # SIGHUP during the handshake has put another in service, which must not offer it)
            ssl_object.context.remember(ssl_object)
        if self.closing:  # closed while connecting
            self.close()

    @property
    def tls_resumed(self) -> bool | None:
        """Over wss://, whether the handshake resumed an earlier session; None over ws://."""
        transport = self.transport
        ssl_object = None if transport is None else transport.underlying_transport.get_extra_info("ssl_object")
        return None if ssl_object is None else ssl_object.session_reused

    @property
    def closing(self) -> bool:
        return self.listener.closing

    @property
    def connected(self) -> bool:
        return self.transport is not None and not self.transport.is_disconnected and not self.closing

    def send_json_bytes(self, data: bytes) -> None:
        if not self.connected:
            return
        if len(data) <= COPY_SEND_MAX_BYTES:
            self.transport.send(_TEXT, data)
            return
        frame = bytearray(HEADER_ROOM + len(data))
        frame[HEADER_ROOM:] = data
        self.transport.send_reuse_external_bytearray(_TEXT, frame, HEADER_ROOM)

    def send_frame(self, frame: bytearray, offset: int) -> None:
        """Zero-copy send of an encoded frame whose first `offset` bytes are free header room
        (picows masks the frame in place: its bytes are not the JSON any more afterwards)."""
        listener = self.listener  # `connected`, inlined: this runs for every coalesced append
        transport = listener.transport
        if transport is not None and not transport.is_disconnected and not listener.closing:
            transport.send_reuse_external_bytearray(_TEXT, frame, offset)

    def fail_invalid_text(self) -> None:
        """The upstream sent a text message that is not UTF-8 (RFC 6455 §8.1: close 1007)."""
        if self.transport is not None and not self.listener.closing:
            self.listener.fail_protocol(self.transport, "a text message that is not UTF-8",
                                        WSCloseCode.INVALID_TEXT)

    def close(self) -> None:
        """Close politely (1000) and drop the socket; safe to call at any time, repeatedly.
        What it still delivers goes to the owner (which ignores a retired upstream), never
        through the session's audio path.

        Politely only while the upstream reads: a graceful close waits, without a deadline,
        until everything written has been sent, and an upstream that stopped reading would keep
        the socket, its buffers and the session's objects for as long as it stalls. What is
        still waiting then is audio for a session that has ended: it is reset instead, and a
        graceful close that has not finished within CLOSE_GRACE_S is cut off too."""
        listener = self.listener
        listener.closing = True
        listener.path = None
        transport = self.transport
        if transport is None or transport.is_disconnected or listener.close_grace is not None:
            return  # nothing to close, or closing politely already (a reset then stays on its time)
        if transport.underlying_transport.get_write_buffer_size():
            _reset(transport)
            return
        transport.send_close(WSCloseCode.OK)
        transport.disconnect()
        listener.close_grace = asyncio.get_running_loop().call_later(CLOSE_GRACE_S, _reset, transport)


def _reset(transport: WSTransport) -> None:
    """Drop the connection now, with what our kernel still holds for it (RST, not FIN)."""
    if transport.is_disconnected:
        return
    sock = transport.underlying_transport.get_extra_info("socket")
    if sock is not None:
        # ValueError: uvloop has closed the fd already (its pseudo-socket then reads -1)
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.disconnect(False)


__all__ = ["UpstreamConnection", "UpstreamListener", "build_upstream_url", "UpstreamError"]
