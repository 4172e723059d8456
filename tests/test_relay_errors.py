"""Errors of SPEC §2.3/§7: codes, fatality, close codes, and nothing left half-open."""
from __future__ import annotations

import asyncio
import contextlib
import base64
import hashlib
import re
import socket
import time

import orjson
import pytest
import websockets

from gateway.config import NodeConfig
from gateway.errors import (CLOSE_INTERNAL_ERROR, CLOSE_MESSAGE_TOO_BIG, CLOSE_SESSION_EXPIRED, CLOSE_TRY_AGAIN_LATER,
                            CLOSE_UPSTREAM_AUTH_FAILED)
from gateway.mock import MockOptions
from gateway.server import GatewayServer
from gateway.upstream.connection import MAX_UPSTREAM_MESSAGE_BYTES
from tests.relay_harness import TEST_KEY, RelayClient, ScriptedUpstream, relay, speech_like
from tests.support import run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _expect_fatal(client: RelayClient, code: str, close_code: int) -> dict:
    error = await client.wait("error", timeout=5, code=code)
    assert error["fatal"] is True
    await client.wait_closed(5)
    assert client.close_code == close_code
    return error


@pytest.mark.parametrize("mode", ["ws_error", "http_401"])
def test_bad_upstream_key_is_authentication_failed(mode, caplog):
    """Not even a fragment of the key leaves: OpenAI's message quotes it masked, last four
    characters kept (`sk-****…9876`), and those are the operator's too."""
    async def scenario():
        async with relay(MockOptions(bad_key=mode), api_key="sk-test-key-wrong-9876") as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            error = await _expect_fatal(client, "AuthenticationFailed", CLOSE_UPSTREAM_AUTH_FAILED)
            await gateway.wait_empty(3)
            return error

    caplog.set_level("DEBUG")
    error = run(scenario(), timeout=20)
    assert "9876" not in str(error) and "sk-" not in str(error), error
    assert "9876" not in caplog.text


def test_upstream_down_is_connection_failed_within_the_connect_timeout():
    async def scenario():
        config = NodeConfig(host="127.0.0.1", port=0, upstream="openai", api_key="test-key-1",
                            upstream_url=f"ws://127.0.0.1:{_free_port()}/v1/realtime", connect_timeout_s=1.0)
        async with GatewayServer(config) as gateway:
            started = time.monotonic()
            client = await RelayClient.connect(gateway.url)
            await _expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            assert time.monotonic() - started < 1.5
            await gateway.wait_empty(3)
    run(scenario(), timeout=20)


def test_an_upstream_host_that_does_not_resolve_is_connection_failed_every_time():
    """The node looks host names up itself (gateway.sockets.Resolver): a failed lookup reaches
    the client as ConnectionFailed, naming the host but no secret, and is not cached as an
    answer: the next session looks again and fails the same way. `.invalid` never resolves
    (RFC 6761); where the machine's DNS does not answer at all, the connect timeout ends it."""
    async def scenario():
        config = NodeConfig(host="127.0.0.1", port=0, upstream="openai", api_key="test-key-resolve",
                            upstream_url="ws://no-such-upstream.invalid:4443/v1/realtime", connect_timeout_s=2.0)
        async with GatewayServer(config) as gateway:
            for _ in range(2):
                started = time.monotonic()
                client = await RelayClient.connect(gateway.url)
                error = await _expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
                assert time.monotonic() - started < 2.5
                assert "no-such-upstream.invalid" in error["message"] or "2.0 s" in error["message"]
                assert "test-key-resolve" not in str(error)
            await gateway.wait_empty(3)
    run(scenario(), timeout=20)


def test_slow_upstream_handshake_times_out_as_connection_failed():
    async def scenario():
        async with relay(MockOptions(handshake_delay_s=3.0), connect_timeout_s=0.5) as (gateway, mock):
            started = time.monotonic()
            client = await RelayClient.connect(gateway.url)
            error = await _expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            elapsed = time.monotonic() - started
            assert 0.4 < elapsed < 1.2, elapsed
            assert "0.5 s" in error["message"]
            await gateway.wait_empty(3)
    run(scenario(), timeout=20)


async def _upgrade_accept(reader: asyncio.StreamReader) -> bytes:
    """Read the gateway's upgrade request: the Sec-WebSocket-Accept that answers its key."""
    request = await reader.readuntil(b"\r\n\r\n")
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


async def _read_until_hangup(reader: asyncio.StreamReader) -> bytes:
    """What the gateway sends until it hangs up, bounded at 5 s (to show what did not come)."""
    received = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                received += chunk
    return received


@contextlib.asynccontextmanager
async def _node_before_raw_upstream(answer, api_key: str):
    """A gateway whose upstream is `answer`, a raw asyncio server: the handshake's bytes are the
    test's own."""
    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    config = NodeConfig(host="127.0.0.1", port=0, upstream="openai", api_key=api_key,
                        upstream_url=f"ws://127.0.0.1:{port}/v1/realtime", connect_timeout_s=5.0)
    async with upstream, GatewayServer(config) as gateway:
        yield gateway

