"""Pure-Python twin of `_fastpath._compiled`: the reference behaviour, same API, same tests.

Units: PCM is 16-bit little-endian mono unless a `sample_width` of 1 says otherwise (G.711);
levels are in dBFS relative to a full-scale 16-bit sample (32768), floored at `DBFS_FLOOR` so
digital silence is a finite number that JSON can carry.
"""
from __future__ import annotations

import base64
import binascii
import math

import numpy as np
import orjson

#: Bytes kept free in front of every encoded frame, so picows can write the WebSocket header
#: in place (`WSTransport.send_reuse_external_bytearray` needs at least 14).
HEADER_ROOM = 14
#: The level reported for digital silence.
DBFS_FLOOR = -100.0
#: A sample at or beyond this magnitude counts as clipped.
CLIP_LEVEL = 32767

_APPEND_PREFIX = b'{"type":"input_audio_buffer.append","audio":"'
_APPEND_SUFFIX = b'"}'
_AUDIO_DELTA_TYPES = frozenset(("response.output_audio.delta", "response.audio.delta"))


def _dbfs(amplitude: float) -> float:
    if amplitude <= 0.0:
        return DBFS_FLOOR
    return max(DBFS_FLOOR, 20.0 * math.log10(amplitude / 32768.0))


def _samples(pcm) -> np.ndarray:
    view = memoryview(pcm).cast("B")
    usable = len(view) - (len(view) & 1)
    return np.frombuffer(view[:usable], dtype="<i2")


class LevelMeter:
    """Accumulates the level of PCM16 audio fed to it, until `read()` takes and resets it.

    `feed` ignores a trailing odd byte (the caller carries it to the next chunk).
    """

    __slots__ = ("_sum_squares", "_peak", "_clipped", "_samples")

    def __init__(self) -> None:
        self._sum_squares = 0
        self._peak = 0
        self._clipped = 0
        self._samples = 0

    def feed(self, pcm) -> None:
        samples = _samples(pcm)
        if samples.size == 0:
            return
        wide = samples.astype(np.int64)
        self._sum_squares += int(np.dot(wide, wide))
        magnitude = np.abs(wide)
        self._peak = max(self._peak, int(magnitude.max()))
        self._clipped += int(np.count_nonzero(magnitude >= CLIP_LEVEL))
        self._samples += int(samples.size)

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


def measure_level(pcm) -> tuple[float, float, int]:
    """One-shot level of a PCM16 chunk: `(rms_dbfs, peak_dbfs, clipped)`."""
    meter = LevelMeter()
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
    When `meter` is given, the samples are also fed to it (same pass in the compiled version).
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


class Coalescer:
    """Merges small client audio frames into fewer, larger `input_audio_buffer.append` frames.

    `push(data)` appends audio and returns an encoded frame (see `encode_append`) once at least
    `target_bytes` of whole samples are pending, else None. A trailing partial sample (the odd byte
    of PCM16) is carried to the next push, never dropped. `flush()` encodes whatever whole samples
    are pending (None if there are none) — the session calls it at turn boundaries, on commit and
    on its timer, so no audio waits longer than the coalescing bound. `discard()` drops pending
    audio (e.g. `clear_audio`) and returns how many bytes it dropped.
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
        """Bytes per sample: 2 (PCM16, metered) or 1 (G.711, not metered). Read-only."""
        return self._sample_width

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def push(self, data) -> bytearray | None:
        self._pending += data
        whole = len(self._pending) - len(self._pending) % self.sample_width
        if whole < self.target_bytes:
            return None
        return self._emit(whole)

    def flush(self) -> bytearray | None:
        whole = len(self._pending) - len(self._pending) % self.sample_width
        if whole == 0:
            return None
        return self._emit(whole)

    def discard(self) -> int:
        dropped = len(self._pending)
        del self._pending[:]
        return dropped

    def _emit(self, whole: int) -> bytearray:
        chunk = bytes(self._pending[:whole])
        del self._pending[:whole]
        meter = self.meter if self.sample_width == 2 else None
        return encode_append(chunk, meter)
