"""Probes picows' request parser refuses — HEAD, OPTIONS, HTTP/1.0 (HAProxy's `option httpchk`,
`curl -I`) — are answered by the node from the same endpoints, and every WebSocket upgrade still
reaches picows however its request is cut into packets."""
from __future__ import annotations

import asyncio
import base64
import os
import ssl

import orjson
import pytest

from gateway.http_probes import MAX_REQUEST_HEAD_BYTES
from tests.raw_client import http_get
from tests.relay_harness import relay
from tests.support import run
from tests.test_client_tls import write_pair
from tests.test_tls_upstream import ca, trusted  # noqa: F401 (fixtures: a CA the test process trusts)


async def exchange(port: int, request: bytes, tls: ssl.SSLContext | None = None) -> tuple[bytes, bytes]:
    """Send one raw request; read until the node closes: (response head, what follows it)."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                                       server_hostname="127.0.0.1" if tls else None)
        writer.write(request)
        response = await reader.read()  # to EOF: these answers close the connection
        writer.close()
    head, _, rest = response.partition(b"\r\n\r\n")
    return head, rest


def header(head: bytes, name: str) -> str:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode()
    raise AssertionError(f"no {name} header in {head!r}")


def test_head_answers_with_the_get_headers_and_no_body():
    async def scenario():
        async with relay() as (gateway, _mock):
            status, body = await http_get(gateway.port, "/health")
            head, rest = await exchange(gateway.port, b"HEAD /health HTTP/1.1\r\nHost: node\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert (status, header(head, "Content-Length")) == (200, str(len(body)))
            assert header(head, "Content-Type") == "application/json"
            assert rest == b""  # headers only, then the node closes
            missing, rest = await exchange(gateway.port, b"HEAD /nowhere HTTP/1.0\r\n\r\n")
            assert missing.startswith(b"HTTP/1.1 404 Not Found\r\n") and rest == b""

    run(scenario())


def test_haproxy_style_http10_checks_follow_readiness():
    """`option httpchk GET /ready` sends HTTP/1.0 without a Host: 200 while the node admits,
    503 once it drains; HAProxy's default check (`OPTIONS /`) gets 200 with the methods allowed."""
    async def scenario():
        async with relay() as (gateway, _mock):
            head, body = await exchange(gateway.port, b"GET /ready HTTP/1.0\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and header(head, "Connection") == "close"
            assert orjson.loads(body) == {"ready": True, "draining": False, "overloaded": False}
            head, body = await exchange(gateway.port, b"OPTIONS / HTTP/1.0\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b""
            assert header(head, "Allow") == "GET, HEAD, OPTIONS"
            for target in (b"*", b"/health", b"/metrics?x=1", b"/realtime"):
                head, body = await exchange(gateway.port, b"OPTIONS " + target + b" HTTP/1.1\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"", target
            head, body = await exchange(gateway.port, b"OPTIONS /nope HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404 Not Found\r\n") and body == b"", "a path the node does not serve"
            await gateway.drain(timeout_s=1)  # no sessions: returns at once
            head, body = await exchange(gateway.port, b"GET /ready HTTP/1.0\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert orjson.loads(body) == {"ready": False, "draining": True, "overloaded": False}

    run(scenario())


def test_http10_metrics_negotiates_the_exposition_format():
    async def scenario():
        async with relay() as (gateway, _mock):
            head, body = await exchange(gateway.port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert header(head, "Content-Type").startswith("text/plain")
            assert b"\ngateway_sessions_active 0.0\n" in body
            head, body = await exchange(
                gateway.port, b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n")
            assert header(head, "Content-Type").startswith("application/openmetrics-text")
            assert body.endswith(b"# EOF\n")
            # an Accept prometheus_client cannot read: the default format, over each way in (it
            # was a 500 through picows, and a traceback and no answer through the sniffer)
            for request in (b"GET /metrics HTTP/1.0\r\n", b"HEAD /metrics HTTP/1.1\r\nHost: node\r\n",
                            b"GET /metrics HTTP/1.1\r\nHost: node\r\n"):
                head, _ = await exchange(gateway.port, request + b"Accept: text/plain;version=abc\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
                assert header(head, "Content-Type") == "text/plain; version=0.0.4; charset=utf-8"

    run(scenario())


def test_what_the_node_cannot_serve_is_refused_with_a_reason():
    async def scenario():
        async with relay() as (gateway, _mock):
            port = gateway.port
            head, _ = await exchange(port, b"POST /health HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
            assert header(head, "Allow") == "GET, HEAD, OPTIONS"
            upgrade = (b"GET /realtime HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) +
                       b"\r\n\r\n")
            head, body = await exchange(port, upgrade)
            assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert b"HTTP/1.1 GET upgrade" in orjson.loads(body)["error"].encode()
            head, body = await exchange(port, b"HELLO\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and body == b"malformed HTTP request line\n"
            head, _ = await exchange(port, b"HEAD /health HTTP/1.1\r\nX-Pad: " + b"a" * MAX_REQUEST_HEAD_BYTES)
            assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
            # an upgrade's head goes to picows, which would reset one this long without a status
            long_upgrade = upgrade.replace(b"HTTP/1.0", b"HTTP/1.1").replace(
                b"\r\n\r\n", b"\r\nX-Pad: " + b"a" * MAX_REQUEST_HEAD_BYTES + b"\r\n\r\n")
            head, _ = await exchange(port, long_upgrade)
            assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
            assert gateway.sessions == set()

    run(scenario())


def test_an_upgrade_cut_into_single_bytes_still_reaches_picows():
    """The request line arrives a byte a packet: the sniffer waits for all of it, then hands
    every byte to picows, which upgrades and the session says `ready`."""
    async def scenario():
        async with relay() as (gateway, _mock):
            key = base64.b64encode(os.urandom(16))
            request = (b"GET /realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key +
                       b"\r\n\r\n")
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                for byte in request[:40]:  # asyncio streams are TCP_NODELAY: a packet each
                    writer.write(bytes([byte]))
                    await writer.drain()
                writer.write(request[40:])
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                first, length = await reader.readexactly(2)
                assert first == 0x81  # one unmasked text frame
                if length == 126:
                    length = int.from_bytes(await reader.readexactly(2), "big")
                event = orjson.loads(await reader.readexactly(length))
                writer.close()
            assert event["type"] == "ready"

    run(scenario())


def test_a_browser_whose_connection_header_lists_more_than_upgrade_connects():
    """Found by a client audit: Firefox sends `Connection: keep-alive, Upgrade`, and picows
    refused everything but `upgrade` alone with a 400 nobody saw (no log line, no refusal
    counted): no Firefox user could connect. RFC 6455 asks only that the header include the
    token. A handshake still invalid (no key) is refused with picows' reason, and counted."""
    async def scenario():
        async with relay() as (gateway, _mock):
            readies = []
            for connection in (b"keep-alive, Upgrade", b"Upgrade, keep-alive", b"keep-alive,upgrade"):
                request = (b"GET /realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                           b"Connection: " + connection + b"\r\nSec-WebSocket-Version: 13\r\n"
                           b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n\r\n")
                async with asyncio.timeout(10):
                    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 101 "), (connection, head)
                    first, length = await reader.readexactly(2)
                    assert first == 0x81
                    if length == 126:
                        length = int.from_bytes(await reader.readexactly(2), "big")
                    readies.append(orjson.loads(await reader.readexactly(length))["type"])
                    writer.close()
            assert readies == ["ready"] * 3
            head, body = await exchange(gateway.port, b"GET /realtime HTTP/1.1\r\nUpgrade: websocket\r\n"
                                                      b"Connection: keep-alive\r\nSec-WebSocket-Version: 13\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert body == b"CONNECTION header value is not 'upgrade'"
            metrics = (await exchange(gateway.port, b"GET /metrics HTTP/1.0\r\n\r\n"))[1]
            assert b'gateway_refusals_total{reason="other"} 1.0' in metrics

    run(scenario())


def test_head_over_https(ca, trusted, tmp_path):
    cert_path, key_path = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "node")

    async def scenario():
        async with relay(tls_cert=cert_path, tls_key=key_path) as (gateway, _mock):
            head, rest = await exchange(gateway.port, b"HEAD /ready HTTP/1.0\r\n\r\n", ssl.create_default_context())
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and rest == b""
            assert int(header(head, "Content-Length")) > 0

    run(scenario())


@pytest.mark.parametrize("cut", [1, 5, 23])
def test_a_probe_cut_anywhere_is_answered_once(cut):
    """A HEAD request whose bytes straddle packets gets one whole answer."""
    async def scenario():
        async with relay() as (gateway, _mock):
            request = b"HEAD /health HTTP/1.1\r\nHost: node\r\n\r\n"
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                writer.write(request[:cut])
                await writer.drain()  # asyncio streams are TCP_NODELAY: the first part leaves alone
                writer.write(request[cut:])
                response = await reader.read()
                writer.close()
            assert response.count(b"HTTP/1.1 200 OK\r\n") == 1 and response.endswith(b"\r\n\r\n")

    run(scenario())


def _upgrade(request_line: bytes, *headers: bytes) -> bytes:
    return (request_line + b"\r\nHost: 127.0.0.1\r\n" + b"".join(line + b"\r\n" for line in headers) +
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " +
            base64.b64encode(os.urandom(16)) + b"\r\n\r\n")


def test_a_request_picows_cannot_parse_is_refused_without_quoting_it(caplog):
    """Found by a security audit: picows answers a head its parser refuses with a 400 quoting
    the offending line (a control byte in a credential, a folded header, a space after
    `?token=`), so a client token came back in the body; nothing was counted, and a target
    `urlsplit` cannot read was a 500 quoting Python's error. Each is now a 400 with picows'
    reason alone, counted under `other`."""
    token = b"ck-SECRETclienttoken-123456"
    line = b"GET /realtime HTTP/1.1"
    cases = [
        (_upgrade(line, b"Authorization: Bearer " + token + b"\x7f"),
         b"malformed HTTP request: Invalid HTTP header value for b'Authorization'\n"),
        (_upgrade(line, b"Sec-WebSocket-Protocol: realtime-gateway, realtime-gateway.bearer." + token + b"\x01"),
         b"malformed HTTP request: Invalid HTTP header value for b'Sec-WebSocket-Protocol'\n"),
        (_upgrade(line, b"X-Trace: 1", b" Authorization: Bearer " + token),
         b"malformed HTTP request: Obsolete folded HTTP header is not supported\n"),
        (_upgrade(b"GET /realtime?token=" + token + b" x HTTP/1.1"), b"malformed HTTP request: Malformed request line\n"),
        (_upgrade(b"GET //[x/realtime HTTP/1.1"), b"malformed request target\n"),
    ]

    async def scenario():
        async with relay() as (gateway, _mock):
            for request, reason in cases:
                head, body = await exchange(gateway.port, request)
                assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (request, head)
                assert body == reason and token not in head
            metrics = (await exchange(gateway.port, b"GET /metrics HTTP/1.0\r\n\r\n"))[1]
            assert b'gateway_refusals_total{reason="other"} 5.0' in metrics
            assert gateway.sessions == set()

    with caplog.at_level("DEBUG"):
        run(scenario())
    assert token.decode() not in caplog.text


def test_a_failure_while_routing_is_a_plain_500_and_a_scrubbed_log_line(caplog):
    """A bug of ours in routing an upgrade: picows would answer 500 with the exception's text
    and log nothing. The client gets a fixed 500; the log has the traceback, scrubbed."""
    async def scenario():
        async with relay() as (gateway, _mock):
            def broken(request):
                raise RuntimeError("boom near sk-proj-SECRETkey123456")
            gateway.authenticator.authenticate = broken
            head, body = await exchange(gateway.port, _upgrade(b"GET /realtime HTTP/1.1"))
            assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n") and body == b"internal error\n"
            metrics = (await exchange(gateway.port, b"GET /metrics HTTP/1.0\r\n\r\n"))[1]
            assert b'gateway_refusals_total{reason="other"} 1.0' in metrics

    with caplog.at_level("INFO"):
        run(scenario())
    failures = [record for record in caplog.records if record.getMessage().startswith("routing a request failed")]
    assert len(failures) == 1 and failures[0].levelname == "ERROR"
    assert "RuntimeError: boom near [redacted]" in failures[0].getMessage() and "SECRET" not in caplog.text


class _Recorder(asyncio.BufferedProtocol):
    """Stands in for picows' protocol: keeps what the sniffer hands it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._buffer = bytearray(256)

    def connection_made(self, transport) -> None:
        pass

    def get_buffer(self, sizehint: int):
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self._buffer[:nbytes]


class _Transport:
    def __init__(self) -> None:
        self.protocol = None
        self.written = b""

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        pass


@pytest.mark.parametrize("cut", [1, 2, 3, 5], ids=lambda cut: f"{cut}-byte pieces")
def test_a_head_trickled_in_pieces_is_found_wherever_its_blank_line_is_cut(cut):
    """The sniffer grows the head in place and looks for its end only in what is new (and the
    three bytes before it): every cut of the blank line is found, and picows gets every byte,
    the frame sent behind the head too."""
    from gateway.http_probes import RequestSniffer

    request = _upgrade(b"GET /realtime HTTP/1.1") + b"\x81\x80" + bytes(4)  # and an empty text frame
    ws, transport = _Recorder(), _Transport()
    sniffer = RequestSniffer(ws, lambda path, accept: (200, b"", "text/plain"), frozenset())
    sniffer.connection_made(transport)
    for offset in range(0, len(request), cut):
        sniffer.data_received(request[offset:offset + cut])
        if transport.protocol is not None:
            rest = request[offset + cut:]
            break
    assert transport.protocol is not None and transport.written == b""
    assert bytes(ws.received) + rest == request
