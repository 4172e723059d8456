"""`--tls-cert` / `--tls-key`: the node serves `wss://` (and https:// probes) itself, for
deployments without a TLS-terminating load balancer — a browser page served over https may only
open `wss://` sockets. SIGHUP puts a renewed certificate in service while calls go on."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl

import orjson
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

import _fastpath
from gateway import config as node_config
from gateway import server as server_module
from gateway.config import ConfigError
from tests.relay_harness import RelayClient, gateway_process, relay, speech_like
from tests.support import run
from tests.test_faults import wait_for
from tests.test_tls_upstream import ca, trusted  # noqa: F401 (fixtures: a CA the test process trusts)

COMPILED = _fastpath.IMPLEMENTATION == "compiled"


def write_pair(cert: trustme.LeafCert, directory, name: str) -> tuple[str, str]:
    """The certificate chain and its key as two PEM files: (cert path, key path)."""
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


async def https_get(port: int, path: str) -> tuple[int, bytes, bytes]:
    """GET over TLS, verified against the trusted CA: (status, body, the server certificate's DER)."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context(),
                                                       server_hostname="127.0.0.1")
        served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.read()
        writer.close()
        return int(head.split(b" ", 2)[1]), body, served


async def paced_turn(client: RelayClient, audio: bytes) -> None:
    """A turn spoken in real time (20 ms frames, 20 ms apart: the pacing is what lets the reader
    take a plain socket over), then committed; returns once the reply is done."""
    for offset in range(0, len(audio), 960):
        await client.send_audio(audio[offset:offset + 960])
        await asyncio.sleep(0.02)
    await client.send({"type": "commit"})
    await client.send({"type": "create_response"})
    await client.wait("response_done")


def test_a_wss_node_carries_a_turn_byte_exact_and_answers_https_probes(ca, trusted, tmp_path):
    """Over wss:// the turn echoes exactly, /health answers over https with the node's
    certificate, and the compiled reader leaves the TLS client socket to uvloop's TLS."""
    leaf = ca.issue_cert("127.0.0.1")
    cert_path, key_path = write_pair(leaf, tmp_path, "node")
    audio = speech_like(0.6, seed=31)

    async def scenario():
        async with relay(tls_cert=cert_path, tls_key=key_path) as (gateway, mock):
            assert gateway.url.startswith("wss://127.0.0.1:")
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            await paced_turn(client, audio)
            done = client.of_type("response_done")[0]
            (session,) = gateway.sessions
            assert session.client_leg.direct_frames == 0  # ciphertext is never parsed as frames
            status, body, served = await https_get(gateway.port, "/health")
            await client.close()
            return done, bytes(client.audio), status, orjson.loads(body), served

    done, echoed, status, health, served = run(scenario(), timeout=20)
    assert done["status"] == "completed" and echoed == audio
    assert status == 200 and health["status"] == "ok"
    assert served == der(leaf)


