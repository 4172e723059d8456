"""WebSocket message reassembly: picows delivers frames, the gateway handles messages.

A fragmented message arrives as TEXT/BINARY with `fin=False` and then CONTINUATION frames.
`MessageAssembler.feed(frame)` returns `(msg_type, payload)` once a message is complete, else None.
For an unfragmented frame (the common case) `payload` is the frame's own memoryview — it dies when
`on_ws_frame` returns, so use or copy it before then. For a reassembled message it is a bytearray
the caller owns. Size is bounded by `limit` bytes (`MessageTooBig` beyond it).

Listeners on the audio path skip `feed` for the common frame: a final TEXT/BINARY frame of at
most `limit` bytes while `partial is None` (no fragmented message in progress) is a whole message
as it stands, and `feed` would return exactly `(msg_type, its payload)` without changing state.
"""
from __future__ import annotations

from picows import WSFrame, WSMsgType


class MessageTooBig(Exception):
    """A message exceeded the assembler's byte limit."""


class FragmentOutOfOrder(Exception):
    """Frames that break RFC 6455 §5.4 (a continuation with nothing to continue, or a new data
    frame while a fragmented message is open). What they carried is dropped; the session goes on."""


class MessageAssembler:
    __slots__ = ("limit", "_type", "partial")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._type: WSMsgType | None = None
        #: the fragmented message being reassembled, None when none is in progress
        self.partial: bytearray | None = None

    def feed(self, frame: WSFrame):
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT or msg_type is WSMsgType.BINARY:
            if frame.payload_size > self.limit:
                self._reset()
                raise MessageTooBig(f"message larger than {self.limit} bytes")
            if self.partial is not None:
                self._reset()
                raise FragmentOutOfOrder("a new message started before the fragmented one ended: "
                                         "both were dropped")
            if frame.fin:
                return msg_type, frame.get_payload_as_memoryview()
            self._type = msg_type
            self.partial = bytearray(frame.get_payload_as_memoryview())
            return None
        if msg_type is WSMsgType.CONTINUATION:
            if self.partial is None:
                raise FragmentOutOfOrder("a continuation frame arrived with no message to continue: dropped")
            if len(self.partial) + frame.payload_size > self.limit:
                self._reset()
                raise MessageTooBig(f"message larger than {self.limit} bytes")
            self.partial += frame.get_payload_as_memoryview()
            if not frame.fin:
                return None
            result = (self._type, self.partial)
            self._type = None
            self.partial = None
            return result
        return None  # control frames (ping/pong/close) are not messages

    def _reset(self) -> None:
        self._type = None
        self.partial = None
