"""The requests picows' parser refuses — HEAD, OPTIONS, HTTP/1.0 — answered by the node itself.

picows reads every request on the node's port, and its parser takes HTTP/1.1 `GET` only: anything
else gets a bare 400. Health checkers send more than that: HAProxy's `option httpchk` speaks
HTTP/1.0 (`OPTIONS /` unless told a method), `curl -I` sends HEAD. So every connection starts
with a `RequestSniffer`. It waits for the whole request head, hands an HTTP/1.1 GET — every
WebSocket upgrade, every ordinary probe — to picows' protocol untouched, and answers the rest
from the node's plain endpoints: GET and HEAD (headers only), OPTIONS with the methods allowed
(404 for a path the node does not serve), 405 for other methods, 400 for what is not HTTP/1.x,
431 for any head over picows' 16 KiB (picows itself would reset the connection without a
status); then it closes the connection. An HTTP/1.1 GET that picows' parser would refuse is
refused here, with picows' reason but not the line it quotes (picows' own 400 would quote it,
and that line may hold a client token). Each 400 and 431 is reported to `unreadable`.

It costs one Python call per connection and none per frame: once it hands the request over,
the sniffer is no longer the transport's protocol. picows' protocol is connected from the start,
so its handshake timeout covers a client that connects and says nothing.
"""
from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Callable

from picows.picows import _parse_http_request  # picows is pinned exactly (pyproject.toml)

from gateway.read_buffers import ReadCap

#: an endpoint's answer: status, body, content type
Answer = tuple[int, bytes, str]
#: path, Accept header -> the answer of a GET on it
Endpoint = Callable[[str, "str | None"], Answer]

ALLOWED_METHODS = "GET, HEAD, OPTIONS"
#: picows' own limit on a request head (`_http_max_size`); a longer one is refused here too
MAX_REQUEST_HEAD_BYTES = 16 * 1024
_UPGRADE_LINE_START = b"GET "
_UPGRADE_LINE_END = b" HTTP/1.1"
_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")


class RequestSniffer(asyncio.Protocol):
    """The first protocol of every client connection: picks who answers its request."""

    __slots__ = ("ws", "endpoint", "paths", "unreadable", "transport", "head")

    def __init__(self, ws: asyncio.BufferedProtocol, endpoint: Endpoint, paths: frozenset[str],
                 unreadable: Callable[[], None] = lambda: None) -> None:
        self.ws = ws  # picows' WSProtocol for this connection
        self.endpoint = endpoint
        self.paths = paths  # what `endpoint` serves: OPTIONS on anything else is 404
        self.unreadable = unreadable  # called for each request refused as malformed (400, 431)
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()  # what arrived before the head was whole (grown in place: a head
        # trickled a byte a packet would be copied and searched whole per byte otherwise)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.ws.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.head:
            searched = max(0, len(self.head) - 3)  # the blank line may straddle the two pieces
            self.head += data
            head_end = self.head.find(b"\r\n\r\n", searched)
            head = self.head
        else:
            head_end = data.find(b"\r\n\r\n")
            head = data
        if head_end < 0 and len(head) < MAX_REQUEST_HEAD_BYTES:
            if head is data:
                self.head += data
            return
        head = bytes(head)
        self.head = bytearray()
        whole = 0 <= head_end < MAX_REQUEST_HEAD_BYTES  # else picows would reset it without a status
        if whole and head.startswith(_UPGRADE_LINE_START) and head.endswith(
                _UPGRADE_LINE_END, 0, head.find(b"\r\n")):
            try:
                _parse_http_request(head[:head_end])
            except RuntimeError as exc:
                reason = str(exc).partition(":")[0]  # what follows quotes the request
                reply = self._malformed(f"malformed HTTP request: {reason}\n".encode("latin-1"))
            else:
                self.transport.set_protocol(ReadCap(self.ws))
                _feed(self.ws, head)  # with any frames sent behind the head
                return
        else:
            reply = self.answer(head[:head_end] if whole else None)
        self.transport.pause_reading()  # one request per connection: the answer closes it
        self.transport.write(reply)
        self.transport.close()

    def answer(self, head: bytes | None) -> bytes:
        """The whole response to a request head the node answers itself (None: too long)."""
        if head is None:
            return self._malformed(b"", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] not in _VERSIONS or not parts[1]:
            return self._malformed(b"malformed HTTP request line\n")
        method, target = parts[0], parts[1].decode("latin-1")
        path = target.split("?", 1)[0]
        if method == b"OPTIONS":
            # `*` and `/` ask about the server as a whole (HAProxy's default check is `OPTIONS /`)
            known = target == "*" or path == "/" or path in self.paths
            return _response(HTTPStatus.OK if known else HTTPStatus.NOT_FOUND, b"", "text/plain", False)
        if method not in (b"GET", b"HEAD"):
            return _response(HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain", False)
        status, body, content_type = self.endpoint(path, _header(lines, b"accept"))
        return _response(status, body, content_type, method == b"HEAD")

    def _malformed(self, body: bytes, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> bytes:
        self.unreadable()
        return _response(status, body, "text/plain", False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ws.connection_lost(exc)  # cancels picows' handshake timeout


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Give `data` to a buffered protocol as its transport would (its buffer grows as it fills)."""
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def _header(lines: list[bytes], name: bytes) -> str | None:
    for line in lines[1:]:
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return None


def _response(status: int, body: bytes, content_type: str, head_only: bool) -> bytes:
    status = HTTPStatus(status)
    head = (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nAllow: {ALLOWED_METHODS}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") if head_only else head.encode("latin-1") + body
