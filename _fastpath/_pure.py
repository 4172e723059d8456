"""Pure-Python twin of `_fastpath._compiled`: the reference behaviour, same API, same tests.

Units: PCM is 16-bit little-endian mono unless a `sample_width` of 1 says otherwise (G.711);
levels are in dBFS relative to a full-scale 16-bit sample (32768), floored at `DBFS_FLOOR` so
digital silence is a finite number that JSON can carry. A `LevelMeter` reads the audio format it
was given: G.711 bytes are expanded to their linear PCM16 values (`G711_TO_PCM16`) first.
"""
from __future__ import annotations

import base64
import binascii
import logging
import math
import struct

import numpy as np
import orjson
from picows import WSListener, WSMsgType

from ._constants import AUDIO_FORMATS, CLIENT_BATCH_BYTES, DBFS_FLOOR, G711_TO_PCM16, HEADER_ROOM, MAX_APPEND_AUDIO_BYTES

#: A PCM16 sample at or beyond this magnitude counts as clipped; a G.711 sample counts when it
#: is at its law's largest magnitude (µ-law 32124, A-law 32256: the codes a loud signal
#: saturates to).
CLIP_LEVEL = 32767
#: per G.711 format: (code -> linear value as a lookup array, clip level)
_G711 = {fmt: (np.array(table, dtype=np.int64), max(abs(v) for v in table))
         for fmt, table in G711_TO_PCM16.items()}

_APPEND_PREFIX = b'{"type":"input_audio_buffer.append","audio":"'
_APPEND_SUFFIX = b'"}'
_AUDIO_DELTA_TYPES = frozenset(("response.output_audio.delta", "response.audio.delta"))
_TRANSCRIPT_DELTA_TYPES = frozenset(("response.output_audio_transcript.delta", "response.audio_transcript.delta"))
_BINARY = WSMsgType.BINARY
_TEXT = WSMsgType.TEXT
log = logging.getLogger("gateway.fastpath")


def _dbfs(amplitude: float) -> float:
    if amplitude <= 0.0:
        return DBFS_FLOOR
    return max(DBFS_FLOOR, 20.0 * math.log10(amplitude / 32768.0))


def _samples(pcm) -> np.ndarray:
    view = memoryview(pcm).cast("B")
    usable = len(view) - (len(view) & 1)
    return np.frombuffer(view[:usable], dtype="<i2")


class LevelMeter:
    """Accumulates the level of audio fed to it, until `read()` takes and resets it.

    `audio_format` (one of `AUDIO_FORMATS`, default "pcm16") says how `feed` reads its bytes:
    PCM16 little-endian samples (a trailing odd byte is ignored: the caller carries it to the
    next chunk), or one G.711 code per byte, expanded to its linear PCM16 value. It can be
    changed between feeds (a session's format changed); what was accumulated stays, since every
    format is metered on the same PCM16 scale.
    """

    __slots__ = ("_sum_squares", "_peak", "_clipped", "_samples", "_format", "_g711")

    def __init__(self, audio_format: str = "pcm16") -> None:
        self._sum_squares = 0
        self._peak = 0
        self._clipped = 0
        self._samples = 0
        self.audio_format = audio_format

    @property
    def audio_format(self) -> str:
        return self._format

    @audio_format.setter
    def audio_format(self, audio_format: str) -> None:
        if audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format must be one of {', '.join(AUDIO_FORMATS)}")
        self._format = audio_format
        self._g711 = _G711.get(audio_format)

    def feed(self, pcm) -> None:
        if self._g711 is None:
            samples = _samples(pcm)
            if samples.size == 0:
                return
            wide = samples.astype(np.int64)
            clip_level = CLIP_LEVEL
        else:
            table, clip_level = self._g711
            codes = np.frombuffer(memoryview(pcm).cast("B"), dtype=np.uint8)
            if codes.size == 0:
                return
            wide = table[codes]
        self._sum_squares += int(np.dot(wide, wide))
        magnitude = np.abs(wide)
        self._peak = max(self._peak, int(magnitude.max()))
        self._clipped += int(np.count_nonzero(magnitude >= clip_level))
        self._samples += int(wide.size)

    @property
    def samples(self) -> int:
        """Samples fed since the last `read()`."""
        return self._samples

    def read(self) -> tuple[float, float, int, int]:
        """Return `(rms_dbfs, peak_dbfs, clipped, samples)` since the last read, and reset."""
        if self._samples:
            rms = math.sqrt(self._sum_squares / self._samples)
        else:
            rms = 0.0
        result = (_dbfs(rms), _dbfs(float(self._peak)), self._clipped, self._samples)
        self._sum_squares = self._peak = self._clipped = self._samples = 0
        return result


