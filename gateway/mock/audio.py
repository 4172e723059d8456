"""Audio arithmetic for the mock: formats, the bytes↔ms timeline, tones, levels, and ids.

Formats are named by their GA wire type ("audio/pcm" PCM16 LE mono 24 kHz, "audio/pcmu",
"audio/pcma" G.711 8 kHz); the beta names map onto them.
"""
from __future__ import annotations

import math
import os

import numpy as np

# bytes of audio per millisecond, per GA format type
BYTES_PER_MS = {"audio/pcm": 48, "audio/pcmu": 8, "audio/pcma": 8}
BETA_TO_GA_FORMAT = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
GA_TO_BETA_FORMAT = {v: k for k, v in BETA_TO_GA_FORMAT.items()}
FORMAT_DESCRIPTION = {
    "audio/pcm": "mono PCM16 at 24kHz",
    "audio/pcmu": "G.711 u-law at 8kHz",
    "audio/pcma": "G.711 A-law at 8kHz",
}
SAMPLE_RATE = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}


def _ulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.float64)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1))
    return np.where(sign != 0, magnitude, -magnitude).astype(np.float64)


_G711_TO_LINEAR = {"audio/pcmu": _ulaw_table(), "audio/pcma": _alaw_table()}


def samples_of(audio: bytes, fmt: str) -> np.ndarray:
    """Linear sample values (float64, PCM16 scale) of `audio` in format `fmt`.
    A trailing odd byte of PCM16 is ignored."""
    if fmt == "audio/pcm":
        return np.frombuffer(audio, dtype="<i2", count=len(audio) // 2).astype(np.float64)
    return _G711_TO_LINEAR[fmt][np.frombuffer(audio, dtype=np.uint8)]


def rms_dbfs(audio: bytes, fmt: str) -> float:
    """RMS level of `audio` in dBFS (full scale = 32768); -inf for digital silence."""
    samples = samples_of(audio, fmt)
    if samples.size == 0:
        return -math.inf
    mean_square = float(np.dot(samples, samples)) / samples.size
    if mean_square <= 0.0:
        return -math.inf
    return 10.0 * math.log10(mean_square / (32768.0 * 32768.0))


def _linear_to_ulaw(samples: np.ndarray) -> np.ndarray:
    bias, clip = 0x84, 32635
    sign = np.where(samples < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(samples), clip) + bias
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)


def _linear_to_alaw(samples: np.ndarray) -> np.ndarray:
    sign = np.where(samples >= 0, 0x80, 0)
    magnitude = np.minimum(np.abs(samples), 32767) >> 3
    exponent = np.clip(np.floor(np.log2(np.maximum(magnitude, 1))).astype(np.int32) - 4, 0, 7)
    mantissa = np.where(exponent == 0, magnitude >> 1, magnitude >> exponent) & 0x0F
    return ((sign | (exponent << 4) | mantissa) ^ 0x55).astype(np.uint8)


def encode(samples: np.ndarray, fmt: str) -> bytes:
    """Linear samples (PCM16 scale) as `fmt`'s bytes."""
    samples = np.clip(np.round(samples), -32768, 32767).astype(np.int32)
    if fmt == "audio/pcm":
        return samples.astype("<i2").tobytes()
    if fmt == "audio/pcmu":
        return _linear_to_ulaw(samples).tobytes()
    return _linear_to_alaw(samples).tobytes()


def convert(audio: bytes, source: str, target: str) -> bytes:
    """`audio` from format `source` to `target`, resampled linearly: the same duration."""
    if source == target:
        return audio
    samples = samples_of(audio, source)
    count = samples.size * SAMPLE_RATE[target] // SAMPLE_RATE[source]
    positions = np.arange(count) * (SAMPLE_RATE[source] / SAMPLE_RATE[target])
    return encode(np.interp(positions, np.arange(samples.size), samples) if samples.size else samples, target)


def tone(duration_ms: int, fmt: str, frequency_hz: float = 440.0, dbfs: float = -12.0) -> bytes:
    """A deterministic sine tone of exactly `duration_ms` ms in `fmt`, at `dbfs` peak level."""
    rate = SAMPLE_RATE[fmt]
    count = duration_ms * rate // 1000
    t = np.arange(count, dtype=np.float64) / rate
    amplitude = 32767.0 * 10.0 ** (dbfs / 20.0)
    return encode(amplitude * np.sin(2.0 * math.pi * frequency_hz * t), fmt)


_ALPHANUMERIC = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TO_ALNUM = bytes(_ALPHANUMERIC[b % 62] for b in range(256))


def random_alnum(length: int) -> str:
    """`length` random alphanumerics (the style of OpenAI's ids)."""
    return os.urandom(length).translate(_TO_ALNUM).decode()


def new_id(prefix: str, length: int = 21) -> str:
    """An id in OpenAI's style: `sess_`, `item_`, `resp_` + 21, `call_` + 16 alphanumerics."""
    return prefix + random_alnum(length)


class EventIds:
    """Cheap, unique, time-sortable `event_…` ids for one session: a random 12-character
    alphanumeric stem + a 9-digit counter, 21 characters after `event_` like the real ones.
    One call costs well under a microsecond (the stream echo emits thousands per second)."""

    __slots__ = ("_stem", "_counter")

    def __init__(self) -> None:
        self._stem = "event_" + random_alnum(12)
        self._counter = 0

    def next(self) -> str:
        self._counter += 1
        return f"{self._stem}{self._counter:09d}"
