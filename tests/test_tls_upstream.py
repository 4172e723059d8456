"""The upstream over TLS: OpenAI and Azure are wss://, and everything else in the suite talks to
the mock over ws://. Here the mock speaks wss:// with a certificate from a test CA (trustme);
the gateway trusts that CA the way an operator makes it trust a private one, through
`SSL_CERT_FILE`, and must verify it: an unknown issuer or another host's name is refused at
once, as `ConnectionFailed`, without the key or the certificate's details leaking.

The compiled reader reads sockets itself only where the bytes are the WebSocket's own: a TLS
socket stays with its transport, so the echo is exact with direct reads on."""
from __future__ import annotations

import asyncio
import re
import signal
import ssl
import subprocess
import sys

import orjson
import pytest
import trustme
import websockets

import _fastpath

from gateway.upstream.trust import client_tls_context
from tests.relay_harness import TEST_KEY, RelayClient, one_turn, relay, speech_like
from tests.support import run

COMPILED = _fastpath.IMPLEMENTATION == "compiled"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def trusted(ca, tmp_path, monkeypatch):
    """The gateway process trusts the test CA (and only it), as `SSL_CERT_FILE` makes OpenSSL do."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def test_a_wss_upstream_carries_a_turn_byte_exact(ca, trusted):
    """The same turn over ws:// and wss://: both echo exactly; the compiled reader reads the
    plain upstream socket itself and never the TLS one."""
    audio = speech_like(0.6, seed=11)

    async def scenario():
        return await one_turn(audio), await one_turn(audio, upstream_tls=server_context(ca, "127.0.0.1"))

    plain, tls = run(scenario(), timeout=20)
    assert plain[0].startswith("ws://127.0.0.1:") and tls[0].startswith("wss://127.0.0.1:")
    for _url, ready, done, echoed, _read_directly in (plain, tls):
        assert ready["session_id"] and done["status"] == "completed"
        assert echoed == audio
    assert tls[4] == 0  # ciphertext is never parsed as frames
    if COMPILED:
        assert plain[4] > 0  # ...which the reader would have done with a plain socket


def test_wss_sessions_share_one_tls_context(ca, trusted):
    """A TLS context holds its own parsed copy of the trusted CAs: with the system bundle, 0.8 MiB
    and 15 ms of CPU each. Every upstream connection verifies with the process's one context
    (picows alone would make a new one per connection), and each still verifies and echoes."""
    audio = speech_like(0.3, seed=5)

    async def scenario():
        async with relay(upstream_tls=server_context(ca, "127.0.0.1")) as (gateway, mock):
            clients = [await RelayClient.connect(gateway.url) for _ in range(3)]
            for client in clients:
                await client.wait("ready")
            contexts = [session.upstream.transport.underlying_transport.get_extra_info("ssl_object").context
                        for session in gateway.sessions]
            echoed = []
            for client in clients:
                await client.push_to_talk(audio)
                await client.wait("response_done")
                echoed.append(bytes(client.audio))
                await client.close()
            return contexts, echoed

    contexts, echoed = run(scenario(), timeout=20)
    assert len(contexts) == 3 and all(context is client_tls_context() for context in contexts)
    assert contexts[0].verify_mode == ssl.CERT_REQUIRED and contexts[0].check_hostname
    assert echoed == [audio] * 3


def test_the_upstream_context_verifies_as_the_default_one_does():
    """The process's context is built by hand (a subclass, to resume sessions): it must verify
    exactly as `ssl.create_default_context()` would, on every Python the project supports."""
    ours, default = client_tls_context(), ssl.create_default_context()
    for setting in ("protocol", "verify_mode", "check_hostname", "verify_flags", "options", "minimum_version",
                    "maximum_version", "hostname_checks_common_name", "post_handshake_auth", "security_level"):
        assert getattr(ours, setting) == getattr(default, setting), setting
    assert ours.cert_store_stats() == default.cert_store_stats()
    assert ours.get_ciphers() == default.get_ciphers()


async def _call(gateway, audio: bytes) -> tuple[bool, bytes]:
    """One push-to-talk turn on a fresh session: whether its upstream TLS resumed, and the reply."""
    client = await RelayClient.connect(gateway.url)
    await client.wait("ready")
    resumed = next(iter(gateway.sessions)).upstream.tls_resumed
    await client.push_to_talk(audio)
    await client.wait("response_done")
    await client.close()
    return resumed, bytes(client.audio)


def test_a_second_upstream_session_resumes_tls_and_a_reload_starts_afresh(ca, trusted):
    """Every upstream session goes to the same host: the second offers the first's ticket and
    resumes (no certificate chain sent or verified), as nginx does by default. Both echo
    exactly. A trust reload starts a new context, whose first handshake is a full one again (a
    session verified against the old CAs is not offered under the new ones). /metrics counts both."""
    audio = speech_like(0.3, seed=9)

    async def scenario():
        async with relay(upstream_tls=server_context(ca, "127.0.0.1")) as (gateway, mock):
            calls = [await _call(gateway, audio), await _call(gateway, audio)]
            gateway.reload()
            calls += [await _call(gateway, audio), await _call(gateway, audio)]
            return calls, gateway.metrics.render()[0].decode()

    calls, metrics = run(scenario(), timeout=30)
    assert [resumed for resumed, _ in calls] == [False, True, False, True]
    assert [echoed for _, echoed in calls] == [audio] * 4
    assert 'gateway_upstream_tls_handshakes_total{resumed="no"} 2.0' in metrics
    assert 'gateway_upstream_tls_handshakes_total{resumed="yes"} 2.0' in metrics


def test_a_trust_reload_during_a_handshake_does_not_poison_the_new_context(ca, trusted, monkeypatch):
    """A session belongs to the context that made it: offered under another, Python refuses it
    ("Session refers to a different SSLContext") and the connection fails. A SIGHUP that lands
    while a connection's upgrade is answered must leave that connection's session with its own
    (retired) context: the next session starts a full handshake under the new one, and works."""
    import gateway.upstream.connection as connection
    from gateway.upstream.trust import reload_client_trust

    audio = speech_like(0.3, seed=10)
    release = connection.release_handshake
    reloads = []

    def release_then_reload(transport):  # the last step before the session is remembered
        release(transport)
        if not reloads:
            reloads.append(reload_client_trust())

    monkeypatch.setattr(connection, "release_handshake", release_then_reload)

    async def scenario():
        async with relay(upstream_tls=server_context(ca, "127.0.0.1")) as (gateway, mock):
            return [await _call(gateway, audio), await _call(gateway, audio), await _call(gateway, audio)]

    calls = run(scenario(), timeout=30)
    assert len(reloads) == 1
    assert [resumed for resumed, _ in calls] == [False, False, True]  # the 2nd: new context, full
    assert [echoed for _, echoed in calls] == [audio] * 3


def test_a_plain_upstream_counts_no_tls_handshakes():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.wait("ready")
            resumed = next(iter(gateway.sessions)).upstream.tls_resumed
            await client.close()
            return resumed, gateway.metrics.render()[0].decode()

    resumed, metrics = run(scenario(), timeout=20)
    assert resumed is None
    assert 'gateway_upstream_tls_handshakes_total{resumed="no"} 0.0' in metrics
    assert 'gateway_upstream_tls_handshakes_total{resumed="yes"} 0.0' in metrics


def test_sighup_reloads_the_trusted_cas_for_new_upstream_connections(ca, trusted, tmp_path, caplog):
    """The CA bundle is read again on SIGHUP (a rotated private CA): connections opened after it
    verify against the new bundle, a call opened before goes on, and an emptied bundle is refused
    with one log line while the one in service stays."""
    bundle = tmp_path / "ca.pem"  # the `trusted` fixture's SSL_CERT_FILE: the path never changes
    other = trustme.CA()
    audio = speech_like(0.3, seed=7)

    async def new_call(gateway, first_event: str) -> dict:
        """A new client's first event: `ready`, or the `error` that refused its upstream."""
        client = await RelayClient.connect(gateway.url)
        event = await client.wait(first_event)
        await client.close()
        return event

    async def turn(client: RelayClient) -> None:
        before = len(client.audio)
        await client.push_to_talk(audio)
        await client.wait("response_done", timeout=10)
        assert bytes(client.audio[before:]) == audio

    async def scenario():
        async with relay(upstream_tls=server_context(ca, "127.0.0.1")) as (gateway, mock):
            first = await RelayClient.connect(gateway.url)
            await first.wait("ready")
            bundle.write_bytes(b"")
            gateway.reload()
            assert "upstream trust store not reloaded" in caplog.text and "kept those" in caplog.text
            await new_call(gateway, "ready")  # still the CA in service
            other.cert_pem.write_to_path(str(bundle))  # rotated to a CA that did not sign the upstream
            gateway.reload()
            refused = await new_call(gateway, "error")
            assert refused["code"] == "ConnectionFailed" and "unable to get local issuer" in refused["message"]
            await turn(first)  # opened before the reload: goes on
            bundle.write_bytes(ca.cert_pem.bytes() + other.cert_pem.bytes())
            gateway.reload()
            assert "reloaded the upstream trust store: 2 CA certificate(s)" in caplog.text
            await new_call(gateway, "ready")
            await turn(first)
            await first.close()

    caplog.set_level("INFO", logger="gateway.server")
    run(scenario(), timeout=30)