def test_an_upstream_rate_limiting_the_handshake_is_rate_limit_exceeded():
    """Found by an operations audit: HTTP 429 at the upgrade reached clients as ConnectionFailed
    (close 1011), though SPEC §3/§7 say rate limits surface as RateLimitExceeded. There is no
    session to go on with, so it is fatal, with close 1013 (try again later) and the HTTP status
    as the upstream code. The upstream here answers every upgrade with 429, as a rate-limiting
    provider or proxy does."""
    async def scenario():
        handshakes: list[bytes] = []

        async def rate_limited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handshakes.append(await reader.readuntil(b"\r\n\r\n"))
            body = b'{"error":{"type":"requests","code":"rate_limit_exceeded","message":"Too many requests"}}'
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 20\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()

        async with _node_before_raw_upstream(rate_limited, "test-key-429") as gateway:
            client = await RelayClient.connect(gateway.url)
            error = await _expect_fatal(client, "RateLimitExceeded", CLOSE_TRY_AGAIN_LATER)
            assert error["upstream"]["code"] == "http_429" and error["upstream"]["type"] == "handshake"
            assert error["message"].endswith("(HTTP 429; retry after 20 s)")
            assert error["upstream"]["retry_after_s"] == 20
            assert client.close_reason == "rate limit exceeded"
            assert "test-key-429" not in str(error) and not any(e["type"] == "ready" for e in client.events)
            assert len(handshakes) == 1 and b"Bearer test-key-429" in handshakes[0]   # no retry storm
            await gateway.wait_empty(3)
            from tests.test_faults import metric
            assert await metric(gateway, "gateway_sessions_total", outcome="upstream_failed") == 1
    run(scenario(), timeout=20)


@pytest.mark.parametrize("head, code, close_code, message", [
    (b"HTTP/1.0 401 Unauthorized\r\n\r\n", "AuthenticationFailed", 4001, "refused the API key (HTTP 401)"),
    (b"HTTP/1.1 401\r\nContent-Length: 0\r\n\r\n", "AuthenticationFailed", 4001, "refused the API key (HTTP 401)"),
    (b"HTTP/1.0 429 Too Many Requests\r\n\r\n", "RateLimitExceeded", 1013, "(HTTP 429)"),
    (b"HTTP/1.1 522 \r\nServer: cloudflare\r\nContent-Length: 0\r\n\r\n", "ConnectionFailed", 1011,
     "refused the WebSocket handshake (HTTP 522)"),
    (b"HTTP/1.1 503 Service Unavailable\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n", "ConnectionFailed", 1013,
     "is unavailable (HTTP 503)"),
    # the upstream's hint how long to wait, in the forms OpenAI's own clients read
    (b"HTTP/1.1 429 Too Many Requests\r\nretry-after-ms: 1500\r\nRetry-After: 2\r\n\r\n", "RateLimitExceeded",
     1013, "(HTTP 429; retry after 1.5 s)"),
    (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\n",
     "ConnectionFailed", 1013, "(HTTP 503; retry after 0 s)"),
    (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: soon\r\n\r\n", "RateLimitExceeded", 1013,
     "is rate limiting new sessions (HTTP 429)"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Accept: d3Jvbmc=\r\n\r\n", "ConnectionFailed", 1011,
     "answered the upgrade with an invalid WebSocket handshake (Sec-WebSocket-Accept header)"),
    # and the first events in the same packet: nobody may hear them
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
     + b"".join(b"\x81" + bytes([len(event)]) + event for event in (
         b'{"type":"session.created","session":{"id":"sess_x"}}', b'{"type":"session.updated","session":{}}'))
     + b"\x89\x02hi",  # and a ping: no pong either
     "ConnectionFailed", 1011, "answered with a WebSocket extension the gateway did not offer (permessage-deflate)"),
], ids=["http10_401", "401_without_reason", "http10_429", "cloudflare_522", "head_over_16k", "retry_after_ms",
        "retry_after_date", "retry_after_garbage", "wrong_accept", "unoffered_extension"])
def test_the_status_of_a_handshake_picows_cannot_parse_is_still_read(head, code, close_code, message):
    """Found by an upstream handshake audit: picows parses only `HTTP/1.1 <a code Python knows>
    <reason>`, so an HTTP/1.0 or reason-less 401 or 429, a front end's 52x (OpenAI is behind
    Cloudflare) and a head over 16 KiB all reached the client as a status-less ConnectionFailed;
    and a broken 101 read "refused the WebSocket handshake (HTTP 101)". The status comes from
    the head picows kept. A 101 naming an extension the gateway never offered is refused (RFC
    6455 §9.1): it went on to wait out the connect timeout on frames it could not read."""
    async def scenario():
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(head.replace(b"{accept}", await _upgrade_accept(reader)))
            await writer.drain()
            sent_after.append(await _read_until_hangup(reader))
            writer.close()

        async with _node_before_raw_upstream(answer, "test-key-status") as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.send_audio(b"\x01\x00" * 480)  # held for `ready`
            error = await _expect_fatal(client, code, close_code)
            await gateway.wait_empty(3)
            return error, client.of_type("ready")

    sent_after: list[bytes] = []
    error, ready = run(scenario(), timeout=20)
    assert error["message"].endswith(message) and "test-key-status" not in str(error)
    hint = re.search(r"retry after ([0-9.]+) s", message)
    assert error.get("upstream", {}).get("retry_after_s") == (float(hint.group(1)) if hint else None)
    assert ready == [] and sent_after == [b""]  # not even a close frame: the answer was no WebSocket