def measure_level(pcm, audio_format: str = "pcm16") -> tuple[float, float, int]:
    """One-shot level of a chunk of `audio_format` audio: `(rms_dbfs, peak_dbfs, clipped)`."""
    meter = LevelMeter(audio_format)
    meter.feed(pcm)
    rms_dbfs, peak_dbfs, clipped, _ = meter.read()
    return rms_dbfs, peak_dbfs, clipped


def encode_append(pcm, meter: LevelMeter | None = None, out: bytearray | None = None) -> bytearray:
    """Encode PCM bytes as a complete `input_audio_buffer.append` JSON frame.

    Returns a bytearray whose first `HEADER_ROOM` bytes are free (zeroed, for the WebSocket
    header) and whose remainder is exactly the JSON text. When `out` is given it is reused (resized) and
    returned; the caller must not reuse it while a send of it may still be in flight (and
    `out` must have no live exports, e.g. memoryviews: BufferError, as for any resize). Note that
    picows' zero-copy send writes the WebSocket header into the header room and, on a client
    connection, masks the JSON in place: a sent frame's bytes are not the JSON any more.
    When `meter` is given, the audio is also fed to it (in the same pass in the compiled version,
    for a PCM16 meter).
    """
    if meter is not None:
        meter.feed(pcm)
    encoded = base64.b64encode(memoryview(pcm).cast("B"))
    size = HEADER_ROOM + len(_APPEND_PREFIX) + len(encoded) + len(_APPEND_SUFFIX)
    if out is None:
        out = bytearray(size)
    else:
        del out[:]
        out.extend(bytes(size))
    pos = HEADER_ROOM
    for part in (_APPEND_PREFIX, encoded, _APPEND_SUFFIX):
        out[pos:pos + len(part)] = part
        pos += len(part)
    return out


def decode_audio_delta(payload, meter: LevelMeter | None = None) -> tuple[str, bytes] | None:
    """Decode an upstream text frame if it is an output-audio delta of either dialect.

    Returns `(item_id, pcm)` for `response.output_audio.delta` (GA) and `response.audio.delta`
    (beta); returns None ("not handled") for any other event and for anything unusual, in which
    case the caller parses the frame normally. `payload` is only read during the call (a picows
    frame buffer dies when `on_ws_frame` returns). Exact on every valid input: never accepts what
    a JSON parser would reject, never misreads another event.
    """
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(event) is not dict:
        return None
    event_type = event.get("type")
    if type(event_type) is not str or event_type not in _AUDIO_DELTA_TYPES:
        return None
    item_id = event.get("item_id")
    delta = event.get("delta")
    if type(item_id) is not str or type(delta) is not str:
        return None
    try:
        pcm = base64.b64decode(delta, validate=True)
    except (binascii.Error, ValueError):
        return None
    if meter is not None:
        meter.feed(pcm)
    return item_id, pcm


