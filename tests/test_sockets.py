"""gateway.sockets: the node opens its sockets without libuv's thread pool, so a running node —
relaying sessions, with the embedded mock or an external upstream — is one thread, and it never
loads numpy (whose OpenBLAS would start threads of its own)."""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from _fastpath import IMPLEMENTATION
from gateway import sockets
from tests.relay_harness import TEST_KEY, RelayClient, gateway_process, relay, speech_like
from tests.support import run


def _threads(pid: int) -> list[str]:
    return sorted(open(f"/proc/{pid}/task/{tid}/comm").read().strip() for tid in os.listdir(f"/proc/{pid}/task"))


def _loads_numpy(pid: int) -> bool:
    return "numpy" in open(f"/proc/{pid}/maps").read()


async def _echoed_turn(url: str, seed: int) -> RelayClient:
    """One push-to-talk turn through the node; the mock's reply must be the audio itself."""
    pcm = speech_like(0.5, seed=seed)
    client = await RelayClient.connect(url)
    await client.send({"type": "config", "turn_detection": "none"})
    await client.wait("ready")
    for offset in range(0, len(pcm), 960):
        await client.send_audio(pcm[offset:offset + 960])
    await client.send({"type": "commit"})
    await client.send({"type": "create_response"})
    assert (await client.wait("response_done", timeout=10))["status"] == "completed"
    assert bytes(client.audio) == pcm
    return client


def test_a_node_with_the_embedded_mock_relays_on_one_thread():
    async def scenario(port: int, pid: int):
        client = await _echoed_turn(f"ws://127.0.0.1:{port}/realtime", seed=3)
        # the session is live: listening, upstream connected, audio relayed both ways
        threads = _threads(pid)
        assert len(threads) == 1, threads
        await client.close()
    with gateway_process() as (process, port):
        run(scenario(port, process.pid), timeout=30)


