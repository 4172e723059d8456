"""The audio a load-test user speaks: PCM16 LE mono 24 kHz, the gateway's default client format.

The default clip is generated, never downloaded: a deterministic "utterance" of syllable-like
tone bursts (a harmonic complex with a smooth envelope) separated by short pauses. It is built so
that an energy VAD (the mock's, or a real one) hears exactly ONE turn:

- every burst is well above the speech level of a server-VAD threshold of 0.5 (burst RMS is about
  -16 dBFS; the mock treats a -20 dBFS tone as speech),
- every pause inside the clip is shorter than ``MAX_INNER_PAUSE_MS`` (far below the 500 ms
  `silence_duration_ms` the load test configures), so the turn does not end inside the clip,
- the clip starts and ends with a burst: the silence around it comes from the microphone, which
  streams digital silence between talk spurts.

A user's own WAV can replace it (`--clip path.wav`): 16-bit mono 24 kHz only, so the bytes sent
are exactly the file's bytes and the echo comparison stays exact. It must hold one turn, as the
generated clip does (see `one_turn`): its leading and trailing silence is cut, and a pause inside
it long enough for the VAD to end the turn there is refused at start, not failed on every turn.
"""
from __future__ import annotations

import functools
import wave

import numpy as np

from gateway.mock.vad import WINDOW_MS, threshold_to_dbfs

SAMPLE_RATE = 24_000
BYTES_PER_SAMPLE = 2
BYTES_PER_MS = SAMPLE_RATE * BYTES_PER_SAMPLE // 1000  # 48 bytes of PCM16 per millisecond

MAX_INNER_PAUSE_MS = 160

# The server VAD the load test configures: every clip must be exactly one turn for it.
VAD_SETTINGS = {"enabled": True, "threshold": 0.5, "silence_duration_ms": 500, "prefix_padding_ms": 300}
# A pause this long or longer may end the turn inside a clip: the VAD's 10 ms windows fall on the
# clip wherever the microphone's timeline puts it, so a pause measured on one grid may be a window
# longer on another.
MAX_CLIP_PAUSE_MS = VAD_SETTINGS["silence_duration_ms"] - 2 * WINDOW_MS
_SEED = 20240501


def ms_to_bytes(ms: float) -> int:
    """Byte offset of `ms` milliseconds of PCM16 24 kHz audio (always a whole sample)."""
    return int(ms) * BYTES_PER_MS


def bytes_to_ms(n_bytes: int) -> float:
    """Duration in milliseconds of `n_bytes` of PCM16 24 kHz audio."""
    return n_bytes / BYTES_PER_MS