def decode_transcript_delta(payload) -> tuple[str, bytes | None] | None:
    """An upstream assistant audio-transcript delta (GA `response.output_audio_transcript.delta`,
    beta `response.audio_transcript.delta`) as the client protocol's `transcript` event.

    Returns `(item_id, event)`, where `event` is exactly the JSON the session sends the client
    for it (`{"type":"transcript","role":"assistant","text":...,"is_final":false,"item_id":...}`,
    plus `"response_id"` when the upstream gave one), or None for an empty delta (the client is
    told nothing); returns None ("not handled") for any other event and for anything unusual
    (a non-string `response_id`, ...), which the caller then parses normally.
    """
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    event_type = event.get("type") if type(event) is dict else None
    if type(event_type) is not str or event_type not in _TRANSCRIPT_DELTA_TYPES:
        return None
    item_id, delta, response_id = event.get("item_id"), event.get("delta"), event.get("response_id", "")
    if type(item_id) is not str or type(delta) is not str or type(response_id) is not str:
        return None
    if not delta:
        return item_id, None
    out = {"type": "transcript", "role": "assistant", "text": delta, "is_final": False, "item_id": item_id}
    if "response_id" in event:
        out["response_id"] = response_id
    return item_id, orjson.dumps(out)


def frame_header(first_byte: int, size: int) -> bytes:
    """Header of an unmasked (server-to-client) WebSocket frame carrying `size` payload bytes:
    `first_byte` (FIN + opcode: 0x82 binary, 0x81 text), then the length in 7, 7+16 or 7+64
    bits (RFC 6455 §5.2)."""
    if size < 0:
        raise ValueError("size must be >= 0")
    if size < 126:
        return bytes((first_byte, size))
    if size < 65536:
        return struct.pack("!BBH", first_byte, 126, size)
    return struct.pack("!BBQ", first_byte, 127, size)


class Coalescer:
    """Merges small client audio frames into fewer, larger `input_audio_buffer.append` frames.

    `push(data)` appends audio and returns an encoded frame (see `encode_append`) once at least
    `target_bytes` of whole samples are pending, else None. A trailing partial sample (the odd byte
    of PCM16) is carried to the next push, never dropped. `flush()` encodes whatever whole samples
    are pending (None if there are none) — the session calls it at turn boundaries, on commit and
    on its timer and before `clear_audio`, so no audio waits longer than the coalescing bound.
    A frame carries at most MAX_APPEND_AUDIO_BYTES: after a larger push, `push(b"")` returns the
    next frame while `target_bytes` are still pending, and `flush()` until it returns None.
    Every emitted frame's audio is fed to `meter` (when set), which reads it in its own
    `audio_format`: give it the format of the audio pushed.
    """

    __slots__ = ("_target_bytes", "_sample_width", "meter", "_pending")

    def __init__(self, target_bytes: int, sample_width: int = 2, meter: LevelMeter | None = None):
        if target_bytes < 1:
            raise ValueError("target_bytes must be >= 1")
        if sample_width not in (1, 2):
            raise ValueError("sample_width must be 1 (G.711) or 2 (PCM16)")
        self._target_bytes = target_bytes
        self._sample_width = sample_width
        self.meter = meter
        self._pending = bytearray()

    @property
    def target_bytes(self) -> int:
        """Bytes of whole samples that make `push` emit a frame; settable (>= 1, else
        ValueError), takes effect at the next push."""
        return self._target_bytes

    @target_bytes.setter
    def target_bytes(self, value: int) -> None:
        if value < 1:
            raise ValueError("target_bytes must be >= 1")
        self._target_bytes = value

    @property
    def sample_width(self) -> int:
        """Bytes per sample: 2 (PCM16) or 1 (G.711). Read-only."""
        return self._sample_width

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def push(self, data) -> bytearray | None:
        self._pending += data
        whole = len(self._pending) - len(self._pending) % self.sample_width
        if whole < self.target_bytes:
            return None
        return self._emit(min(whole, MAX_APPEND_AUDIO_BYTES))

    def flush(self) -> bytearray | None:
        whole = len(self._pending) - len(self._pending) % self.sample_width
        if whole == 0:
            return None
        return self._emit(min(whole, MAX_APPEND_AUDIO_BYTES))

    def _emit(self, whole: int) -> bytearray:
        chunk = bytes(self._pending[:whole])
        del self._pending[:whole]
        return encode_append(chunk, self.meter)


