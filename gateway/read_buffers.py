"""Giving back the memory of a connection's read buffer after a burst.

picows reads every WebSocket connection into one buffer of its own. A frame must fit in it
whole, so the buffer doubles until the largest frame (or the largest backlog read at once)
fits, and it never shrinks: one 8 MiB message left its session holding 16 MiB for the rest of
its life, and 1,000 sessions that each sent one held 16 GB. picows offers no way to shrink
it, but it does hand out its free part — everything after the unparsed bytes — through
`get_buffer`, the `asyncio.BufferedProtocol` call uvloop reads into. `release` tells the kernel
it may take that part's pages back (`madvise(MADV_DONTNEED)`): the buffer keeps its size, and
a page is given a fresh zeroed one only when a later read reaches it again.

The server's sweep calls `release` for a session's legs that received more than
`BURST_BYTES` since its last look: a talking session (48 KB of audio a second each way) is
never touched, and a leg that was is touched once per burst, not once per frame.
"""
from __future__ import annotations

import asyncio
import ctypes
import mmap

#: traffic on one leg between two sweeps that may have grown its read buffer past `KEEP_BYTES`
BURST_BYTES = 256 * 1024
#: free read buffer a leg keeps resident: what a second of audio and its replies need at most
KEEP_BYTES = 64 * 1024
PAGE_BYTES = mmap.PAGESIZE

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_madvise = None
if _MADV_DONTNEED is not None:
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # no libc symbol to call: nothing is released
        _madvise = None


#: the most one read hands picows (see `ReadCap`)
MAX_READ_BYTES = 256 * 1024


class ReadCap(asyncio.BufferedProtocol):
    """picows' protocol as a client connection's transport sees it, offered at most
    `MAX_READ_BYTES` per read.

    picows doubles its buffer whenever a read fills nine tenths of it, and relays every frame of
    a read before a pause of reading can take effect. A client sending faster than the upstream
    takes its audio (the gateway stops reading it then) left megabytes in its socket, and the
    next read took them all: an audit's single session grew its buffer to tens of megabytes and
    queued 41 MB of appends towards the upstream, against a 64 KiB high-water mark. Everything
    but `get_buffer` is picows' own bound method: no extra call per read."""

    __slots__ = ("ws", "buffer_updated", "connection_lost", "eof_received", "pause_writing", "resume_writing",
                 "_get_buffer")

    def __init__(self, ws: asyncio.BufferedProtocol) -> None:
        self.ws = ws
        self.buffer_updated = ws.buffer_updated
        self.connection_lost = ws.connection_lost
        self.eof_received = ws.eof_received
        self.pause_writing = ws.pause_writing
        self.resume_writing = ws.resume_writing
        self._get_buffer = ws.get_buffer

    def get_buffer(self, sizehint: int):
        view = self._get_buffer(sizehint)
        return view[:MAX_READ_BYTES] if len(view) > MAX_READ_BYTES else view


def free_region(transport) -> tuple[int, int] | None:
    """(address, length) of the free part of the read buffer behind a picows `transport`, or
    None once the connection is gone."""
    if transport is None or transport.is_disconnected:
        return None
    protocol = transport.underlying_transport.get_protocol()
    protocol = getattr(protocol, "ws", protocol)  # a client's, behind its ReadCap
    view = protocol.get_buffer(-1)  # picows: a writable view of [write position, buffer size)
    if len(view) == 0:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view)), len(view)


def read_mark(transport) -> int | None:
    """Where the next byte read from `transport` will land: it moves with every byte that
    arrives, a whole frame or a piece of one (None once the connection is gone)."""
    region = free_region(transport)
    return None if region is None else region[0]


def release(transport, keep: int = KEEP_BYTES) -> int:
    """Let the kernel take back the pages of `transport`'s free read buffer beyond its first
    `keep` bytes; returns how many bytes were given back (0 where nothing could be)."""
    region = free_region(transport)
    if region is None or _madvise is None:
        return 0
    address, length = region
    start = -(-(address + keep) // PAGE_BYTES) * PAGE_BYTES  # whole pages only, inside the region
    end = (address + length) // PAGE_BYTES * PAGE_BYTES
    if end <= start:
        return 0
    if _madvise(start, end - start, _MADV_DONTNEED) != 0:
        return 0
    return end - start
