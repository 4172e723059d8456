"""Upstream TLS handshake cost: a full handshake against a resumed one, side by side.

    .venv/bin/python bench/upstream_tls.py [--connects 200] [--rounds 5]

Every upstream session is a new TLS connection to the same host; the gateway's context
(`gateway.upstream.trust`) offers the host's latest session ticket. This measures what that saves
the gateway: its process CPU per connect (TCP + TLS 1.3 handshake + first byte), with resumption
and without it (the ticket forgotten before each connect), in alternating rounds so noise hits both
alike. The server is a separate process on the other core with a chain shaped like a public one
(RSA root, intermediate, leaf); the gateway verifies against the system bundle plus that root, as
it verifies OpenAI against the system bundle. Bounded: `--connects` x `--rounds` x 2 connects, on
127.0.0.1. This is a program, not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SERVER = """
import asyncio, os, ssl, sys, uvloop
os.sched_setaffinity(0, {int(sys.argv[3])})
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(sys.argv[1], sys.argv[2])
async def greet(reader, writer):
    writer.write(b"x")
    await reader.read(1)
    writer.close()
async def main():
    server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=context)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(600)  # bounded: the benchmark kills it long before
uvloop.run(main())
"""


def write_chain(directory: str) -> tuple[str, str, str]:
    root = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = root.create_child_ca().issue_cert("127.0.0.1")
    chain, key, trusted = (os.path.join(directory, name) for name in ("chain.pem", "key.pem", "ca.pem"))
    Path(chain).write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key)
    system = Path(ssl.get_default_verify_paths().openssl_cafile or "/nonexistent")
    Path(trusted).write_bytes((system.read_bytes() if system.exists() else b"") + root.cert_pem.bytes())
    return chain, key, trusted


async def connects(port: int, count: int, resume: bool) -> tuple[float, int]:
    """Process CPU µs per connect, and how many resumed."""
    from gateway.upstream.trust import client_tls_context
    context = client_tls_context()
    resumed = 0
    started = time.process_time()
    for _ in range(count):
        if not resume:
            context.sessions.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
        await reader.read(1)
        ssl_object = writer.get_extra_info("ssl_object")
        resumed += ssl_object.session_reused
        context.remember(ssl_object)
        writer.write(b"y")
        writer.close()
        await writer.wait_closed()
    return (time.process_time() - started) / count * 1e6, resumed


async def measure(port: int, count: int, rounds: int) -> dict[str, list[float]]:
    await connects(port, 20, True)  # warm up: imports, the context, the first ticket
    figures: dict[str, list[float]] = {"full": [], "resumed": []}
    for _ in range(rounds):
        for name, resume in (("full", False), ("resumed", True)):
            per_connect, resumed = await connects(port, count, resume)
            assert resumed == (count if resume else 0), (name, resumed)
            figures[name].append(per_connect)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=200, help="connects per round and kind")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as directory:
        chain, key, trusted = write_chain(directory)
        os.environ["SSL_CERT_FILE"] = trusted
        os.environ.pop("SSL_CERT_DIR", None)
        server = subprocess.Popen([sys.executable, "-c", SERVER, chain, key, str(cores[-1])],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            os.sched_setaffinity(0, {cores[0]})
            figures = uvloop.run(measure(port, args.connects, args.rounds))
        finally:
            server.kill()
            server.wait()
    full, resumed = statistics.median(figures["full"]), statistics.median(figures["resumed"])
    print(f"upstream TLS connect, gateway process CPU per connect (median of {args.rounds} rounds "
          f"x {args.connects} connects, {sys.version.split()[0]}, {ssl.OPENSSL_VERSION})")
    print("| handshake | µs per connect | per round | vs resumed |")
    print("|---|--:|---|--:|")
    for name, median in (("full", full), ("resumed", resumed)):
        rounds = " / ".join(f"{value:.0f}" for value in figures[name])
        print(f"| {name} | {median:.0f} | {rounds} | {median / resumed:.2f}× |")


if __name__ == "__main__":
    main()