def test_the_reason_of_an_upstream_close_before_ready_is_told():
    """Found by the same audit: an upstream that closed with a reason (1008 "policy: ...", a
    4000 naming beta_api_shape_disabled) before `ready` reached the client as only "(close code
    N)", and the reason was in no log line either."""
    async def script(upstream: ScriptedUpstream) -> None:
        await upstream._ws.close(1008, "policy: organization not allowed")

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(NodeConfig(
                host="127.0.0.1", port=0, upstream="openai", api_key=TEST_KEY, upstream_url=url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            error = await _expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            await gateway.wait_empty(3)
            return error

    error = run(scenario(), timeout=20)
    assert error["message"] == ("upstream closed before the session was ready "
                                "(close code 1008: policy: organization not allowed)")


def test_an_upstream_redirect_is_not_followed_with_the_key(caplog):
    """Found by reading picows: ws_connect follows up to five HTTP redirects by default, sending
    the same headers again, so an upstream (or anything on its path, for ws://) answering 302
    could send the node's API key to any host it named. OpenAI never redirects a realtime
    upgrade; the gateway now refuses the redirect as a failed handshake."""
    async def scenario():
        upgrades: list[bytes] = []
        elsewhere: list[bytes] = []

        async def redirecting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upgrades.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: ws://127.0.0.1:%d/collect\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n" % collector_port)
            await writer.drain()
            writer.close()

        async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            elsewhere.append(await reader.readuntil(b"\r\n\r\n"))
            writer.close()

        collector = await asyncio.start_server(collect, "127.0.0.1", 0)
        collector_port = collector.sockets[0].getsockname()[1]
        upstream = await asyncio.start_server(redirecting, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        config = NodeConfig(host="127.0.0.1", port=0, upstream="openai", api_key="test-key-redirect",
                            upstream_url=f"ws://127.0.0.1:{port}/v1/realtime", connect_timeout_s=3.0)
        async with collector, upstream, GatewayServer(config) as gateway:
            client = await RelayClient.connect(gateway.url)
            error = await _expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            assert error["message"] == (f"upstream 127.0.0.1:{port}/v1/realtime refused the WebSocket handshake "
                                        "(HTTP 302)")
            await gateway.wait_empty(3)
        assert len(upgrades) == 1 and b"Bearer test-key-redirect" in upgrades[0]
        assert elsewhere == []  # the key went nowhere else
    run(scenario(), timeout=20)
    assert "test-key-redirect" not in caplog.text and "/collect" not in caplog.text


def test_rate_limited_response_is_rate_limit_exceeded_and_the_session_goes_on():
    async def scenario():
        async with relay(MockOptions(fail_responses="rate_limit_exceeded", fail_every_n=2)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "one"})
            assert (await client.wait("response_done"))["status"] == "completed"
            await client.send({"type": "text", "text": "two"})
            error = await client.wait("error")
            assert error["code"] == "RateLimitExceeded" and error["fatal"] is False
            assert error["upstream"]["code"] == "rate_limit_exceeded"
            assert (await client.wait("response_done"))["status"] == "failed"
            await client.send({"type": "text", "text": "three"})
            assert (await client.wait("response_done"))["status"] == "completed"
    run(scenario(), timeout=20)


def test_a_response_failed_for_quota_ends_the_session_after_its_response_done():
    """insufficient_quota arrives in a failed response.done (as OpenAI sends it); every later
    response would fail too, so it is fatal there exactly as in an `error` event: the client
    gets response_done "failed", then UpstreamError (fatal, upstream code kept), then close 1011."""
    async def scenario():
        async with relay(MockOptions(fail_responses="insufficient_quota")) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "one"})
            error = await _expect_fatal(client, "UpstreamError", CLOSE_INTERNAL_ERROR)
            assert error["upstream"]["code"] == "insufficient_quota"
            assert [e["type"] for e in client.events[-2:]] == ["response_done", "error"]
            assert client.events[-2]["status"] == "failed"
            await gateway.wait_empty(3)
    run(scenario(), timeout=20)