# ------------------------------------------------------------------ the relay's per-frame path

class AudioPath:
    """One session's audio, both directions, moved without calling the session.

    The session owns it and opens or closes its two gates whenever its own state changes; the
    socket legs (`ClientLeg`, `UpstreamLeg`) only read the gates, move the audio and add to the
    counters. While a gate is closed the legs hand the frame to the session instead, which does
    the same work (and more) in Python. It keeps the session's counters of what it moves
    (`c2u_audio_frames`, `c2u_audio_bytes`, `u2c_audio_frames`, `u2c_audio_bytes`,
    `u2c_json_frames`, `u2c_json_bytes`; the session's stats read them from here).

    Client to upstream, while `upstream` is set (the session sets it only while it is ready):
    `client_audio(pcm)` counts the frame, pushes it into `coalescer` and sends what that emits to
    `upstream` (zero-copy; dropped if that socket is gone or closing, like any send of the
    session's). Whenever "whole samples are pending" differs from `flush_armed`, it calls
    `on_pending()`, where the session arms or cancels its flush timer and sets `flush_armed`.

    Upstream to client, for the audio of item `outbound_item` (None: none): `upstream_audio`
    adds the PCM to `item_generated` and `item_delivered` (what interruption truncates by) and
    counts it, and appends it to `batch` as a binary frame (header, payload) with `batching` set;
    `upstream_transcript` does the same for the `transcript` event of a transcript delta of that
    item (see `decode_transcript_delta`), counted as an upstream JSON message of `message_bytes`.
    `batch` collects what the client gets during one upstream read (the session appends its own
    events while `batching`); `flush_batch()` writes it to `client` in one go at the end of the
    read, or as soon as the path's frames in it reach `CLIENT_BATCH_BYTES`. `output_meter` (a
    `LevelMeter` in the session's output format, or None) is fed every audio delta the legs
    decode, whichever item it belongs to.

    `reader` (a `DirectReader`, or None) is where the legs may move their sockets (see
    `DirectLeg`); the session's server sets it.
    """

    __slots__ = ("coalescer", "upstream", "flush_armed", "on_pending", "reader",
                 "outbound_item", "item_generated", "item_delivered", "output_meter", "client",
                 "batch", "batch_bytes", "batching", "c2u_audio_frames", "c2u_audio_bytes", "u2c_audio_frames",
                 "u2c_audio_bytes", "u2c_json_frames", "u2c_json_bytes")

    def __init__(self, coalescer: Coalescer, on_pending) -> None:
        self.c2u_audio_frames = self.c2u_audio_bytes = self.u2c_audio_frames = self.u2c_audio_bytes = 0
        self.u2c_json_frames = self.u2c_json_bytes = 0
        self.coalescer = coalescer
        self.on_pending = on_pending
        self.upstream = None
        self.flush_armed = False
        self.outbound_item: str | None = None
        self.item_generated = 0
        self.item_delivered = 0
        self.output_meter: LevelMeter | None = None
        self.client = None
        self.batch: list = []
        self.batch_bytes = 0  # what this path appended to `batch` since the last flush
        self.batching = False
        self.reader: DirectReader | None = None

    def client_audio(self, pcm) -> None:
        """A client binary frame (read only during the call), while `upstream` is set."""
        self.c2u_audio_frames += 1
        self.c2u_audio_bytes += len(pcm)
        coalescer = self.coalescer
        frame = coalescer.push(pcm)
        while frame is not None:  # more than one only for a frame over MAX_APPEND_AUDIO_BYTES
            upstream = self.upstream
            if upstream is not None and not upstream.is_disconnected and not upstream.is_close_frame_sent:
                upstream.send_reuse_external_bytearray(_TEXT, frame, HEADER_ROOM)
            frame = coalescer.push(b"")
        if (coalescer.pending_bytes >= coalescer.sample_width) != self.flush_armed:
            self.on_pending()

    def upstream_audio(self, item_id: str, pcm: bytes) -> bool:
        """Take decoded upstream audio if it belongs to `outbound_item`; False: not taken."""
        if item_id != self.outbound_item:
            return False
        size = len(pcm)
        self.item_generated += size
        self.item_delivered += size
        self.u2c_audio_frames += 1
        self.u2c_audio_bytes += size
        self._batch_frame(frame_header(0x82, size), pcm)
        return True

    def upstream_transcript(self, item_id: str, event: bytes | None, message_bytes: int) -> bool:
        """Take a transcript delta's client event if it belongs to `outbound_item`."""
        if item_id != self.outbound_item:
            return False
        self.u2c_json_frames += 1
        self.u2c_json_bytes += message_bytes
        if event is not None:
            self._batch_frame(frame_header(0x81, len(event)), event)
        return True

    def _batch_frame(self, header: bytes, payload: bytes) -> None:
        self.batching = True
        self.batch.append(header)
        self.batch.append(payload)
        self.batch_bytes += len(header) + len(payload)
        if self.batch_bytes >= CLIENT_BATCH_BYTES:
            self.flush_batch()
            self.batching = True  # the read goes on: its end flushes the rest

    def flush_batch(self) -> None:
        """Write the batched client frames in one write (one writev of headers and payloads, no
        copy) and stop batching; a no-op when nothing is batched. Nothing goes out after the
        client's close frame (the checks picows applies before every send)."""
        self.batching = False
        self.batch_bytes = 0
        batch = self.batch
        if batch:
            client = self.client
            if client is not None and not client.is_disconnected and not client.is_close_frame_sent:
                client.underlying_transport.writelines(batch)
            batch.clear()


