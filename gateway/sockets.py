"""Listening and connected TCP sockets for the node, opened without libuv's thread pool.

uvloop resolves addresses through `getaddrinfo` on libuv's thread pool — `create_server(host,
port)` and `sock_connect` even a numeric one, `create_connection` a host name — and the pool's
four threads then live as long as the process. A process with more than one thread shares its file table, and the kernel takes a
slower path for every socket syscall on a shared table (a reference count taken and dropped
per call on each file); glibc's `send`/`recv` also switch cancellation on and off. For a relay
making ~25,000 socket syscalls per second per 200 sessions that is a few per cent of its CPU.

So the node opens its sockets itself and stays single-threaded:
- `listening_sockets` resolves the listen address once, synchronously, at start-up;
- `connect` opens the upstream's sockets, non-blocking, waiting for them with
  `loop.add_writer`. It tries a host's addresses Happy Eyeballs style (the next address after
  250 ms, so one that drops packets does not time the session out), and its sockets notice a
  dead peer within UPSTREAM_ACK_TIMEOUT_S of it going silent. A host name is looked up by
  `Resolver` in a thread that ends with the lookup, and the answer is kept for `ttl_s` (one
  lookup per host per TTL, not per session).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import resource
import socket
import threading
import time

#: connections the kernel queues for accept(): as many as it allows (net.core.somaxconn caps
#: it; 4096 on current kernels). asyncio's 100 overflowed in a storm of 2,000 upgrades, and the
#: clients (and /health probes) it silently dropped retried after 1, 3, 7 s
LISTEN_BACKLOG = socket.SOMAXCONN
#: how long a resolved host name is reused (nginx's resolver default `valid` is the record's
#: TTL; 30 s keeps a moving endpoint picked up quickly and costs one lookup per host per 30 s)
RESOLVE_TTL_S = 30.0

#: how long one address may take to connect before the next is tried beside it: RFC 8305's
#: recommended Connection Attempt Delay (asyncio's happy_eyeballs_delay, where given, is the same)
ATTEMPT_DELAY_S = 0.25

#: an upstream that leaves what we sent unacknowledged this long is gone (a path that drops
#: packets, a host that vanished without FIN or RST): the kernel ends the connection
#: (TCP_USER_TIMEOUT) instead of retransmitting for ~15 minutes (tcp_retries2) while the
#: session hangs and its client streams into a full buffer
UPSTREAM_ACK_TIMEOUT_S = 20.0
#: an idle upstream (push-to-talk between turns) is probed after this long without traffic,
#: then every KEEPALIVE_INTERVAL_S; a dead one ends UPSTREAM_ACK_TIMEOUT_S after the first
#: unanswered probe, and the probes keep NAT and firewall mappings (60-350 s) from expiring
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10

#: file descriptors a process holds besides its sessions' sockets (listeners, epoll, logs,
#: metrics files, a host name lookup's socket), left out when counting the sessions it has room for
RESERVED_FDS = 64

AddressInfo = tuple[int, tuple]  # (family, sockaddr)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit; (before, now).

    Every session holds two sockets (three with the built-in mock in the process). The usual
    soft limit, 1024 (systemd's default for services, most login shells), leaves room for ~480
    sessions, while the hard limit is typically 524,288 (systemd) or 1,048,576 (containers). At
    the limit the listener's accept fails and libuv closes the waiting connections unheard, and
    upstream connects fail with EMFILE. nginx (`worker_rlimit_nofile`) and Go's runtime raise
    the soft limit the same way; it costs nothing until the descriptors are used."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = [hard]
    if hard == resource.RLIM_INFINITY:  # Linux refuses more than fs.nr_open; macOS, more than OPEN_MAX
        try:
            with open("/proc/sys/fs/nr_open") as file:
                wanted = [int(file.read())]
        except (OSError, ValueError):
            wanted = [1 << 20, 10240]
    for limit in wanted:
        if soft != resource.RLIM_INFINITY and soft < limit:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            except (ValueError, OSError):
                continue
            return soft, limit
    return soft, soft


def listening_sockets(host: str | None, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address `host` resolves to (all
    interfaces for None or ""). With port 0 the first socket's port is used for the rest."""
    infos = socket.getaddrinfo(host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple] = set()
    try:
        for family, type_, proto, _name, sockaddr in infos:
            if sockaddr in seen:
                continue
            seen.add(sockaddr)
            if sockets and port == 0:
                sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # as asyncio does: an IPv6 socket serves IPv6 only, the IPv4 address has its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Resolver:
    """Host name → addresses, looked up off the loop in a short-lived thread and cached for
    `ttl_s`. Concurrent lookups of one host share one thread; numeric hosts never start one."""

    def __init__(self, ttl_s: float = RESOLVE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[tuple[str, int], tuple[float, list[AddressInfo]]] = {}
        self._pending: dict[tuple[str, int], asyncio.Future] = {}

    async def resolve(self, host: str, port: int) -> list[AddressInfo]:
        numeric = _numeric(host, port)
        if numeric is not None:
            return [numeric]
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.get_running_loop().create_future()
            threading.Thread(target=self._lookup, args=(key, pending), name="gateway-resolve",
                             daemon=True).start()
        # shield: one waiter's timeout must not cancel the lookup the others wait for
        return await asyncio.shield(pending)

    def forget(self, host: str, port: int) -> None:
        """Drop a cached answer (none of its addresses accepted a connection)."""
        self._cache.pop((host, port), None)

    def _lookup(self, key: tuple[str, int], future: asyncio.Future) -> None:
        try:
            infos = socket.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
            result: list[AddressInfo] | BaseException = [(family, sockaddr) for family, _t, _p, _n, sockaddr in infos]
        except OSError as exc:
            result = exc
        try:
            future.get_loop().call_soon_threadsafe(self._settle, key, future, result)
        except RuntimeError:  # the loop closed while the lookup ran
            pass

    def _settle(self, key: tuple[str, int], future: asyncio.Future,
                result: list[AddressInfo] | BaseException) -> None:
        self._pending.pop(key, None)
        if isinstance(result, BaseException):
            if not future.done():
                future.set_exception(result)
            future.exception()  # retrieved: nobody may be waiting any more
            return
        self._cache[key] = (time.monotonic() + self.ttl_s, result)
        if not future.done():
            future.set_result(result)


RESOLVER = Resolver()


async def connect(host: str, port: int, resolver: Resolver = RESOLVER,
                  attempt_delay_s: float = ATTEMPT_DELAY_S) -> socket.socket:
    """A connected non-blocking TCP socket to `host`, Happy Eyeballs style (RFC 8305): its
    addresses, the families interleaved, are tried in turn, each given `attempt_delay_s` before
    the next starts beside it (at once when one fails). The first to connect wins; the others
    are cancelled, and closed. Raises OSError (the last error) when none connects."""
    waiting = _interleaved(await resolver.resolve(host, port))
    attempts: set[asyncio.Task] = set()
    error: OSError | None = None
    try:
        while waiting or attempts:
            if waiting:
                attempts.add(asyncio.ensure_future(_connect_one(*waiting.pop(0))))
            done, attempts = await asyncio.wait(attempts, timeout=attempt_delay_s if waiting else None,
                                                return_when=asyncio.FIRST_COMPLETED)
            connected = [attempt.result() for attempt in done if attempt.exception() is None]
            for attempt in done:
                if isinstance(attempt.exception(), OSError):
                    error = attempt.exception()
            if connected:
                for extra in connected[1:]:  # two finished in the same turn of the loop
                    extra.close()
                return connected[0]
    finally:
        for attempt in attempts:  # still connecting: the task closes its socket as it ends
            attempt.cancel()
    resolver.forget(host, port)
    raise error if error is not None else OSError(f"no address for {host!r}")


def _interleaved(addresses: list[AddressInfo]) -> list[AddressInfo]:
    """RFC 8305 §4: alternate the address families, starting with the resolver's first choice,
    so that a family that does not route (IPv6 in many containers) costs one delay, not one per
    address of it."""
    if not addresses:
        return []
    first = [address for address in addresses if address[0] == addresses[0][0]]
    other = [address for address in addresses if address[0] != addresses[0][0]]
    return [address for pair in itertools.zip_longest(first, other) for address in pair if address is not None]


async def _connect_one(family: int, sockaddr: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        _notice_a_dead_peer(sock)
        try:
            sock.connect(sockaddr)
        except BlockingIOError:
            loop = asyncio.get_running_loop()
            writable = loop.create_future()
            fd = sock.fileno()
            loop.add_writer(fd, _settle_once, writable)
            try:
                await writable
            finally:
                loop.remove_writer(fd)
            errno = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if errno:
                raise OSError(errno, os.strerror(errno))  # as a blocking connect would say it
        return sock
    except BaseException:
        sock.close()
        raise


def _notice_a_dead_peer(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(UPSTREAM_ACK_TIMEOUT_S * 1000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)


def _settle_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _numeric(host: str, port: int) -> AddressInfo | None:
    """The address itself when `host` is an IPv4 or IPv6 literal (no lookup needed)."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, literal)
        except OSError:
            continue
        return (family, (literal, port)) if family == socket.AF_INET else (family, (literal, port, 0, 0))
    return None


_TCP_ESTABLISHED = 1  # tcp_info.tcpi_state (include/net/tcp_states.h)


def peer_closed(sock) -> bool:
    """The peer sent its FIN or reset the connection, seen without reading: TCP_INFO's state has
    left ESTABLISHED. What it sent before still waits unread in the receive queue; a reader that
    paused cannot see the end of stream behind it."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_ESTABLISHED
    except (OSError, AttributeError):  # closed already, or not a TCP socket
        return True


#: struct tcp_info (include/uapi/linux/tcp.h): the fields `delivery` and `unanswered_s` read
_TCPI_RETRANSMITS = 2                  # __u8: retransmission timeouts in a row, no ACK between
_TCPI_PROBES = 3                       # __u8: zero-window probes in a row, none answered
_TCPI_LAST_ACK_RECV = slice(56, 60)    # __u32: ms since the peer last acknowledged anything
_TCPI_BYTES_ACKED = slice(120, 128)    # __u64 tcpi_bytes_acked (Linux 4.1+)
_TCPI_NOTSENT_BYTES = slice(144, 148)  # __u32 tcpi_notsent_bytes (Linux 4.6+)
_TCP_INFO_BYTES = 148


def delivery(sock) -> tuple[int, int] | None:
    """(bytes the peer has acknowledged so far, bytes waiting in our kernel that could not be
    sent yet) of a connected TCP socket, from one TCP_INFO read; None where unavailable. A peer
    that stopped reading fills its receive window: acknowledged stops moving, waiting grows."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError):  # closed already, or not a TCP socket
        return None
    if len(info) < _TCP_INFO_BYTES:
        return None
    return (int.from_bytes(info[_TCPI_BYTES_ACKED], "little"), int.from_bytes(info[_TCPI_NOTSENT_BYTES], "little"))


def unanswered_s(sock) -> float:
    """How long the peer's TCP has answered nothing it owes us: since its last acknowledgement,
    once two retransmissions or two window probes in a row went unanswered; else 0.0. A live
    peer acknowledges data, and answers window probes even while its application reads nothing
    (its window stays shut), each within a round trip, so neither count reaches two: a vanished
    one answers nothing, and both climb. 0.0 where TCP_INFO is unavailable."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LAST_ACK_RECV.stop)
    except (OSError, AttributeError):  # closed already, or not a TCP socket
        return 0.0
    if len(info) < _TCPI_LAST_ACK_RECV.stop or max(info[_TCPI_RETRANSMITS], info[_TCPI_PROBES]) < 2:
        return 0.0
    return int.from_bytes(info[_TCPI_LAST_ACK_RECV], "little") / 1000.0
