"""The upstream through an HTTP CONNECT proxy (`--upstream-proxy`, or HTTPS_PROXY as most
clients read it): how a node behind an egress proxy reaches OpenAI. The tunnel carries the
session byte-exact over ws:// and wss:// (TLS verified end to end, through the proxy); a proxy
that refuses the tunnel or cannot be reached ends the session with a ConnectionFailed that
names the proxy and never its credentials."""
from __future__ import annotations

import logging
from urllib.parse import urlsplit

import pytest
import trustme

import _fastpath

from tests.connect_proxy import ConnectProxy
from tests.relay_harness import TEST_KEY, RelayClient, free_port, one_turn, relay, speech_like
from tests.support import run
from tests.test_tls_upstream import server_context

COMPILED = _fastpath.IMPLEMENTATION == "compiled"
CREDENTIALS = ("egress-user", "proxy-secret-7531")
AUDIO = speech_like(0.4, seed=21)


def _with_credentials(proxy_url: str, credentials: tuple[str, str]) -> str:
    return proxy_url.replace("http://", f"http://{credentials[0]}:{credentials[1]}@")


def test_a_ws_upstream_through_an_authenticating_proxy_is_byte_exact():
    async def scenario():
        proxy = ConnectProxy(credentials=CREDENTIALS)
        proxy_url = _with_credentials(await proxy.start(), CREDENTIALS)
        try:
            return proxy, await one_turn(AUDIO, upstream_proxy=proxy_url)
        finally:
            await proxy.stop()

    proxy, (mock_url, ready, done, echoed, read_directly) = run(scenario(), timeout=20)
    assert ready["session_id"] and done["status"] == "completed" and echoed == AUDIO
    (request_line, headers), = proxy.requests
    assert request_line == f"CONNECT {urlsplit(mock_url).netloc} HTTP/1.1" and proxy.tunnels == 1
    assert headers["Proxy-Authorization"].startswith("Basic ")
    if COMPILED:
        assert read_directly > 0  # the tunnel is a plain socket: the compiled reader reads it


def test_a_wss_upstream_through_a_proxy_verifies_tls_end_to_end(tmp_path, monkeypatch):
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    async def scenario():
        proxy = ConnectProxy()
        proxy_url = await proxy.start()
        try:
            return proxy, await one_turn(AUDIO, upstream_proxy=proxy_url, upstream_tls=server_context(ca, "127.0.0.1"))
        finally:
            await proxy.stop()

    proxy, (mock_url, ready, done, echoed, read_directly) = run(scenario(), timeout=20)
    assert mock_url.startswith("wss://") and echoed == AUDIO and done["status"] == "completed"
    assert [line for line, _headers in proxy.requests] == [f"CONNECT {urlsplit(mock_url).netloc} HTTP/1.1"]
    assert read_directly == 0  # ciphertext: never parsed as frames


@pytest.mark.parametrize("case", ["refused", "unreachable"])
def test_a_proxy_that_gives_no_tunnel_is_a_prompt_connection_failure_without_its_credentials(case, caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario():
        proxy = ConnectProxy(credentials=CREDENTIALS)
        proxy_url = await proxy.start()
        if case == "unreachable":
            proxy_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        try:
            async with relay(upstream_proxy=_with_credentials(proxy_url, ("egress-user", "wrong-secret-2468"))) \
                    as (gateway, mock):
                client = await RelayClient.connect(gateway.url)
                error = await client.wait("error", timeout=5)
                await client.wait_closed()
                return proxy, proxy_url, mock.url, error, client, len(mock.open_sessions)
        finally:
            await proxy.stop()

    proxy, proxy_url, mock_url, error, client, upstream_sessions = run(scenario(), timeout=20)
    assert error["code"] == "ConnectionFailed" and error["fatal"] is True
    where = urlsplit(proxy_url).netloc
    expected = {
        "refused": f"upstream proxy {where} gave no tunnel to {urlsplit(mock_url).netloc}/v1/realtime: "
                   f"HTTP proxy rejected connection with status 407",
        "unreachable": f"cannot reach upstream proxy {where}: Connection refused",
    }[case]
    assert error["message"] == expected, error
    assert proxy.tunnels == 0 and upstream_sessions == 0
    assert client.of_type("ready") == [] and client.audio == b""
    for text in (str(client.events), caplog.text):
        assert "wrong-secret-2468" not in text and TEST_KEY not in text