@pytest.mark.parametrize("names, why", [
    (("127.0.0.1",), "issuer"),           # a CA the gateway does not trust
    (("upstream.example",), "hostname"),  # a trusted CA, another host's certificate
])
def test_an_upstream_certificate_that_fails_verification_is_a_prompt_connection_failure(
        ca, tmp_path, monkeypatch, names, why):
    if why == "issuer":
        other = trustme.CA()  # the gateway trusts `other`, the upstream's certificate is from `ca`
        path = tmp_path / "other.pem"
        other.cert_pem.write_to_path(str(path))
    else:
        path = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    async def scenario():
        # connect_timeout_s 3: a refusal must come from the verification, not the timer
        async with relay(upstream_tls=server_context(ca, *names)) as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            loop = asyncio.get_running_loop()
            started = loop.time()
            error = await client.wait("error", timeout=5)
            elapsed = loop.time() - started
            await client.wait_closed()
            return error, elapsed, client, len(mock.open_sessions)

    error, elapsed, client, upstream_sessions = run(scenario(), timeout=20)
    assert error["code"] == "ConnectionFailed" and error["fatal"] is True
    assert "presented a TLS certificate that does not verify: " in error["message"], error
    assert {"issuer": "unable to get local issuer certificate",
            "hostname": "IP address mismatch"}[why] in error["message"], error
    assert elapsed < 2.0
    assert client.of_type("ready") == [] and client.audio == b""
    assert upstream_sessions == 0  # no WebSocket was opened over the refused channel
    assert TEST_KEY not in str(client.events)