def test_a_node_in_front_of_an_upstream_url_never_loads_numpy():
    # the upstream is a separate mock process (as in production, nothing of it runs in the node)
    mock = subprocess.Popen([sys.executable, "-m", "gateway", "mock", "--host", "127.0.0.1", "--port", "0",
                             "--api-key", TEST_KEY], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        banner = mock.stdout.readline().decode()   # "... listening on ws://127.0.0.1:PORT/v1/realtime"
        assert "listening on ws://" in banner, banner
        # by name: the node looks it up (gateway.sockets.Resolver), not uvloop's thread pool
        mock_url = banner.split()[-1].replace("127.0.0.1", "localhost")
        with gateway_process("--upstream", "openai", "--upstream-url", mock_url,
                             env={"OPENAI_API_KEY": TEST_KEY}) as (process, port):
            async def scenario():
                client = await _echoed_turn(f"ws://127.0.0.1:{port}/realtime", seed=4)
                threads = _threads(process.pid)
                assert len(threads) == 1, threads
                if IMPLEMENTATION == "compiled":   # the pure twin is numpy code
                    assert not _loads_numpy(process.pid)
                await client.close()
            run(scenario(), timeout=30)
    finally:
        mock.terminate()
        mock.wait(10)


def test_listening_sockets_bind_every_address_of_the_host_on_one_port():
    ipv4 = sockets.listening_sockets("127.0.0.1", 0)
    assert len(ipv4) == 1 and ipv4[0].getsockname()[0] == "127.0.0.1"
    assert ipv4[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert ipv4[0].getblocking() is False
    for sock in ipv4:
        sock.close()
    shared = sockets.listening_sockets("127.0.0.1", 0, reuse_port=True)
    assert shared[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    port = shared[0].getsockname()[1]
    second = sockets.listening_sockets("127.0.0.1", port, reuse_port=True)  # a second worker
    assert second[0].getsockname()[1] == port
    for sock in shared + second:
        sock.close()
    local = sockets.listening_sockets("localhost", 0)   # one socket per address, one port for all
    try:
        assert len({sock.getsockname()[1] for sock in local}) == 1
        assert {sock.family for sock in local} == {info[0] for info in socket.getaddrinfo(
            "localhost", 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    finally:
        for sock in local:
            sock.close()


@pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v ss"], capture_output=True).returncode != 0,
                    reason="needs ss (iproute2) to read a listener's backlog")
def test_the_node_and_the_mock_listen_with_the_kernels_largest_backlog():
    """create_server listens again on the socket it is given, with 100 unless told: a storm of
    connections then overflowed the queue, and the dropped ones (health probes too) retried
    after 1-7 s."""
    from gateway.mock import MockOptions
    from tests.relay_harness import relay

    async def scenario():
        async with relay(MockOptions()) as (gateway, mock):
            for port in (gateway.port, mock.port):
                listing = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
                backlogs = {int(line.split()[2]) for line in listing.splitlines()}
                assert backlogs == {min(socket.SOMAXCONN, _somaxconn())}, listing
    run(scenario(), timeout=20)


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as handle:
        return int(handle.read())


def test_a_port_in_use_is_an_error_and_leaks_nothing():
    taken = sockets.listening_sockets("127.0.0.1", 0)
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        sockets.listening_sockets("127.0.0.1", taken[0].getsockname()[1])
    assert len(os.listdir("/proc/self/fd")) == fds_before
    taken[0].close()


def test_connect_reaches_an_address_and_reports_refusal():
    async def scenario():
        server = sockets.listening_sockets("127.0.0.1", 0)[0]
        port = server.getsockname()[1]
        sock = await sockets.connect("127.0.0.1", port)
        assert sock.getpeername() == ("127.0.0.1", port) and sock.getblocking() is False
        accepted, _ = server.accept()
        sock.send(b"ping")
        assert accepted.recv(4) == b"ping"
        for s in (sock, accepted):
            s.close()
        server.close()
        with pytest.raises(OSError) as refused:
            await sockets.connect("127.0.0.1", port)   # nothing listens there any more
        assert refused.value.errno == 111
    run(scenario(), timeout=10)


def test_the_resolver_looks_a_host_up_once_per_ttl_and_shares_a_lookup(monkeypatch):
    lookups: list[str] = []
    release = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def counting_getaddrinfo(host, port, *args, **kwargs):
        if host == "upstream.example":
            lookups.append(host)
            release.wait(5)
            return real_getaddrinfo("127.0.0.1", port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting_getaddrinfo)

    async def scenario():
        resolver = sockets.Resolver(ttl_s=60)
        waiters = [asyncio.ensure_future(resolver.resolve("upstream.example", 443)) for _ in range(3)]
        await asyncio.sleep(0)      # all three are waiting on the one lookup
        release.set()
        answers = await asyncio.gather(*waiters)
        assert answers[0] == answers[1] == answers[2] == [(socket.AF_INET, ("127.0.0.1", 443))]
        assert await resolver.resolve("upstream.example", 443) == answers[0]  # cached
        assert lookups == ["upstream.example"]
        resolver.forget("upstream.example", 443)
        await resolver.resolve("upstream.example", 443)
        assert lookups == ["upstream.example"] * 2
        assert await resolver.resolve("::1", 80) == [(socket.AF_INET6, ("::1", 80, 0, 0))]
        assert len(lookups) == 2   # a literal is never looked up
    run(scenario(), timeout=10)


def test_a_failed_lookup_is_raised_to_every_waiter_and_not_cached(monkeypatch):
    attempts: list[str] = []

    def failing_getaddrinfo(host, port, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", failing_getaddrinfo)

    async def scenario():
        resolver = sockets.Resolver()
        results = await asyncio.gather(resolver.resolve("nowhere.example", 443),
                                       resolver.resolve("nowhere.example", 443), return_exceptions=True)
        assert all(isinstance(result, socket.gaierror) for result in results)
        with pytest.raises(socket.gaierror):
            await resolver.resolve("nowhere.example", 443)
        assert attempts == ["nowhere.example"] * 2
    run(scenario(), timeout=10)


def test_peer_closed_sees_a_fin_or_a_reset_behind_unread_data():
    """`peer_closed` answers from TCP_INFO without reading: what the peer sent before leaving is
    still queued, unread (as behind a paused reader)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        for leave in ("fin", "rst"):
            peer = socket.create_connection(server.getsockname())
            accepted, _ = server.accept()
            with accepted:
                assert not sockets.peer_closed(accepted)
                peer.sendall(b"x" * 100_000)
                if leave == "rst":
                    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.close()
                deadline = time.monotonic() + 5
                while not sockets.peer_closed(accepted):  # loopback: the FIN/RST lands at once
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
                if leave == "fin":
                    assert accepted.recv(10) == b"x" * 10  # it was only seen, not read
    assert sockets.peer_closed(socket.socket())  # not connected: nothing to wait for


class _BlackHole:
    """A local address that takes SYNs and never answers them, as a route that drops packets
    does: a listener with a full accept queue (listen(0) queues one connection; the kernel drops
    the SYNs that come after it)."""

    def __enter__(self) -> tuple:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.filler = socket.create_connection(self.listener.getsockname(), timeout=5)
        return self.listener.getsockname()

    def __exit__(self, *_exc) -> None:
        self.filler.close()
        self.listener.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _resolver_with(host: str, port: int, *sockaddrs: tuple) -> sockets.Resolver:
    resolver = sockets.Resolver()
    resolver._cache[(host, port)] = (time.monotonic() + 60, [
        (socket.AF_INET6 if ":" in sockaddr[0] else socket.AF_INET, sockaddr) for sockaddr in sockaddrs])
    return resolver


def test_connect_races_past_an_address_that_drops_packets_and_closes_the_loser():
    """Happy Eyeballs (RFC 8305): an address that never answers costs one attempt delay, not
    the session's whole connect timeout (before, every session to such a host timed out)."""
    with _BlackHole() as hole, socket.create_server(("127.0.0.1", 0)) as live:
        resolver = _resolver_with("upstream.test", 443, hole, live.getsockname())
        fds_before = _open_fds()

        async def scenario():
            loop = asyncio.get_running_loop()
            started = loop.time()
            sock = await sockets.connect("upstream.test", 443, resolver)
            return sock, loop.time() - started

        sock, elapsed = run(scenario(), timeout=10)
        with sock:
            assert sock.getpeername() == live.getsockname()
            assert sockets.ATTEMPT_DELAY_S <= elapsed < 2.0
            assert _open_fds() == fds_before + 1  # the attempt at the black hole was closed
        accepted, _ = live.accept()
        accepted.close()


def test_connect_moves_on_at_once_when_an_address_refuses():
    with socket.create_server(("127.0.0.1", 0)) as live:
        refusing = socket.create_server(("127.0.0.1", 0))
        refused_at = refusing.getsockname()
        refusing.close()
        resolver = _resolver_with("upstream.test", 443, refused_at, live.getsockname())

        async def scenario():
            loop = asyncio.get_running_loop()
            started = loop.time()
            # a 5 s attempt delay: waiting it out would show
            sock = await sockets.connect("upstream.test", 443, resolver, attempt_delay_s=5.0)
            return sock, loop.time() - started

        sock, elapsed = run(scenario(), timeout=10)
        with sock:
            assert sock.getpeername() == live.getsockname() and elapsed < 2.5
        accepted, _ = live.accept()
        accepted.close()
    resolver = _resolver_with("upstream.test", 443, refused_at, refused_at)
    with pytest.raises(OSError) as refused:  # none connects: the last error, and the answer forgotten
        run(sockets.connect("upstream.test", 443, resolver, attempt_delay_s=5.0), timeout=10)
    assert refused.value.errno == 111 and ("upstream.test", 443) not in resolver._cache


def test_address_families_are_interleaved_starting_with_the_resolvers_first_choice():
    v6 = [(socket.AF_INET6, (f"2001:db8::{n}", 443, 0, 0)) for n in (1, 2, 3)]
    v4 = [(socket.AF_INET, (f"192.0.2.{n}", 443)) for n in (1, 2)]
    assert sockets._interleaved(v6 + v4) == [v6[0], v4[0], v6[1], v4[1], v6[2]]
    assert sockets._interleaved(v4 + v6) == [v4[0], v6[0], v4[1], v6[1], v6[2]]
    assert sockets._interleaved(v4) == v4 and sockets._interleaved([]) == []


def test_a_session_reaches_an_upstream_host_whose_first_address_drops_packets(monkeypatch):
    """End to end: the upstream URL's host name resolves to a black hole first and the mock
    second; the session opens and echoes well within its 3 s connect timeout."""
    audio = speech_like(0.3, seed=4)

    async def scenario():
        with _BlackHole() as hole:
            async with relay() as (gateway, mock):
                port = int(mock.url.split(":")[2].split("/")[0])
                monkeypatch.setitem(sockets.RESOLVER._cache, ("upstream.test", port),
                                    (time.monotonic() + 60, [(socket.AF_INET, hole), (socket.AF_INET, ("127.0.0.1", port))]))
                gateway.upstream_url = mock.url.replace("127.0.0.1", "upstream.test")
                client = await RelayClient.connect(gateway.url)
                ready = await client.wait("ready")
                await client.push_to_talk(audio)
                await client.wait("response_done")
                await client.close()
                return ready, bytes(client.audio)

    ready, echoed = run(scenario(), timeout=20)
    assert ready["session_id"] and echoed == audio