class DirectReader:
    """Reads the attached sockets of one event loop itself, in the compiled module: one epoll
    set watched by the loop as a single reader, each ready socket drained by one `recv` into
    one shared buffer, and the whole frames its leg recognises (client audio; upstream audio
    and transcript deltas for the open item) relayed without a transport call, memoryview or
    frame object in between. The twin attaches nothing: its legs always read through picows,
    which is the behaviour the direct reads reproduce.

    `batch_interval_s` > 0: under load the set is read once per interval, by timer, instead of
    on every wake-up (fewer context switches); a read that finds nothing puts the set back on
    the loop, so an idle node answers the first byte at once."""

    def __init__(self, loop, batch_interval_s: float = 0.0) -> None:
        self._loop = loop
        self.batch_interval_s = batch_interval_s
        self.frames = 0  # relayed by the legs from this reader's reads, ever

    @property
    def attached(self) -> int:
        """How many sockets are read here now."""
        return 0

    @property
    def paced(self) -> bool:
        """The next read waits for the interval's timer (the set is off the loop)."""
        return False

    def close(self) -> None:
        """Stop: every attached socket goes back to its transport."""


class DirectLeg(WSListener):
    """A picows listener whose socket a `DirectReader` can read instead of its transport.

    In the compiled module, after a frame picows delivered that the leg relayed itself and that
    left picows' read buffer empty, the socket moves to the path's reader (plain TCP only: a
    TLS socket's bytes are not the frames). The reader relays the whole frames the leg
    recognises in C; the first frame it declines, end of stream, the socket closing
    (`forget_reads`) and backpressure (`hold_reads` until `release_reads`) give the socket back
    to its transport, the unread bytes handed to picows first, in order. Whatever the reader
    declines reaches the leg through picows exactly as without it.

    `direct_frames` counts the frames the reader relayed for this leg.

    The twin reads through picows throughout; it keeps the flag so sessions drive both alike.
    """

    def __init__(self) -> None:
        self.path: AudioPath | None = None
        self.assembling = False  # the subclass sets it while a fragmented message is built
        self.reads_held = False
        self.direct_frames = 0

    @property
    def reading_directly(self) -> bool:
        return False

    def hold_reads(self) -> None:
        """Backpressure: the socket goes back to its transport (whose reading the caller
        pauses) and stays there until `release_reads`."""
        self.reads_held = True

    def release_reads(self) -> None:
        self.reads_held = False

    def forget_reads(self) -> None:
        """The socket is gone: drop it from the reader (no transport call)."""