@functools.lru_cache(maxsize=4)
def generated_clip(seed: int = _SEED, syllables: int = 7) -> bytes:
    """A deterministic speech-like utterance (about 1.5-2 s), PCM16 LE mono 24 kHz.

    Same seed, same bytes (within one machine's libm). Each syllable is 120-260 ms of a harmonic
    complex (fundamental 110-220 Hz, 4 partials with falling weights) under a raised-cosine
    envelope; pauses between syllables are 40-`MAX_INNER_PAUSE_MS` ms of digital silence.
    """
    rng = np.random.default_rng(seed)
    pieces: list[np.ndarray] = []
    for index in range(syllables):
        if index:
            pause_ms = int(rng.integers(40, MAX_INNER_PAUSE_MS + 1))
            pieces.append(np.zeros(pause_ms * SAMPLE_RATE // 1000))
        burst_ms = int(rng.integers(120, 261))
        n = burst_ms * SAMPLE_RATE // 1000
        t = np.arange(n) / SAMPLE_RATE
        fundamental = float(rng.uniform(110.0, 220.0))
        glide = float(rng.uniform(-0.15, 0.15))  # a little intonation: the pitch drifts ±15 %
        phase = 2 * np.pi * fundamental * (t + glide * t * t / (2 * t[-1]))
        wave_ = sum(weight * np.sin(k * phase) for k, weight in ((1, 1.0), (2, 0.5), (3, 0.3), (4, 0.15)))
        ramp = min(n // 4, SAMPLE_RATE // 50)  # 20 ms attack and release
        envelope = np.ones(n)
        edge = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, ramp))
        envelope[:ramp] = edge
        envelope[-ramp:] = edge[::-1]
        burst = wave_ * envelope
        target_rms = 10 ** (-16 / 20) * 32767
        burst *= target_rms / np.sqrt(np.mean((wave_) ** 2))
        pieces.append(burst)
    samples = np.clip(np.rint(np.concatenate(pieces)), -32768, 32767).astype("<i2")
    return samples.tobytes()


def load_wav_clip(path: str) -> bytes:
    """The PCM frames of a 16-bit mono 24 kHz WAV file; ValueError for anything else, including a
    file that cannot be read (missing, not a WAV, float samples: what `wave` refuses)."""
    try:
        with wave.open(path, "rb") as wav:
            if (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) != (1, 2, SAMPLE_RATE):
                raise ValueError(
                    f"{path}: need 16-bit mono {SAMPLE_RATE} Hz PCM, got {wav.getsampwidth() * 8}-bit "
                    f"{wav.getnchannels()}-channel {wav.getframerate()} Hz"
                )
            pcm = wav.readframes(wav.getnframes())
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    except (EOFError, wave.Error) as exc:
        reason = str(exc) or "truncated"
        raise ValueError(
            f"{path}: need a 16-bit mono {SAMPLE_RATE} Hz PCM WAV, cannot read this one ({reason})"
        ) from None
    pcm = one_turn(pcm, path)
    if len(pcm) < ms_to_bytes(100):
        raise ValueError(f"{path}: speech shorter than 100 ms (the upstream's minimum commit)")
    return pcm


def one_turn(pcm: bytes, path: str) -> bytes:
    """`pcm` from its first to its last speech window, as the mock's energy VAD at the load
    test's threshold judges speech (10 ms windows, mean square over the bar); ValueError if it
    has no speech, or a pause inside it of `MAX_CLIP_PAUSE_MS` or more on any 1 ms grid offset.

    The microphone streams silence around every clip, so the clip's own leading and trailing
    silence would only move the end of the speech away from the end of the clip, where the
    round trip is measured from (and trailing silence of 500 ms would end the turn inside it)."""
    bar_dbfs = threshold_to_dbfs(VAD_SETTINGS["threshold"])
    bar_mean_square = (32768.0 ** 2) * 10.0 ** (bar_dbfs / 10.0)
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    samples_per_ms = SAMPLE_RATE // 1000
    window = samples_per_ms * WINDOW_MS

    def speech_windows(offset_ms: int) -> np.ndarray:
        shifted = samples[offset_ms * samples_per_ms:]
        count = len(shifted) // window
        frames = shifted[:count * window].reshape(count, window)
        return np.flatnonzero(np.einsum("ij,ij->i", frames, frames) / window > bar_mean_square)

    on_grid = speech_windows(0)
    if on_grid.size == 0:
        raise ValueError(f"{path}: no speech in it: no 10 ms above {bar_dbfs:.0f} dBFS, what the mock's "
                         f"VAD hears as speech at the load test's threshold {VAD_SETTINGS['threshold']}")
    for offset_ms in range(WINDOW_MS):
        speech = speech_windows(offset_ms)
        if speech.size < 2:
            continue
        gaps = np.diff(speech) - 1  # quiet windows between two speech windows
        longest = int(gaps.argmax())
        if gaps[longest] * WINDOW_MS >= MAX_CLIP_PAUSE_MS:
            starts_ms = offset_ms + (int(speech[longest]) + 1) * WINDOW_MS
            raise ValueError(
                f"{path}: a pause of {int(gaps[longest]) * WINDOW_MS} ms at {starts_ms / 1000:.2f} s would end the "
                f"VAD turn there ({VAD_SETTINGS['silence_duration_ms']} ms of silence ends a turn): one clip must "
                f"be one turn; keep its pauses under {MAX_CLIP_PAUSE_MS} ms"
            )
    first, end = int(on_grid[0]) * window, (int(on_grid[-1]) + 1) * window
    if end + window > len(samples):
        end = len(samples)  # a part-window after the last speech window is not silence to cut
    return pcm[first * BYTES_PER_SAMPLE:end * BYTES_PER_SAMPLE]


GENERATED_VARIANTS = 4


def load_clips(spec: str) -> tuple[bytes, ...]:
    """What a user says, turn after turn (it cycles through the tuple).

    `spec` "generated": `GENERATED_VARIANTS` different generated utterances (different seeds), so
    consecutive turns carry different audio and a reply echoing the wrong turn cannot pass the
    completeness check. Otherwise the path of a WAV file (see `load_wav_clip`): that one clip.
    """
    if spec == "generated":
        return tuple(generated_clip(_SEED + variant) for variant in range(GENERATED_VARIANTS))
    return (load_wav_clip(spec),)