def test_a_model_name_with_control_characters_in_the_query_is_refused_at_the_upgrade():
    """?model= goes into logs and the upstream URL: a newline could forge a log line. It gets
    the check config.model gets, at the upgrade (HTTP 400), and no upstream is opened."""
    async def scenario():
        async with relay() as (gateway, mock):
            for bad in ("gpt-realtime%0A2026-01-01%20WARNING%20forged", "gpt%00%1B[31m", "m" * 129):
                with pytest.raises(websockets.InvalidStatus) as refused:
                    await websockets.connect(f"{gateway.url}?model={bad}")
                assert refused.value.response.status_code == 400
            assert mock.sessions == []
            client = await RelayClient.connect(gateway.url + "?model=gpt-realtime-mini")
            assert (await client.wait("ready"))["model"] == "gpt-realtime-mini"
    run(scenario(), timeout=20)


def test_bad_messages_are_invalid_message_and_the_session_goes_on():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.ws.send("{this is not json")
            await client.ws.send('{"type":"teleport"}')
            await client.ws.send('{"type":"text","text":42}')
            await client.ws.send(b"\xff\xfe\xfd".decode("latin-1"))
            errors = [await client.wait("error") for _ in range(4)]
            assert [e["code"] for e in errors] == ["InvalidMessage"] * 4
            assert [e.get("param") for e in errors[1:3]] == ["type", "text"]
            assert not any(e["fatal"] for e in errors)
            await client.send({"type": "text", "text": "a following turn"})
            assert (await client.wait("response_done"))["status"] == "completed"
            assert len(client.audio) > 0
    run(scenario(), timeout=20)


