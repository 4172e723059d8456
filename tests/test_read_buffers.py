"""Memory after a burst: picows' read buffers double to hold the largest frame and never shrink,
and its write buffer keeps the largest masked copy. One 8 MiB message kept 8-16 MiB per
session for the session's life (gateway/read_buffers.py). Now the sweep gives back the free
read buffer's pages after a burst, and long events go upstream from a buffer of their own."""
from __future__ import annotations

import ctypes
import mmap

import pytest

from gateway import read_buffers
from gateway.mock import MockOptions
from tests.raw_client import RawClient, ready_client
from tests.relay_harness import TEST_KEY, gateway_process, relay
from tests.support import run
from tests.test_bad_input import rss_bytes
from tests.test_faults import wait_for
from tests.test_tls_upstream import ca, server_context, trusted  # noqa: F401 (fixtures)

MiB = 1024 * 1024
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def resident_bytes(region: tuple[int, int] | None) -> int:
    """How much of (address, length) is in memory now (mincore)."""
    assert region is not None
    address, length = region
    start = address // PAGE * PAGE
    pages = (address + length - start + PAGE - 1) // PAGE
    vector = (ctypes.c_ubyte * pages)()
    assert _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * PAGE), vector) == 0, ctypes.get_errno()
    return sum(flag & 1 for flag in vector) * PAGE


def item_create(text: str) -> dict:
    """An OpenAI client event the gateway forwards as it is, however long (up to the message limit)."""
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


def forwarded_text(event: dict) -> str:
    return event["item"]["content"][0]["text"]


def test_a_big_message_leaves_no_resident_read_buffer_behind_and_the_buffer_still_works():
    """An 8 MiB message the gateway refuses (not JSON) grows the client leg's read buffer to hold
    it; within a sweep its free pages are given back (no more than KEEP_BYTES and the two pages its ends share stay).
    Messages after that, read into the same buffer, arrive byte-exact upstream."""
    async def scenario():
        async with relay(MockOptions(record=True)) as (gateway, mock):
            client = await ready_client(gateway.url)
            session = next(iter(gateway.sessions))
            client.send_text(b"{" + b"x" * (8 * MiB))
            await client.wait("error", 10, code="InvalidMessage")
            region = read_buffers.free_region(session.client)
            assert region[1] >= 8 * MiB and resident_bytes(region) >= 8 * MiB  # grown, and in memory
            await wait_for(lambda: resident_bytes(read_buffers.free_region(session.client))
                           <= read_buffers.KEEP_BYTES + 2 * PAGE, 5, "the sweep to give the pages back")
            upstream = mock.sessions[-1]
            for index, size in enumerate((6 * MiB, 100, 3 * MiB)):
                text = chr(ord("a") + index) * size
                client.send_json(item_create(text))
                assert forwarded_text(await upstream.wait_for_client_event("conversation.item.create", 10)) == text
            await client.close()
    run(scenario(), timeout=40)


def test_release_keeps_the_first_pages_and_gives_nothing_for_a_closed_connection():
    async def scenario():
        async with relay() as (gateway, mock):
            client = await ready_client(gateway.url)
            session = next(iter(gateway.sessions))
            client.send_text(b"{" + b"y" * (2 * MiB))
            await client.wait("error", 10, code="InvalidMessage")
            transport = session.client
            released = read_buffers.release(transport, keep=256 * 1024)
            assert 1 * MiB < released < 4 * MiB  # the free part beyond the first 256 KiB, in pages
            assert released % PAGE == 0
            assert read_buffers.release(transport, keep=256 * 1024) == released  # idempotent
            assert resident_bytes(read_buffers.free_region(transport)) <= 256 * 1024 + 2 * PAGE  # and the pages either end shares
            await client.close()
            await gateway.wait_empty(5)
            assert read_buffers.release(transport) == 0 and read_buffers.free_region(transport) is None
    run(scenario(), timeout=30)


def _rss_mib(pid: int) -> float:
    return rss_bytes(pid) / MiB


def test_a_node_gives_back_the_memory_big_messages_took():
    """Ten sessions each forward a 4 MiB `conversation.item.create` (its client leg reads it, its
    upstream leg masks and sends it; the mock echoes the item back). The node (its own process,
    as operators run it) held ~14.8 MiB per session for good; now, after a sweep, under 2."""
    sessions, size = 10, 4 * MiB

    async def scenario(pid: int, port: int, mock) -> None:
        clients = []
        for _ in range(sessions):
            clients.append(await ready_client(f"ws://127.0.0.1:{port}/realtime"))
        before = _rss_mib(pid)
        for index, client in enumerate(clients):
            text = chr(ord("A") + index) * size
            client.send_json(item_create(text))
            assert forwarded_text(await mock.sessions[index].wait_for_client_event("conversation.item.create", 20)) == text
            await mock.sessions[index].wait_for_server_event("conversation.item.done", 20)
        grown = (_rss_mib(pid) - before) / sessions
        assert grown > 2, grown  # the burst did take memory (else this test shows nothing)
        await wait_for(lambda: (_rss_mib(pid) - before) / sessions < 2, 10,
                       "the node to give back what the big messages took")
        for client in clients:
            await client.close()

    async def with_mock() -> None:
        async with relay(MockOptions(record=True)) as (_unused_gateway, mock):
            with gateway_process("--upstream", "openai", "--upstream-url", mock.url,
                                 env={"OPENAI_API_KEY": TEST_KEY}) as (process, port):
                await scenario(process.pid, port, mock)
    run(with_mock(), timeout=90)


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_the_upstream_leg_gives_back_its_pages_too(tls, ca, trusted):
    """The mock echoes a 6 MiB item back (`conversation.item.added` and `.done`): the upstream
    leg's read buffer grows to hold it — behind TLS too — and gives its pages back."""
    async def scenario():
        async with relay(MockOptions(record=True), upstream_tls=server_context(ca, "127.0.0.1") if tls else None) \
                as (gateway, mock):
            client = await ready_client(gateway.url)
            session = next(iter(gateway.sessions))
            text = "z" * (6 * MiB)
            client.send_json(item_create(text))
            upstream = mock.sessions[-1]
            assert forwarded_text(await upstream.wait_for_client_event("conversation.item.create", 10)) == text
            await upstream.wait_for_server_event("conversation.item.done", 10)
            leg = session.upstream.transport
            await wait_for(lambda: read_buffers.free_region(leg)[1] >= 6 * MiB, 10, "the echo to be read")
            await wait_for(lambda: resident_bytes(read_buffers.free_region(leg))
                           <= read_buffers.KEEP_BYTES + 2 * PAGE, 5, "the sweep to give the pages back")
            await client.close()
    run(scenario(), timeout=40)
