"""Test audio in G.711: a compressor written from the ITU-T G.711 segment rules (independent of
the expansion tables under test) and tones of a known level, as PCM16 and as G.711."""
from __future__ import annotations

import math

LAWS = ("g711_ulaw", "g711_alaw")
RATE = 8000


def ulaw_encode(sample: int) -> int:
    """µ-law code of a linear 16-bit sample (bias 0x84, clip 32635; codes are stored inverted)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = min(max(magnitude.bit_length() - 8, 0), 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | exponent << 4 | mantissa) & 0xFF


def alaw_encode(sample: int) -> int:
    """A-law code of a linear 16-bit sample (13-bit magnitude; even bits inverted: ^ 0x55)."""
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(abs(sample), 32767) >> 3
    exponent = min(max(magnitude.bit_length() - 5, 0), 7)
    mantissa = (magnitude >> (exponent if exponent else 1)) & 0x0F
    return (sign | exponent << 4 | mantissa) ^ 0x55


ENCODERS = {"g711_ulaw": ulaw_encode, "g711_alaw": alaw_encode}


def encode(samples, law: str) -> bytes:
    encoder = ENCODERS[law]
    return bytes(encoder(int(s)) for s in samples)


def tone_samples(seconds: float, peak_dbfs: float, frequency_hz: float = 1000.0,
                 rate: int = RATE) -> list[int]:
    """A sine of `peak_dbfs` peak (full scale 32768), as int16 values. At the defaults a period
    is exactly 8 samples, so any whole number of periods has the tone's exact level."""
    amplitude = 32768.0 * 10.0 ** (peak_dbfs / 20.0)
    count = int(seconds * rate)
    return [max(-32768, min(32767, round(amplitude * math.sin(2 * math.pi * frequency_hz * n / rate + 0.3))))
            for n in range(count)]


def pcm16(samples) -> bytes:
    return b"".join(int(s).to_bytes(2, "little", signed=True) for s in samples)


def g711_tone(seconds: float, law: str, peak_dbfs: float) -> tuple[bytes, bytes]:
    """(the tone in `law`, the PCM16 tone it was encoded from), both at 8 kHz."""
    samples = tone_samples(seconds, peak_dbfs)
    return encode(samples, law), pcm16(samples)
