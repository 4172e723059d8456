"""Client writes batched per upstream read: the hand-built server-to-client frame headers
(RFC 6455 §5.2) parse back, through picows' own client, to the exact messages, in order."""
from __future__ import annotations

import asyncio

import pytest
from picows import WSListener, WSMsgType, ws_connect, ws_create_server

from _fastpath import frame_header as _frame_header
from gateway.outbox import _FIN_BINARY, _FIN_TEXT
from tests.support import run


@pytest.mark.parametrize("size, expected", [
    (0, b"\x82\x00"), (125, b"\x82\x7d"), (126, b"\x82\x7e\x00\x7e"), (65535, b"\x82\x7e\xff\xff"),
    (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_frame_header_uses_the_shortest_length_form(size: int, expected: bytes) -> None:
    assert _frame_header(_FIN_BINARY, size) == expected


def test_one_write_of_batched_frames_arrives_as_separate_messages_in_order() -> None:
    messages = [(WSMsgType.BINARY, bytes(range(256)) * 19), (WSMsgType.TEXT, b'{"type":"transcript"}'),
                (WSMsgType.BINARY, b""), (WSMsgType.TEXT, b"x" * 70_000), (WSMsgType.BINARY, b"\x01" * 125),
                (WSMsgType.BINARY, b"\x02" * 126)]

    class Sender(WSListener):
        def on_ws_connected(self, transport) -> None:
            batch: list[bytes] = []
            for msg_type, payload in messages:
                first = _FIN_BINARY if msg_type is WSMsgType.BINARY else _FIN_TEXT
                batch += [_frame_header(first, len(payload)), payload]
            transport.underlying_transport.writelines(batch)  # as RelaySession.flush_client_batch

    class Receiver(WSListener):
        def __init__(self) -> None:
            self.received: list[tuple[WSMsgType, bytes]] = []
            self.done = asyncio.Event()

        def on_ws_frame(self, transport, frame) -> None:
            assert frame.fin
            self.received.append((frame.msg_type, frame.get_payload_as_bytes()))
            if len(self.received) == len(messages):
                self.done.set()

    async def scenario() -> list[tuple[WSMsgType, bytes]]:
        server = await ws_create_server(lambda request: Sender(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            transport, receiver = await ws_connect(Receiver, f"ws://127.0.0.1:{port}/")
            await asyncio.wait_for(receiver.done.wait(), 5.0)
            transport.disconnect()
            return receiver.received
        finally:
            server.close()

    assert run(scenario(), timeout=10.0) == messages
