"""Binary echo upstream for the nginx pass-through peer of bench/relay.py.

nginx cannot transcode base64-in-JSON, so the floor measurement proxies the client's binary
PCM straight to this server, which plays the role the echoing mock plays for the relays: it
returns every received audio byte, in order, in blocks of `--block-ms` (default 100 ms = 4,800
bytes of PCM16 24 kHz), each followed by one small JSON text frame shaped like the relays'
`transcript` message, so the traffic through nginx matches what the relays deliver to clients
(one binary block + one small text frame per 100 ms).

Whenever at least one block of audio is pending, ALL pending bytes are sent as one binary frame
(the mock's stream-echo rule), so a client that streams whole 20 ms frames gets exact 100 ms
blocks back. A trailing partial block stays pending until more audio arrives, as with the mock.

    python bench/peers/binary_echo.py --host 127.0.0.1 --port 3012 [--block-ms 100]
"""
from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

PCM16_24K_BYTES_PER_MS = 48


class BinaryEchoSession(WSListener):
    """One client connection: accumulates binary audio and echoes it block by block."""

    __slots__ = ("_pending", "_block_bytes", "_transcript_frame")

    def __init__(self, block_bytes: int, transcript_frame: bytes):
        self._pending = bytearray()
        self._block_bytes = block_bytes
        self._transcript_frame = transcript_frame

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.BINARY or msg_type is WSMsgType.CONTINUATION:
            # The frame's memoryview dies when this callback returns: copy into the pending buffer.
            self._pending += frame.get_payload_as_memoryview()
            if len(self._pending) >= self._block_bytes:
                transport.send(WSMsgType.BINARY, self._pending)
                transport.send(WSMsgType.TEXT, self._transcript_frame)
                self._pending.clear()
        elif msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def serve(host: str, port: int, block_ms: int) -> None:
    block_bytes = block_ms * PCM16_24K_BYTES_PER_MS
    transcript_frame = (
        b'{"type":"transcript","role":"assistant","text":"echo","is_final":false,'
        b'"item_id":"item_echo","response_id":"resp_echo"}'
    )

    def factory(request: WSUpgradeRequest) -> WSListener:
        return BinaryEchoSession(block_bytes, transcript_frame)

    server = await ws_create_server(factory, host, port, read_buffer_init_size=8 * 1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"binary_echo listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3012)
    parser.add_argument("--block-ms", type=int, default=100, help="echo block length in ms of PCM16 24 kHz")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.block_ms))


if __name__ == "__main__":
    main()
