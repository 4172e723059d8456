"""Every knob of the mock OpenAI Realtime server, in one dataclass.

The CLI (`gateway.mock.cli`) exposes each field as a flag; tests construct it directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

BadKeyMode = Literal["ws_error", "http_401"]
BetaMode = Literal["serve", "reject"]
Pacing = Literal["fast", "realtime"]
EchoMode = Literal["turn", "stream"]
FunctionTrigger = Literal["name_in_text", "none"]
ResponseFailure = Literal["rate_limit_exceeded", "server_error", "model_not_found", "insufficient_quota"]


@dataclass
class MockOptions:
    """Configuration of one `MockRealtimeServer`.

    Times are seconds (`*_s`) or milliseconds (`*_ms`) as their names say.
    """

    # --- handshake ---------------------------------------------------------------------
    api_keys: Optional[set[str]] = None
    """Accepted keys; None accepts any non-empty key."""
    bad_key: BadKeyMode = "ws_error"
    """Bad/missing key: "ws_error" = 101, `error` event, close 3000 (OpenAI 2024);
    "http_401" = HTTP 401 at the upgrade, no frames (Azure)."""
    beta: BetaMode = "reject"
    """Beta-shaped clients: "serve" = speak the beta dialect; "reject" = 101, `error`
    beta_api_shape_disabled, close 4000 (OpenAI since 2026)."""
    handshake_delay_s: float = 0.0
    """Delay before the HTTP upgrade is even read (the peer sees a slow handshake)."""

    # --- the voice -----------------------------------------------------------------------
    pacing: Pacing = "fast"
    """"fast": response audio as fast as the socket takes it; "realtime": each delta is
    spaced by its own duration."""
    delta_ms: int = 100
    """Duration of audio carried by one `response.output_audio.delta` (the last may be shorter)."""
    echo_mode: EchoMode = "turn"
    """"turn": a response echoes the committed user turn; "stream": every appended byte is
    echoed continuously inside one long-lived response (relay benchmarks; no VAD)."""
    text_tone_hz: float = 440.0
    """Frequency of the tone spoken in reply to a text turn."""
    reply_item_ms: int = 0
    """When > 0, a spoken reply longer than this is split into several assistant message items
    of at most this much audio each, one after another in the same response, its transcript
    split with it (the real server splits long replies: reference §7.3); 0: one item."""
    transcription_delay_ms: int = 0
    """Input transcription of a committed turn starts this long after the commit. The real
    server transcribes asynchronously: its result may land after the response, even after
    `response.done` (reference §7.3, §10.18); 0 sends it at once, before the response."""

    # --- function calling --------------------------------------------------------------------
    function_trigger: FunctionTrigger = "name_in_text"
    """"name_in_text": a user text turn that contains a configured tool's name makes the
    response a function call to that tool; "none": never by text."""
    function_every_n_audio_turns: int = 0
    """When > 0 and tools are configured, every Nth audio turn is answered by a call to the
    first tool."""

    # --- faults --------------------------------------------------------------------------------
    fail_responses: Optional[ResponseFailure] = None
    """Make responses end as `response.done` status "failed" with this error (§7.7)."""
    fail_every_n: int = 1
    """Which responses fail when `fail_responses` is set: every Nth (1 = all)."""
    close_after_s: Optional[float] = None
    """Drop each connection this long after it was accepted."""
    close_after_events: Optional[int] = None
    """Drop each connection right after it has sent this many server events."""
    close_with_frame: bool = False
    """How `close_after_*` ends a connection: False = abruptly, no close frame (TCP reset);
    True = close frame 1011 then disconnect."""
    session_max_s: Optional[float] = None
    """Session lifetime: then `error` session_expired and close 1001. None: the dialect's
    (OpenAI GA 60 min, beta 30 min since December 2024)."""
    slow_read_s: float = 0.0
    """After each client frame, stop reading the socket for this long (peer sees backpressure)."""

    # --- bookkeeping ------------------------------------------------------------------------------
    record: bool = True
    """Keep `MockSession.received` / `.sent` and closed sessions (tests assert on them). Off for
    long runs (the node's `--upstream mock`, load tests), where memory must stay bounded."""
    max_message_bytes: int = 32 * 1024 * 1024
    """Largest client message accepted (reassembled); larger ones end the session with 1009."""

    def __post_init__(self) -> None:
        if self.transcription_delay_ms < 0:
            raise ValueError("transcription_delay_ms must be >= 0")
        if self.delta_ms <= 0:
            raise ValueError("delta_ms must be > 0")
        if self.fail_every_n < 1:
            raise ValueError("fail_every_n must be >= 1")
        if self.reply_item_ms < 0:
            raise ValueError("reply_item_ms must be >= 0")
        if self.function_every_n_audio_turns < 0:
            raise ValueError("function_every_n_audio_turns must be >= 0")
        # `not a <= x < b` also refuses nan
        for name in ("handshake_delay_s", "slow_read_s"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a number of seconds >= 0")
        for name in ("close_after_s", "session_max_s"):
            if getattr(self, name) is not None and not 0.0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a number of seconds > 0")
        if self.close_after_events is not None and self.close_after_events < 1:
            raise ValueError("close_after_events must be >= 1")
        if not 0.0 < self.text_tone_hz < 12_000.0:  # below the Nyquist frequency of 24 kHz audio
            raise ValueError("text_tone_hz must be above 0 and below 12000")
        for name in ("bad_key", "beta", "pacing", "echo_mode", "function_trigger"):
            allowed = _ALLOWED[name]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}")
        if self.fail_responses is not None and self.fail_responses not in _ALLOWED["fail_responses"]:
            raise ValueError(f"fail_responses must be one of {sorted(_ALLOWED['fail_responses'])}")
        if self.api_keys is not None:
            self.api_keys = set(self.api_keys)


_ALLOWED = {
    "bad_key": {"ws_error", "http_401"},
    "beta": {"serve", "reject"},
    "pacing": {"fast", "realtime"},
    "echo_mode": {"turn", "stream"},
    "function_trigger": {"name_in_text", "none"},
    "fail_responses": {"rate_limit_exceeded", "server_error", "model_not_found", "insufficient_quota"},
}