def test_an_unknown_field_on_a_command_is_named_and_the_command_applies():
    """A misspelt optional field was ignored silently: `"respnd": false` asked for a reply with
    nothing to say why. Now it gets its non-fatal error, as an unknown `config` field does."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "misspelt", "respnd": False})
            error = await client.wait("error")
            assert (error["code"], error["param"], error["fatal"]) == ("InvalidMessage", "respnd", False)
            assert "unknown field" in error["message"] and "'text'" in error["message"]
            item = await mock.sessions[0].wait_for_client_event("conversation.item.create")
            assert item["item"]["content"][0]["text"] == "misspelt"
            assert (await client.wait("response_done"))["status"] == "completed"  # `respond` kept its default
    run(scenario(), timeout=20)


def test_invalid_config_names_the_field_and_the_rest_applies():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "voice": "nova", "vad": {"threshold": 7},
                               "instructions": "applied"})
            errors = [await client.wait("error"), await client.wait("error")]
            assert {(e["code"], e["param"]) for e in errors} == {("InvalidConfig", "voice"),
                                                                  ("InvalidConfig", "vad.threshold")}
            ready = await client.wait("ready")
            assert ready["voice"] == "alloy" and set(ready["ignored"]) == {"voice", "vad.threshold"}
            update = await mock.sessions[0].wait_for_client_event("session.update")
            assert update["session"]["instructions"] == "applied"
            assert update["session"]["audio"]["input"]["turn_detection"]["threshold"] == 0.5
    run(scenario(), timeout=20)


def test_vad_parameters_the_mode_does_not_take_are_listed_as_ignored():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "semantic_vad",
                               "vad": {"threshold": 0.9, "silence_duration_ms": 800, "eagerness": "high"}})
            ready = await client.wait("ready")
            assert ready["ignored"] == ["vad.threshold", "vad.silence_duration_ms"]
            update = await mock.sessions[0].wait_for_client_event("session.update")
            detection = update["session"]["audio"]["input"]["turn_detection"]
            assert (detection["type"], detection["eagerness"]) == ("semantic_vad", "high")
            assert "threshold" not in detection
    run(scenario(), timeout=20)


def test_a_field_the_upstream_rejects_is_ignored_and_the_rest_applies():
    """The upstream validates a session.update atomically: one field it refuses (a voice change
    after the assistant spoke) would lose the whole update. The gateway reports that field by
    its client name and sends the rest again, so the instructions and the output format apply,
    and it relays in the format the upstream really uses."""
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "speak first"})   # voice locks after audio
            await client.wait("response_done")
            upstream = mock.sessions[0]
            await client.send({"type": "config", "voice": "ash", "instructions": "Be brief.",
                               "output_audio_format": "g711_ulaw"})
            error = await client.wait("error")
            assert (error["code"], error["param"], error["fatal"]) == ("InvalidConfig", "voice", False)
            assert error["upstream"]["code"] == "cannot_update_voice"
            updated = [e for e in upstream.sent if e["type"] == "session.updated"]
            while len(updated) < 2:   # the initial update's answer, then the retry's
                await upstream.wait_for_server_event("session.updated")
                updated = [e for e in upstream.sent if e["type"] == "session.updated"]
            retry = [e for e in upstream.received if e["type"] == "session.update"][-1]["session"]
            assert "voice" not in retry.get("audio", {}).get("output", {})
            assert retry["instructions"] == "Be brief."
            assert upstream.config["instructions"] == "Be brief."
            assert upstream.config["audio"]["output"]["format"] == {"type": "audio/pcmu"}
            assert upstream.config["audio"]["output"]["voice"] == "alloy"
            session = next(iter(gateway.sessions))
            assert session.output_bytes_per_ms == 8   # relays what the upstream now sends: G.711
    run(scenario(), timeout=20)


def test_a_field_the_upstream_rejects_before_ready_is_listed_as_ignored():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "instructions": "x", "turn_detection": "none",
                               "input_transcription": {"model": "whisper-2"}})
            ready = await client.wait("ready")
            assert ready["ignored"] == ["input_transcription.model"]
            assert ready["turn_detection"] == "none" and ready["input_transcription"] == "whisper-1"
            error = await client.wait("error")
            assert (error["param"], error["fatal"]) == ("input_transcription.model", False)
            assert mock.sessions[0].config["instructions"] == "x"
    run(scenario(), timeout=20)


def test_a_rejected_or_inapplicable_field_is_named_as_the_client_spelled_it():
    """Found by two audits: a WaaV client names transcription by `transcription_model` and VAD
    settings inside `turn_detection`; `param` and `ignored` named them in the seed's spelling
    (`input_transcription.model`, `vad.eagerness`), fields that client never sent."""
    async def scenario():
        async with relay() as (gateway, _mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "update_session", "instructions": "x", "transcription_model": "whisper-2",
                               "turn_detection": {"mode": "server_vad", "eagerness": "high"}})
            ready = await client.wait("ready")
            rejected = await client.wait("error")
            await client.send({"type": "config", "voice": "ash", "input_transcription": {"model": "whisper-3"}})
            seed = await client.wait("error")
            updated = await client.wait("session_updated")
            await client.close()
            return ready, rejected, seed, updated

    ready, rejected, seed, updated = run(scenario(), timeout=20)
    # eagerness does not apply to server VAD: kept, listed, no error (ready tells)
    assert ready["ignored"] == ["turn_detection.eagerness", "transcription_model"]
    assert rejected["param"] == "transcription_model" and "upstream rejected transcription_model" in rejected["message"]
    # the same field given later in the seed's spelling is named in that spelling
    assert seed["param"] == "input_transcription.model"
    assert updated["voice"] == "ash" and updated["ignored"] == ["turn_detection.eagerness", "input_transcription.model"]


def test_upstream_drop_mid_response_is_fatal_with_a_clean_close():
    async def scenario():
        async with relay(MockOptions(close_after_events=8, pacing="realtime")) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "talk to me"})
            await client.wait("response_started")
            error = await _expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            assert "lost" in error["message"]
            await gateway.wait_empty(3)
            await mock.sessions[0].wait_closed(3)
    run(scenario(), timeout=20)


_OVER_LIMIT = MAX_UPSTREAM_MESSAGE_BYTES + 1
_HALF = MAX_UPSTREAM_MESSAGE_BYTES // 2 + 1


_REFUSED = "the gateway closed the upstream connection: "


@pytest.mark.parametrize("raw, close_code, message", [
    # one frame whose header declares 64 MiB + 1: picows' parser refuses it from the header alone
    (b"\x81\x7f" + _OVER_LIMIT.to_bytes(8, "big"), 1009, _REFUSED + "it sent a message over 64 MiB (close code 1009)"),
    # two fragments of just over 32 MiB each: the gateway's assembler refuses the second
    (b"\x01\x7f" + _HALF.to_bytes(8, "big") + b"{" * _HALF + b"\x80\x7f" + _HALF.to_bytes(8, "big") + b"}" * _HALF,
     1009, _REFUSED + "it sent a message over 64 MiB (close code 1009)"),
    (b"\x83\x00", 1002, _REFUSED + "it broke the WebSocket protocol (close code 1002)"),  # opcode 3 is reserved
    # a close frame with no status: picows reads it as 0; the client was told "close code 0" and
    # the upstream answered with a close carrying 0, which no endpoint may send (RFC 6455 §7.4)
    (b"\x88\x00", 1000, "upstream connection lost (close code 1005)"),
], ids=["oversized_frame", "oversized_fragments", "reserved_opcode", "close_without_status"])
def test_an_upstream_message_the_gateway_refuses_is_named_in_the_error(raw, close_code, message):
    """Found by audits: the gateway closed such an upstream itself (1009 / 1002), then told
    the client "upstream connection lost (no close frame)", as if the upstream had vanished;
    `close_code` is what the gateway's close frame carried."""
    received_close: list[int] = []

    async def script(upstream: ScriptedUpstream) -> None:
        await upstream.receive("session.update")
        await upstream.updated()
        await upstream.receive("conversation.item.create")
        upstream._ws.transport.write(raw)
        await upstream._ws.wait_closed()
        received_close.append(upstream._ws.close_code)

    async def scenario():
        async with ScriptedUpstream(script) as url, GatewayServer(NodeConfig(
                host="127.0.0.1", port=0, upstream="openai", api_key=TEST_KEY, upstream_url=url)) as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "hello"})
            error = await _expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            assert error["message"] == message
            await gateway.wait_empty(3)
            assert received_close == [close_code]
    run(scenario(), timeout=30)