class ClientLeg(DirectLeg):
    """Base of the client socket's listener: a whole binary frame of at most `max_audio_bytes`
    goes through `path` while its inbound gate is open (`path.upstream` set, and no fragmented
    message being assembled: the subclass keeps `assembling`); every other frame goes to
    `on_frame`."""

    def __init__(self) -> None:
        super().__init__()
        self.max_audio_bytes = 0

    def on_ws_frame(self, transport, frame) -> None:
        path = self.path
        if path is not None and path.upstream is not None and frame.msg_type is _BINARY and frame.fin \
                and not (frame.rsv1 | frame.rsv2 | frame.rsv3) and not self.assembling \
                and frame.payload_size <= self.max_audio_bytes:
            try:
                path.client_audio(frame.get_payload_as_memoryview())
            except Exception:  # a bug must not take the socket down silently: log it, go on
                log.exception("error relaying client audio")
        else:
            self.on_frame(transport, frame)

    def on_frame(self, transport, frame) -> None:
        raise NotImplementedError


class UpstreamLeg(DirectLeg):
    """Base of the upstream socket's listener. Each whole text message (no fragmented one being
    assembled: the subclass keeps `assembling`) is classified here: an output-audio delta or an
    audio-transcript delta for `path.outbound_item` goes straight into the client batch, any
    other audio delta to `on_audio(item_id, pcm)`, any other event (transcript deltas of other
    items included) to `on_event(payload)` (payload valid only during the call); control and
    fragment frames, and frames with reserved bits set, go to `on_other_frame`. After the last
    frame of each socket read the batch goes out: `path.flush_batch()`, or `on_read_end()`
    without a path.
    A leg without a path (retired by its session) hands every message to `on_event`. Once a close
    frame has gone out on the transport (picows' parser failed the connection, or a close of
    ours is under way) no whole text message is relayed or handed on (RFC 6455 §7.1.7)."""

    def on_ws_frame(self, transport, frame) -> None:
        path = self.path
        try:
            if frame.msg_type is _TEXT and frame.fin and not (frame.rsv1 | frame.rsv2 | frame.rsv3) \
                    and not self.assembling:
                if transport.is_close_frame_sent:
                    return  # the connection is closing: nothing behind a close of ours is relayed
                payload = frame.get_payload_as_memoryview()
                if path is None:
                    self.on_event(payload)
                    return
                decoded = decode_audio_delta(payload, path.output_meter)
                if decoded is not None:
                    if not path.upstream_audio(decoded[0], decoded[1]):
                        self.on_audio(decoded[0], decoded[1])
                    return
                transcript = decode_transcript_delta(payload)
                if transcript is None or not path.upstream_transcript(transcript[0], transcript[1], len(payload)):
                    self.on_event(payload)
            else:
                self.on_other_frame(transport, frame)
        finally:
            if frame.last_in_buffer:
                if path is not None:
                    path.flush_batch()
                else:
                    self.on_read_end()

    def on_event(self, payload) -> None:
        raise NotImplementedError

    def on_audio(self, item_id: str, pcm: bytes) -> None:
        raise NotImplementedError

    def on_other_frame(self, transport, frame) -> None:
        raise NotImplementedError

    def on_read_end(self) -> None:
        raise NotImplementedError


def release_handshake(transport) -> None:
    """Drop a picows transport's HTTP upgrade request and response once the session no longer
    needs them: picows keeps both (header multidicts and their strings, ~1 KB per socket, and on
    the upstream socket the request carries the API key) for the life of the connection but
    never reads them again. The attributes are read-only from Python, so the pure twin leaves
    them; only the compiled one (which sets them through picows' C declarations) frees them."""