def test_the_standalone_mock_serves_wss_with_tls_flags_and_refuses_half_of_them(ca, tmp_path):
    """`realtime-gateway mock --tls-cert --tls-key`: what the relay benchmark's TLS point and an
    operator testing a wss:// client pipeline start."""
    certificate = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(str(cert_path))
    certificate.private_key_pem.write_to_path(str(key_path))
    mock = [sys.executable, "-m", "gateway", "mock", "--host", "127.0.0.1", "--port", "0"]

    for flags, complaint in ((["--tls-cert", str(cert_path)], "--tls-cert and --tls-key go together"),
                             (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key_path)],
                              "cannot load --tls-cert/--tls-key: No such file or directory")):
        refused = subprocess.run(mock + flags, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and refused.stderr.strip() == f"realtime-gateway mock: {complaint}", refused

    process = subprocess.Popen(mock + ["--tls-cert", str(cert_path), "--tls-key", str(key_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # printed once listening
        match = re.search(r"wss://127\.0\.0\.1:(\d+)/v1/realtime", line)
        assert match, line

        async def scenario() -> dict:
            client_context = ssl.create_default_context()
            ca.configure_trust(client_context)
            async with websockets.connect(match.group(0) + "?model=gpt-realtime", ssl=client_context,
                                          additional_headers={"Authorization": f"Bearer {TEST_KEY}"}) as ws:
                return orjson.loads(await ws.recv())

        assert run(scenario(), timeout=10)["type"] == "session.created"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
