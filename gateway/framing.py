"""WebSocket message reassembly, and the frame rules both legs share (close replies, picows'
parser errors in the log): picows delivers frames, the gateway handles messages.

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

import logging

from picows import WSCloseCode, WSFrame, WSMsgType

#: RFC 6455 §7.4.1: status codes an endpoint must never put in a close frame
_NEVER_SENT_CLOSE_CODES = frozenset((1004, 1005, 1006, 1015))


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


def close_status(frame: WSFrame) -> int | None:
    """The status code of a CLOSE frame, None when it carries none. (picows says 0 for both
    an empty close and one whose status is 0, a code no endpoint may send.)"""
    return int(frame.get_close_code()) if frame.payload_size >= 2 else None


def close_reply(status: int | None) -> int:
    """The code that answers a peer's close with `status` (RFC 6455 §5.5.1, §7.4): its own
    code echoed, 1000 for none, and 1002 for a code it may not send. picows fails 1004, 1005,
    1015 and 1016-2999 itself, but not 0, 1006 (never in a close frame) nor codes no RFC
    defines (5000 and up)."""
    if status is None:
        return WSCloseCode.OK
    return status if 1000 <= status <= 4999 and status not in _NEVER_SENT_CLOSE_CODES else WSCloseCode.PROTOCOL_ERROR


class PeerParserErrorsAtInfo(logging.LoggerAdapter):
    """The logger for picows, with a peer's unparsable frame at INFO.

    picows logs one at ERROR (again for each read until the socket is gone): a peer must not
    be able to write ERROR lines into the operator's logs. The session it ends logs its own
    line: the gateway logs refused client input at INFO, an upstream's failure at WARNING.
    (An adapter, not a filter: picows gives each connection a child of a `Logger` it is handed,
    and a parent's filters do not see its children's records; an adapter it uses as it is.)"""

    def error(self, msg, *args, **kwargs) -> None:
        if isinstance(msg, str) and msg.startswith("WS parser error"):
            self.info(msg, *args, **kwargs)
        else:
            super().error(msg, *args, **kwargs)
