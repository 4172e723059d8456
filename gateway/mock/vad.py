"""Energy voice-activity detection on the session's input-audio timeline (reference §3.3, §7.3).

Audio is analysed in 10 ms windows aligned to the timeline (window k covers [10k, 10k+10) ms).
A window is speech when its RMS level exceeds

    level_dbfs(threshold) = -90 + 90 * threshold        (threshold in 0..1)

so the default 0.5 puts the bar at -45 dBFS: a -20 dBFS tone or normal speech is speech,
digital silence and -70 dBFS noise are not; 1.0 needs a full-scale square wave, 0.0 accepts
anything above -90 dBFS. (A higher threshold needs louder audio, as OpenAI documents.)

Turn boundaries follow the documented definitions:
- `speech_started.audio_start_ms` = onset of the first speech window − prefix_padding_ms,
  clamped at `floor_ms` (the start of the audio still in the input buffer);
- `speech_stopped.audio_end_ms` = end of the last speech window + silence_duration_ms,
  reported once that much silence has been seen (so it includes the silence window).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .audio import BYTES_PER_MS, samples_of

WINDOW_MS = 10

# semantic_vad has no energy notion of "the user is done"; its eagerness becomes a silence
# duration (OpenAI documents only the maximum waits, 8/4/2 s, which would make tests slow).
SEMANTIC_EAGERNESS_SILENCE_MS = {"low": 800, "medium": 500, "auto": 500, "high": 250}


def threshold_to_dbfs(threshold: float) -> float:
    """The speech/non-speech bar in dBFS for a server_vad `threshold` (see module docstring)."""
    return -90.0 + 90.0 * threshold


class VadEvent(NamedTuple):
    kind: str  # "speech_started" | "speech_stopped"
    ms: int    # audio_start_ms or audio_end_ms on the session timeline


class EnergyVad:
    """Feeds on appended audio; returns speech_started / speech_stopped boundaries.

    `feed(audio)` may be called with any chunk size; partial windows are carried over.
    The caller owns the timeline: the VAD only counts the bytes it was fed (starting at
    timeline 0 when created).
    """

    __slots__ = ("fmt", "level_dbfs", "prefix_padding_ms", "silence_duration_ms",
                 "_window_bytes", "_bar_mean_square", "_carry", "_position_ms", "in_speech", "_last_speech_end_ms")

    def __init__(self, fmt: str, threshold: float, prefix_padding_ms: int,
                 silence_duration_ms: int, start_ms: int = 0) -> None:
        self.fmt = fmt
        self.level_dbfs = threshold_to_dbfs(threshold)
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self._window_bytes = BYTES_PER_MS[fmt] * WINDOW_MS
        # the dBFS bar as a mean square on the PCM16 scale, so windows compare without logs
        self._bar_mean_square = (32768.0 ** 2) * 10.0 ** (self.level_dbfs / 10.0)
        self._carry = b""
        self._position_ms = start_ms  # timeline position of the first byte of _carry
        self.in_speech = False
        self._last_speech_end_ms = 0

    def feed(self, audio: bytes, floor_ms: int) -> list[VadEvent]:
        """Analyse `audio` (appended right after everything fed so far). `floor_ms` is the
        earliest timeline position still in the input buffer (clamps audio_start_ms)."""
        data = self._carry + audio if self._carry else audio
        events: list[VadEvent] = []
        window = self._window_bytes
        whole = len(data) - len(data) % window
        if whole:
            # one vectorised pass over every whole window of this chunk
            samples = samples_of(data[:whole], self.fmt).reshape(whole // window, -1)
            mean_square = np.einsum("ij,ij->i", samples, samples) / samples.shape[1]
            speech_flags = (mean_square > self._bar_mean_square).tolist()
        else:
            speech_flags = []
        for speech in speech_flags:
            start_ms = self._position_ms
            self._position_ms += WINDOW_MS
            if speech:
                if not self.in_speech:
                    self.in_speech = True
                    events.append(VadEvent(
                        "speech_started", max(floor_ms, start_ms - self.prefix_padding_ms)))
                self._last_speech_end_ms = start_ms + WINDOW_MS
            elif self.in_speech and self._position_ms - self._last_speech_end_ms >= self.silence_duration_ms:
                self.in_speech = False
                events.append(VadEvent(
                    "speech_stopped", self._last_speech_end_ms + self.silence_duration_ms))
        self._carry = data[whole:]
        return events

    def reset(self, position_ms: Optional[int] = None) -> None:
        """Forget any speech in progress (input buffer cleared / committed by hand)."""
        self.in_speech = False
        if position_ms is not None and not self._carry:
            self._position_ms = position_ms