def test_a_peer_that_never_finishes_the_tls_handshake_is_cut_at_the_handshake_timeout(ca, tmp_path, monkeypatch):
    """Found by a security audit: picows' handshake timer starts only once TLS is up, so uvloop's
    default TLS handshake timeout (60 s) held idle and trickling peers six times as long as on a
    plain node. The node's handshake timeout now bounds the TLS handshake too."""
    monkeypatch.setattr(server_module, "HANDSHAKE_TIMEOUT_S", 0.5)
    cert_path, key_path = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "node")

    async def scenario():
        async with relay(tls_cert=cert_path, tls_key=key_path) as (gateway, _mock):
            idle = await asyncio.open_connection("127.0.0.1", gateway.port)
            trickling = await asyncio.open_connection("127.0.0.1", gateway.port)
            trickling[1].write(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes, and no more
            for reader, writer in (idle, trickling):
                async with asyncio.timeout(5):  # uvloop's 60 s would end here
                    assert await reader.read() == b""  # closed by the node
                writer.close()

    run(scenario(), timeout=15)


def test_a_plain_node_still_reads_its_clients_directly():
    """The control for the assertion above: without TLS the compiled reader takes the client's frames."""
    if not COMPILED:
        pytest.skip("the pure twin has no direct reader")

    async def scenario():
        async with relay() as (gateway, mock):
            client = await RelayClient.connect(gateway.url)
            await client.send({"type": "config", "turn_detection": "none"})
            await client.wait("ready")
            (session,) = gateway.sessions
            audio = speech_like(0.4, seed=32)
            await paced_turn(client, audio)
            await client.close()
            return session.client_leg.direct_frames, bytes(client.audio) == audio

    direct, echoed = run(scenario(), timeout=20)
    assert direct > 0 and echoed


def test_sighup_puts_a_renewed_certificate_in_service_and_live_calls_go_on(ca, trusted, tmp_path):
    """A node process serves certificate A; A's files are replaced by B's (renamed over, as a
    renewal tool does) and the node gets SIGHUP: new connections get B, a call opened under A
    goes on. A broken renewal is refused with one log line and B stays in service."""
    first, renewed = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    cert_path, key_path = write_pair(first, tmp_path, "live")
    log: list[str] = []

    async def scenario(process, port) -> None:
        assert (await https_get(port, "/health"))[2] == der(first)
        live = await RelayClient.connect(f"wss://127.0.0.1:{port}/realtime")
        await live.wait("ready")
        new_cert, new_key = write_pair(renewed, tmp_path, "next")
        os.replace(new_cert, cert_path)
        os.replace(new_key, key_path)
        process.send_signal(signal.SIGHUP)
        await wait_for(lambda: any("reloaded the TLS certificate" in line for line in log), 10, "the reload")
        assert (await https_get(port, "/health"))[2] == der(renewed)
        audio = speech_like(0.3, seed=33)
        await live.push_to_talk(audio)  # the call opened under the first certificate goes on
        await live.wait("response_done")
        assert bytes(live.audio) == audio
        (tmp_path / "broken.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
        os.replace(tmp_path / "broken.pem", cert_path)
        process.send_signal(signal.SIGHUP)
        await wait_for(lambda: any("TLS certificate not reloaded" in line for line in log), 10, "the refusal")
        assert (await https_get(port, "/health"))[2] == der(renewed)
        await live.close()

    with gateway_process("--tls-cert", cert_path, "--tls-key", key_path, log=log) as (process, port):
        run(scenario(process, port), timeout=40)
    assert not any("BEGIN" in line or "PRIVATE" in line for line in log)


def _build(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    node_config.add_arguments(parser)
    node_config.from_args(parser.parse_args(["--upstream", "mock", *argv]), {})


def test_certificate_files_a_node_could_not_serve_with_stop_it_at_start(ca, tmp_path):
    leaf, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    cert_path, key_path = write_pair(leaf, tmp_path, "good")
    _other_cert, other_key = write_pair(other, tmp_path, "other")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(leaf.private_key_and_cert_chain_pem.bytes())
    _build(["--tls-cert", str(combined)])  # the key in the certificate's file: fine
    _build(["--tls-cert", cert_path, "--tls-key", key_path])
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret-passphrase")))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello")
    for argv, message in [
        # each named by the flag of the file at fault (a docs audit found key faults under --tls-cert)
        (["--tls-cert", str(tmp_path / "missing.pem")], "^--tls-cert .*no such file: .*missing.pem"),
        (["--tls-cert", cert_path, "--tls-key", str(tmp_path / "missing.key")], "^--tls-key .*no such file"),
        (["--tls-cert", cert_path, "--tls-key", other_key], "^--tls-key .*is not the certificate's key"),
        (["--tls-cert", cert_path, "--tls-key", str(encrypted)], "^--tls-key .*is encrypted"),
        (["--tls-cert", str(garbage)], "^--tls-cert .*is not a PEM certificate chain and key"),
        (["--tls-cert", cert_path, "--tls-key", str(garbage)], "^--tls-key .*is not a PEM certificate chain and key"),
        (["--tls-cert", cert_path, "--tls-key", cert_path], "^--tls-key .*is not a PEM certificate chain and key"),
        (["--tls-cert", cert_path, "--tls-key", str(tmp_path)], "^--tls-key .*is a directory"),
        (["--tls-cert", str(tmp_path)], "^--tls-cert .*is a directory"),
        (["--tls-cert", cert_path], "^--tls-cert .*is not a PEM certificate chain and key"),  # no key anywhere
        (["--tls-key", key_path], r"--tls-key \(GATEWAY_TLS_KEY\) needs --tls-cert"),
    ]:
        with pytest.raises(ConfigError, match=message) as refused:
            _build(argv)
        assert "PRIVATE" not in str(refused.value) and "passphrase" not in str(refused.value)
