"""The custom metrics, reported through Locust's request event so they appear in every Locust
output (console table, web UI charts, --csv, --json, distributed aggregation).

Each metric is one (request_type, name) row. "Response time" is the measured duration in ms;
"size" is a byte count where one makes sense. A failure is a row's failure count plus an entry in
Locust's failures table with the reason, its numbers and ids masked so that like failures share
an entry (the first three of each are logged whole, with the figures).

| type  | name                              | one sample per            | time measured (ms)                                          | failure when |
|-------|-----------------------------------|---------------------------|-------------------------------------------------------------|--------------|
| WS    | connect → ready                   | session                   | start of the TCP connect → `ready` received                  | refused, closed or no `ready` in time |
| VOICE | first audio after speech_stopped  | VAD turn                  | `speech_stopped` received → first reply audio frame          | no speech_started + speech_stopped (VAD heard no turn), no reply audio in time, or reply audio before `speech_stopped` (wrong order) |
| VOICE | audio round trip                  | server-VAD turn           | end of the user's speech (its last frame sent, once its audio was captured) → first reply audio frame; includes the VAD's silence window | no reply audio in time, or before the end of the speech |
| VOICE | audio round trip (push-to-talk)   | push-to-talk turn         | `commit` sent → first reply audio frame                       | no reply audio in time, or before `commit` |
| VOICE | reply completeness                | completed voice reply     | first → last reply audio frame; size = reply bytes           | reply bytes ≠ the turn's audio (the mock echoes it bit-exactly), status ≠ completed, or audio arrived outside any response |
| VOICE | reply completeness (interrupted)  | interrupted reply         | first reply audio → `interrupted`; size = reply bytes        | the bytes are not an exact prefix of the turn's audio (not all of it when `response_done` completed came first), or `played_ms` > audio received |
| VOICE | interrupted reaction              | barge-in                  | first frame of the overlapping speech sent → `interrupted`   | no `interrupted` in time (the reply finished first, or never came) |
| VOICE | mic lateness                      | talk spurt                | worst lateness of a frame against the real-time schedule     | the clip could not be sent within its length + --reply-timeout (a stalled socket); a high value is not a failure, it shows the load generator falling behind |
| TEXT  | text round trip                   | text turn                 | `text` sent → first reply audio frame                        | no reply audio in time, or before `text` |
| TEXT  | reply completeness                | text reply                | first → last reply audio frame; size = reply bytes           | status ≠ completed, or not bit-exactly the mock's reply to the text (its deterministic tone) |
| ERROR | <gateway error code>              | `error` event             | none (left out of the response-time figures)                 | always: every gateway `error` is a failure named by its code |
| WS    | session lost                      | unexpected close          | session age                                                  | always: the socket closed without a fatal `error` first |
"""
from __future__ import annotations

import logging
import re
import weakref
from typing import Any

log = logging.getLogger("loadtest")

WS = "WS"
VOICE = "VOICE"
TEXT = "TEXT"
ERROR = "ERROR"

CONNECT_READY = "connect → ready"
FIRST_AUDIO_AFTER_STOP = "first audio after speech_stopped"
AUDIO_ROUND_TRIP = "audio round trip"  # server VAD: includes its silence window (500 ms here)
AUDIO_ROUND_TRIP_PTT = "audio round trip (push-to-talk)"  # from `commit`: no silence window, its own row
REPLY_COMPLETENESS = "reply completeness"
REPLY_COMPLETENESS_INTERRUPTED = "reply completeness (interrupted)"
INTERRUPTED_REACTION = "interrupted reaction"
MIC_LATENESS = "mic lateness"
TEXT_ROUND_TRIP = "text round trip"
SESSION_LOST = "session lost"

# What varies from one occurrence of a failure to the next: Locust keys its failures table (and
# the memory behind it, sent on by every worker) by the exact text, so one row per byte count or
# id would bury the table and grow without bound over a long run.
_NUMBER_LISTS = re.compile(r"\[(?:-?\d+(?:\.\d+)?(?:, )?)*\]")
_IDS = re.compile(r"\b(resp|item|sess|session|call|event|evt|conv|fc)_[A-Za-z0-9]+")
_NUMBERS = re.compile(r"-?\d+(?:\.\d+)?")
DETAILS_LOGGED_PER_REASON = 3
_MAX_REASONS_TRACKED = 1_000
#: a run's `environment.events` -> the failures its reporters have logged, per table row
_SEEN_BY_RUN: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str, str], int]]" = weakref.WeakKeyDictionary()


def failure_kind(reason: str) -> str:
    """`reason` with its numbers and ids masked: what Locust's failures table groups by."""
    reason = _NUMBER_LISTS.sub("[…]", reason)
    reason = _IDS.sub(r"\1_…", reason)
    return _NUMBERS.sub("N", reason)


class MetricFailure(Exception):
    """The reason a metric sample failed; its message is what Locust's failures table shows."""


class MetricReporter:
    """Fires Locust request events. `events` is `environment.events` (or any object with a
    `request.fire(**kwargs)` hook, which is how the tests capture samples)."""

    __slots__ = ("_fire", "_seen")

    def __init__(self, events: Any) -> None:
        self._fire = events.request.fire
        # failures so far per table row, shared by every reporter of the run (each simulated user
        # has one): the first few of a row are logged per run, not per user (600 lines at -u 200)
        self._seen: dict[tuple[str, str, str], int] = _SEEN_BY_RUN.setdefault(events, {})

    def sample(self, request_type: str, name: str, ms: float, size: int = 0) -> None:
        """One successful measurement of `ms` milliseconds (`size` bytes where meaningful).

        Never clamped: a negative time means events in the wrong order, which the caller reports
        as a failure (a zero would pass it off as a fast reply)."""
        self._fire(
            request_type=request_type, name=name, response_time=ms, response_length=size,
            exception=None, context={},
        )

    def failure(self, request_type: str, name: str, reason: str, ms: float | None = None, size: int = 0) -> None:
        """One failed sample. Locust's failures table shows `reason` with its numbers and ids
        masked (`failure_kind`), so like failures share a row; the first few of each row are
        logged whole. `ms` only when the failure has a measured duration (a reply that came, but
        wrong): without one (nothing came in time, events in the wrong order) Locust leaves the
        sample out of every response-time figure, where a 0 would pass for a fast reply."""
        kind = failure_kind(reason)
        key = (request_type, name, kind)
        seen = self._seen.get(key, 0)
        if seen < DETAILS_LOGGED_PER_REASON and (seen or len(self._seen) < _MAX_REASONS_TRACKED):
            self._seen[key] = seen + 1
            log.warning("%s %s failed: %s", request_type, name, reason)
        self._fire(
            request_type=request_type, name=name, response_time=ms, response_length=size,
            exception=MetricFailure(kind), context={},
        )