def test_session_expiry_is_fatal(caplog):
    async def scenario():
        async with relay(MockOptions(session_max_s=0.5)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            error = await _expect_fatal(client, "SessionExpired", CLOSE_SESSION_EXPIRED)
            assert error["upstream"]["code"] == "session_expired"
            await gateway.wait_empty(3)
    run(scenario(), timeout=20)
    # an end the client did not bring about is a WARNING (the oversized message below: INFO)
    assert [record.levelname for record in caplog.records if "SessionExpired" in record.getMessage()] == ["WARNING"]


def test_a_beta_node_before_todays_openai_is_told_which_setting_to_change(caplog, monkeypatch):
    """OpenAI refuses the beta shape (`beta_api_shape_disabled`, close 4000). Found by a README
    audit: a node set to beta got the upstream's UpstreamError, which names no setting, where a
    node set to ga before a beta upstream is told to change --upstream-dialect. Both are now."""
    from gateway import session
    monkeypatch.setattr(session, "_DIALECT_MISMATCHES_LOGGED", set())

    async def scenario():
        async with relay(MockOptions(beta="reject"), upstream_dialect="beta") as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            error = await _expect_fatal(client, "ConnectionFailed", CLOSE_INTERNAL_ERROR)
            assert error["message"] == ("the upstream speaks the ga dialect, not the beta dialect this gateway "
                                        "is set to (--upstream-dialect)")
            assert error["upstream"]["code"] == "beta_api_shape_disabled"
            assert client.of_type("ready") == []
            await gateway.wait_empty(3)
    run(scenario(), timeout=20)
    fixes = [record.getMessage() for record in caplog.records if "start it with --upstream-dialect" in record.getMessage()]
    assert len(fixes) == 1 and fixes[0].endswith(
        "the upstream speaks the ga dialect (it refuses the beta shape: beta_api_shape_disabled), the node is set "
        "to beta: start it with --upstream-dialect ga")


def test_oversized_message_closes_with_1009(caplog):
    """... and is logged at INFO: the client ended its own session (a logging audit found such
    ends, a vanished client's and a slow one's too, at WARNING, the level of an upstream's)."""
    import logging

    async def scenario():
        async with relay(max_message_bytes=4096) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.send({"type": "text", "text": "x" * 5000})
            error = await _expect_fatal(client, "InvalidMessage", CLOSE_MESSAGE_TOO_BIG)
            assert "4096" in error["message"]
            await gateway.wait_empty(3)
            await mock.sessions[0].wait_closed(3)
    with caplog.at_level(logging.INFO, logger="gateway.session"):
        run(scenario(), timeout=20)
    assert [record.levelname for record in caplog.records if "InvalidMessage" in record.getMessage()] == ["INFO"]


def test_pre_ready_overflow_is_an_error_not_a_silent_drop():
    """Audio past the pre-ready buffer gets one non-fatal NotConnected, and from then on all of
    it is dropped until `ready`, even a frame that would still fit: what goes up is the unbroken
    start of what the client sent, never audio with a hole in it."""
    held = speech_like(0.15, seed=1)  # 150 ms of the 200 ms buffer (a commit needs 100 ms)

    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.3), pre_ready_buffer_ms=200) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.send_audio(held)
            await client.send_audio(speech_like(0.06, seed=2))  # past 200 ms: dropped
            await client.send_audio(speech_like(0.02, seed=3))  # would fit, but after a hole
            error = await client.wait("error")
            assert error["code"] == "NotConnected" and error["fatal"] is False
            assert "until `ready` is dropped" in error["message"]
            await client.wait("ready")
            await client.send({"type": "commit"})
            await client.send({"type": "create_response"})
            await client.wait("response_done")
            assert bytes(client.audio) == held
            assert len(client.of_type("error")) == 1
    run(scenario(), timeout=20)


def test_commands_before_ready_are_bounded_in_bytes_as_one_largest_message():
    """Forwarded OpenAI events may be megabytes each (an append's audio): before `ready` the
    commands held may total --max-message-bytes, so one always fits and a flood of large ones
    gets NotConnected instead of holding memory without bound. What was held arrives in order."""
    chunk = speech_like(0.5, seed=4)  # 24,000 bytes of PCM, ~32 KB as a forwarded append
    append = {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}
    size = len(orjson.dumps(append))

    async def scenario():
        async with relay(MockOptions(handshake_delay_s=0.3), max_message_bytes=3 * size) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            for _ in range(5):
                await client.send(append)
            error = await client.wait("error")
            assert error["code"] == "NotConnected" and error["fatal"] is False
            assert f"may hold {3 * size} bytes in all" in error["message"]
            await client.wait("ready")
            await client.send({"type": "commit"})
            await client.send({"type": "create_response"})
            await client.wait("response_done")
            assert bytes(client.audio) == chunk * 3  # the three that fitted, nothing else
            assert [e["code"] for e in client.of_type("error")] == ["NotConnected"] * 2
    run(scenario(), timeout=20)


