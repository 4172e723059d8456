"""A minimal stream-echo OpenAI Realtime upstream (GA dialect) for bench/relay.py.

This is NOT the project's mock (`realtime-gateway mock`, which is faithful and is the default
upstream of the benchmark). It is a deliberately tiny stand-in selected with
`bench/relay.py --upstream bench-echo`, for two uses:
  - running the peer relays before/without the mock, and
  - checking that the upstream's own cost (it shares core 1 with the load generator) is not what
    limits a run: compare a point measured with both upstreams.

Wire behaviour (the subset of the GA protocol the relays under test use):
  - on connect: `session.created`;
  - `session.update` -> `session.updated` carrying the requested session (no validation);
  - `input_audio_buffer.append` -> audio appended to the echo buffer; whenever at least
    `--delta-ms` of audio (PCM16 24 kHz: 48 bytes/ms) is pending, ALL pending bytes go back as
    one `response.output_audio.delta` (base64) followed by one
    `response.output_audio_transcript.delta`, inside one long-lived response whose
    `response.created` precedes the first delta (the mock's `echo_mode="stream"` rule);
  - every other client event is ignored.
Field order of the delta events follows the real API (type, event_id, response_id, item_id,
output_index, content_index, delta).

    python bench/peers/realtime_echo.py --host 127.0.0.1 --port 3013 [--delta-ms 100]
"""
from __future__ import annotations

import argparse
import asyncio
import binascii
import itertools
import signal

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

PCM16_24K_BYTES_PER_MS = 48
_session_ids = itertools.count(1)


class StreamEchoSession(WSListener):
    """One upstream session: echoes appended audio as output-audio deltas."""

    __slots__ = ("_pending", "_delta_bytes", "_events", "_sid", "_response_started", "_message")

    def __init__(self, delta_bytes: int):
        self._pending = bytearray()
        self._delta_bytes = delta_bytes
        self._events = itertools.count(1)
        self._sid = next(_session_ids)
        self._response_started = False
        self._message = bytearray()  # reassembly of a fragmented text message

    def _send_event(self, transport: WSTransport, event: dict) -> None:
        event["event_id"] = f"event_{self._sid}_{next(self._events)}"
        transport.send(WSMsgType.TEXT, orjson.dumps(event))

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._send_event(transport, {
            "type": "session.created",
            "session": {"type": "realtime", "object": "realtime.session", "id": f"sess_bench{self._sid}",
                        "model": "gpt-realtime", "output_modalities": ["audio"]},
        })

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT or msg_type is WSMsgType.CONTINUATION:
            if frame.fin and not self._message:
                self._on_event(transport, orjson.loads(frame.get_payload_as_memoryview()))
                return
            self._message += frame.get_payload_as_memoryview()
            if frame.fin:
                event = orjson.loads(self._message)
                self._message.clear()
                self._on_event(transport, event)
        elif msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def _on_event(self, transport: WSTransport, event: dict) -> None:
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            self._pending += binascii.a2b_base64(event["audio"])
            if len(self._pending) >= self._delta_bytes:
                self._emit_delta(transport)
        elif kind == "session.update":
            session = dict(event.get("session") or {})
            session.update(object="realtime.session", id=f"sess_bench{self._sid}")
            self._send_event(transport, {"type": "session.updated", "session": session})

    def _emit_delta(self, transport: WSTransport) -> None:
        sid = self._sid
        if not self._response_started:
            self._response_started = True
            self._send_event(transport, {"type": "response.created", "response": {
                "object": "realtime.response", "id": f"resp_bench{sid}", "status": "in_progress", "output": []}})
        n = next(self._events)
        head = (f'{{"type":"response.output_audio.delta","event_id":"event_{sid}_{n}",'
                f'"response_id":"resp_bench{sid}","item_id":"item_bench{sid}","output_index":0,'
                f'"content_index":0,"delta":"').encode()
        transport.send(WSMsgType.TEXT, head + binascii.b2a_base64(self._pending, newline=False) + b'"}')
        n = next(self._events)
        transport.send(WSMsgType.TEXT, (
            f'{{"type":"response.output_audio_transcript.delta","event_id":"event_{sid}_{n}",'
            f'"response_id":"resp_bench{sid}","item_id":"item_bench{sid}","output_index":0,'
            f'"content_index":0,"delta":"echo "}}').encode())
        self._pending.clear()


async def serve(host: str, port: int, delta_ms: int) -> None:
    delta_bytes = delta_ms * PCM16_24K_BYTES_PER_MS

    def factory(request: WSUpgradeRequest) -> WSListener:
        return StreamEchoSession(delta_bytes)

    server = await ws_create_server(factory, host, port, read_buffer_init_size=8 * 1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"realtime_echo listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3013)
    parser.add_argument("--delta-ms", type=int, default=100, help="echo delta length in ms of PCM16 24 kHz")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.delta_ms))


if __name__ == "__main__":
    main()