def test_client_disconnect_closes_the_upstream():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            await client.close()
            await mock.sessions[0].wait_closed(3)
            await gateway.wait_empty(3)
            assert gateway.sessions == set()
    run(scenario(), timeout=20)


def _server_frame(first_byte: int, payload: bytes) -> bytes:
    """An unmasked frame as an upstream sends it (payloads under 126 bytes)."""
    return bytes((first_byte, len(payload))) + payload


def _client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, unmasked payload) of each whole masked frame the gateway sent."""
    frames, offset = [], 0
    while offset + 2 <= len(data):
        size, header = data[offset + 1] & 0x7F, 2
        if size == 126:
            size, header = int.from_bytes(data[offset + 2:offset + 4], "big"), 4
        elif size == 127:
            size, header = int.from_bytes(data[offset + 2:offset + 10], "big"), 10
        if offset + header + 4 + size > len(data):
            break
        mask = data[offset + header:offset + header + 4]
        body = data[offset + header + 4:offset + header + 4 + size]
        frames.append((data[offset], bytes(byte ^ mask[index % 4] for index, byte in enumerate(body))))
        offset += header + 4 + size
    return frames


_CREATED = orjson.dumps({"type": "session.created", "event_id": "event_1", "session": {"id": "sess_raw"}})
_DELTA = orjson.dumps({"type": "response.output_audio.delta", "item_id": "item_1", "delta": "AQI="})
_RESPONSE_CREATED = orjson.dumps({"type": "response.created", "response": {"id": "resp_9", "status": "in_progress"}})


_BROKE = "broke"  # the client hears that the upstream broke the protocol


@pytest.mark.parametrize("frames, reply, told", [
    pytest.param(_server_frame(0xC1, _DELTA), 1002, _BROKE, id="rsv1_delta"),  # a "compressed" audio delta
    pytest.param(_server_frame(0xC1, _DELTA) + _server_frame(0x81, _DELTA), 1002, _BROKE,
                 id="rsv1_then_delta"),                                       # nothing after it is relayed
    pytest.param(_server_frame(0xA9, b"hi"), 1002, _BROKE, id="rsv2_ping"),    # no pong
    pytest.param(_server_frame(0x80, b'{"type":"x.y"}'), 1002, _BROKE, id="orphan_continuation"),
    pytest.param(_server_frame(0x01, b'{"type":') + _server_frame(0x81, b'{"type":"x.y"}'), 1002, _BROKE,
                 id="message_in_message"),
    pytest.param(b"\x81\x83" + bytes(4) + b"{}}", 1002, _BROKE, id="masked"),  # as only clients may: picows' parser
    pytest.param(_server_frame(0x81, b'{"type":"error","error":{"message":"\xed\xa0\x80"}}') * 2
                 + _server_frame(0x81, _DELTA), 1007, _BROKE, id="not_utf8"),
    pytest.param(_server_frame(0x88, (1006).to_bytes(2, "big")), 1002, _BROKE, id="close_1006"),  # never sent
    pytest.param(_server_frame(0x88, (5000).to_bytes(2, "big")), 1002, _BROKE, id="close_5000"),
    pytest.param(_server_frame(0x88, (0).to_bytes(2, "big")), 1002, _BROKE, id="close_0"),  # 0: not "no status"
    # picows' parser fails these closes itself, and delivered what came in its next read (a README
    # audit): (what is sent, what is sent once the gateway's close has come)
    pytest.param((_server_frame(0x88, (1005).to_bytes(2, "big")), _server_frame(0x81, _RESPONSE_CREATED)), 1002,
                 _BROKE, id="close_1005_then_event"),
    pytest.param((_server_frame(0x88, (1005).to_bytes(2, "big")), _server_frame(0x81, _DELTA)), 1002,
                 _BROKE, id="close_1005_then_delta"),
    pytest.param((_server_frame(0x88, (1005).to_bytes(2, "big")),
                  _server_frame(0x01, _RESPONSE_CREATED[:20]) + _server_frame(0x80, _RESPONSE_CREATED[20:])), 1002,
                 _BROKE, id="close_1005_then_fragments"),
    # picows reads a frame ahead: it fails the masked one (1002) before the close reaches us
    pytest.param(_server_frame(0x88, (4000).to_bytes(2, "big")) + b"\x81\x83" + bytes(4) + b"{}}", 1002,
                 "upstream connection lost (close code 4000)", id="close_then_masked"),
    # nothing follows a close (RFC 6455 §5.5.1): what does is ignored, and the close stands (a review)
    pytest.param(_server_frame(0x88, (4000).to_bytes(2, "big") + b"bye") + _server_frame(0xC1, _DELTA), 4000,
                 "upstream connection lost (close code 4000: bye)", id="close_then_rsv1_delta"),
    pytest.param(_server_frame(0x88, b""), 1000, "upstream connection lost (close code 1005)",
                 id="close_without_status"),
    pytest.param(_server_frame(0x88, (4000).to_bytes(2, "big") + b"bye"), 4000,
                 "upstream connection lost (close code 4000: bye)", id="close_4000"),
])
def test_an_upstream_that_breaks_rfc_6455_is_failed_with_1002(frames, reply, told, caplog):
    """Found by a framing audit: the upstream leg ignored reserved bits (an RSV1 "compressed"
    audio delta was decoded and played, an RSV2 ping answered), closed with 1011 and an asyncio
    "never retrieved" traceback for a fragmentation error, and echoed close codes no endpoint
    may send (1006, 5000; 0 was answered with 1000); text that is not UTF-8 was one event
    dropped with a warning (RFC 6455 §8.1: close 1007). Each now fails the connection (1002,
    1007), the client's ConnectionFailed says the upstream broke the protocol, nothing that
    came after it is relayed or handled (§7.1.7; a review found the rest of the read still
    played), and the log has no ERROR line: picows' own parser errors (a masked server frame)
    are INFO, as on the client leg, and the error it keeps is retrieved however the close
    went."""
    import gc
    import logging

    async def scenario():
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + await _upgrade_accept(reader) + b"\r\n\r\n"
                         + _server_frame(0x81, _CREATED))
            received = b""
            while b"session.update" not in b"".join(payload for _, payload in _client_frames(received)):
                received += await reader.read(65536)
            updated = orjson.dumps({"type": "session.updated", "event_id": "event_2", "session": SESSION})
            writer.write(b"\x81\x7e" + len(updated).to_bytes(2, "big") + updated)
            await client_ready.wait()
            first, behind = frames if isinstance(frames, tuple) else (frames, b"")
            writer.write(first)
            seen = b""
            while behind and not any(byte & 0x0F == 0x8 for byte, _ in _client_frames(seen)):
                seen += await reader.read(65536)  # until the gateway's close, then what follows it
            writer.write(behind)
            answered.extend(_client_frames(seen + await _read_until_hangup(reader)))
            writer.close()

        client_ready = asyncio.Event()
        answered: list[tuple[int, bytes]] = []
        async with _node_before_raw_upstream(answer, "test-key-frames") as gateway:
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready", timeout=5)
            client_ready.set()
            await client.wait_closed(10)
            await gateway.wait_empty(3)
        return answered, client.of_type("error"), bytes(client.audio), client.of_type("response_started")

    from tests.relay_harness import SESSION
    with caplog.at_level(logging.INFO):
        answered, errors, audio, started = run(scenario(), timeout=30)
        gc.collect()  # an exception nobody retrieved is logged as its future goes
    closes = [int.from_bytes(payload[:2], "big") for first, payload in answered if first & 0x0F == 0x8]
    assert closes == [reply] and not [first for first, _ in answered if first & 0x0F == 0xA]  # no pong
    assert audio == b"" and started == []
    assert errors[-1]["code"] == "ConnectionFailed"
    assert errors[-1]["message"].endswith(f"it broke the WebSocket protocol (close code {reply})" if told == _BROKE
                                          else told)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    # each line of ours about it names the session (a logging audit found this one did not)
    broke = [record.getMessage() for record in caplog.records if "upstream broke the WebSocket" in record.getMessage()]
    assert all(message.startswith("session gw_") for message in broke), broke


@pytest.mark.parametrize("headers, seconds", [
    (b"Retry-After: 20", 20.0),
    (b"retry-after-ms: 1500\r\nRetry-After: 2", 1.5),
    (b"retry-after-ms: soon\r\nRetry-After: 7", 7.0),            # an unreadable one hid the other
    (b"Retry-After: Wed, 21 Oct 2015 07:28:00 GMT", 0.0),          # a date passed: now
    (b"Retry-After: 99999999999", None),                           # no hint a client could act on
    (b"retry-after-ms: 1e300", None),
    (b"Retry-After: -5", None),
    (b"Retry-After: nan", None),
    (b"X-A: b\r\n Retry-After: 5", None),                          # a folded line is X-A's value
    (b"Retry-After : 4", None),                                    # RFC 9112 §5.1: no space before ':'
    (b"Retry-After: 3\r\nRetry-After: 9", 3.0),
])
def test_a_retry_after_hint_is_read_only_where_it_is_one(headers, seconds):
    """A review of the Retry-After reading: absurd values were passed on (1e+11 s), a bad
    `retry-after-ms` hid a good `Retry-After`, and folded or malformed lines were read."""
    from types import SimpleNamespace

    from gateway.upstream.connection import _retry_after_s
    head = b"HTTP/1.1 429 Too Many Requests\r\n" + headers + b"\r\n\r\n"
    assert _retry_after_s(SimpleNamespace(raw_header=head)) == seconds
