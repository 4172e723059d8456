"""The one error table: every failure the gateway reports to a client, with its wire code.

Each `GatewayError` subclass is one wire `code` (the class name). `ERROR_TABLE` maps code ->
(fatal by default, WebSocket close code, close reason). A fatal error is sent as an `error` event
and then the client socket is closed with that code and reason; a non-fatal one is only reported
and the session goes on.

Upstream error details (OpenAI's `code`, `type`, `param`, `event_id`) travel in the `upstream`
field of the client error. Anything that looks like a credential is scrubbed from every message
before it leaves the gateway.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Close codes. 1xxx are RFC 6455; 4xxx are this gateway's application codes (documented here).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UPSTREAM_AUTH_FAILED = 4001
CLOSE_SESSION_EXPIRED = 4002
CLOSE_IDLE_TIMEOUT = 4003
CLOSE_SLOW_CLIENT = 4004
CLOSE_CLIENT_UNRESPONSIVE = 4005


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """How one wire code behaves: fatal by default, how a fatal one closes the socket, and
    whether the client brought it about (logged at INFO even when it ends the session: there
    is nothing for the operator to do; the rest, WARNING when fatal)."""

    fatal: bool
    close_code: int
    close_reason: str
    by_client: bool = False


#: code -> behaviour. The single source of truth for codes, fatality and close codes.
ERROR_TABLE: dict[str, ErrorKind] = {
    "AuthenticationFailed": ErrorKind(True, CLOSE_UPSTREAM_AUTH_FAILED, "upstream authentication failed"),
    "NotConnected": ErrorKind(False, CLOSE_INTERNAL_ERROR, "not connected", by_client=True),
    "ConnectionFailed": ErrorKind(True, CLOSE_INTERNAL_ERROR, "upstream connection failed"),
    "RateLimitExceeded": ErrorKind(False, CLOSE_TRY_AGAIN_LATER, "rate limit exceeded"),
    "InvalidConfig": ErrorKind(False, CLOSE_POLICY_VIOLATION, "invalid config", by_client=True),
    "InvalidMessage": ErrorKind(False, CLOSE_POLICY_VIOLATION, "invalid message", by_client=True),
    "UpstreamError": ErrorKind(False, CLOSE_INTERNAL_ERROR, "upstream error"),
    "SessionExpired": ErrorKind(True, CLOSE_SESSION_EXPIRED, "session expired"),
    "Overloaded": ErrorKind(True, CLOSE_TRY_AGAIN_LATER, "overloaded"),
    "IdleTimeout": ErrorKind(True, CLOSE_IDLE_TIMEOUT, "idle timeout", by_client=True),
    "SlowClient": ErrorKind(True, CLOSE_SLOW_CLIENT, "client not reading", by_client=True),
    "ClientUnresponsive": ErrorKind(True, CLOSE_CLIENT_UNRESPONSIVE, "no pong", by_client=True),
}

# Credentials: OpenAI keys (sk-..., sk-proj-...), ephemeral keys (ek_...), also masked the way
# OpenAI echoes a wrong key (`sk-****...9876`, `sk-...9876`: its last four characters are still
# the operator's), whatever follows "API key provided:", bearer tokens and api-key header values
# that might be echoed inside an upstream or library message.
_SECRET_PATTERNS = (
    # (not after a letter or digit, so `x_sk-...` is one too; a dot inside, not the one that
    # ends a sentence)
    re.compile(r"(?<![A-Za-z0-9])(sk|ek|rk)[-_][A-Za-z0-9_*.\-]{5,}[A-Za-z0-9_*\-]"),
    # a JWT wherever it stands (a client token echoed without its `Bearer`): header and payload
    # are base64 of JSON objects, so both begin `eyJ`
    re.compile(r"eyJ[A-Za-z0-9_-]{6,}\.eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*"),
    # A token runs to whitespace, a quote or a comma, as it always did (what it holds is not
    # ours to guess), but never over the next `bearer` or `api key`, which would hide that
    # one's secret from its own pattern; `_redact_token` gives back the closing brackets (and
    # `;`) that end it, so `[Bearer X]` keeps its `]`. An opening bracket or quote is no way
    # around it; `Bearer: X` and `Bearer=X` are caught too. A key already replaced is left as
    # it is. All linear: no lazy match, and no two \s* side by side (they backtrack
    # quadratically over a run of spaces).
    re.compile(r"(?i)(bearer(?:\s*[:=]\s*|\s+)[\"'\[(<{]?)(?!\[?redacted\])"
               r"((?:(?!bearer|api[-_ ]key)[^\s\"',])+)"),
    re.compile(r"(?i)(api[-_ ]key[\"']?\s*(?:provided\s*)?[:=]\s*[\"'\[(<{]?)(?!\[?redacted\])"
               r"((?:(?!bearer|api[-_ ]key)[^\s\"',])+)"),
)


#: longest error message sent to a client: a message may quote the client's own value, and a
#: megabyte `voice` must not come back as a megabyte error
MAX_MESSAGE_CHARS = 500


#: how far past the clip a token may reach and still be scrubbed whole (an OpenAI key is ~170
#: characters, a JWT rarely over 1,000)
_SECRET_MARGIN = 2048
#: where a token ends, as the patterns below see it
_TOKEN_END = re.compile(r"[\s\"',]")


def _clip(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}... ({len(text) - MAX_MESSAGE_CHARS} more characters)"


def clean(text: str) -> str:
    """`text` scrubbed and clipped, for a client or a log. A message may quote the client's own
    value (10 MiB of it): only what is kept goes through the patterns, so a huge message costs
    what a short one does. What is kept ends where a token does (within `_SECRET_MARGIN`), so a
    key across the clip is scrubbed whole, and nothing from past it can slide in when the
    replacements shorten the text."""
    if len(text) <= MAX_MESSAGE_CHARS:
        return scrub(text)
    token_end = _TOKEN_END.search(text, MAX_MESSAGE_CHARS, MAX_MESSAGE_CHARS + _SECRET_MARGIN)
    head = text[:token_end.start() if token_end else MAX_MESSAGE_CHARS + _SECRET_MARGIN]
    return f"{scrub(head)[:MAX_MESSAGE_CHARS]}... ({len(text) - MAX_MESSAGE_CHARS} more characters)"


#: the node's own upstream keys, redacted wherever they appear whatever their shape (an Azure
#: key is 32 hex digits: no pattern above knows it)
_known_secrets: tuple[str, ...] = ()
#: shorter values are not taken for secrets: redacting them would garble ordinary words
MIN_KNOWN_SECRET_CHARS = 8


def keep_secret(value: str | None) -> None:
    """Have `scrub` redact `value` itself, besides everything key-like."""
    global _known_secrets
    if value and len(value) >= MIN_KNOWN_SECRET_CHARS and value not in _known_secrets:
        _known_secrets = (*_known_secrets, value)


def _redact_token(match: re.Match) -> str:
    token = match.group(2)
    kept = len(token) - len(token.rstrip("])}>;"))
    return f"{match.group(1)}[redacted]{token[len(token) - kept:] if kept else ''}"


def scrub(text: str) -> str:
    """Remove the node's keys and anything key-like from a message that may reach a client or a log."""
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    text = _SECRET_PATTERNS[0].sub("[redacted]", text)
    text = _SECRET_PATTERNS[1].sub("[redacted]", text)
    text = _SECRET_PATTERNS[2].sub(_redact_token, text)
    return _SECRET_PATTERNS[3].sub(_redact_token, text)


class GatewayError(Exception):
    """Base of every error reported to a client. The subclass name is the wire `code`.

    `param` names the offending field (config/message errors); `upstream` carries the upstream
    error's `{code, type, param, event_id}` when the error came from OpenAI (and `retry_after_s`
    when a refused upgrade said how long to wait); `fatal` and
    `close_code` default to the table entry and may be overridden per instance.
    """

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        upstream: dict[str, Any] | None = None,
        fatal: bool | None = None,
        close_code: int | None = None,
    ) -> None:
        super().__init__(message)
        kind = ERROR_TABLE[self.code]
        self.message = clean(message)
        self.param = _clip(param) if param is not None else None
        self.upstream = _scrub_upstream(upstream) if upstream else None
        self.fatal = kind.fatal if fatal is None else fatal
        self.close_code = kind.close_code if close_code is None else close_code
        self.close_reason = kind.close_reason

    @property
    def code(self) -> str:
        return type(self).__name__

    @property
    def by_client(self) -> bool:
        return ERROR_TABLE[self.code].by_client

    def to_event(self) -> dict[str, Any]:
        """The client `error` event for this error."""
        event: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message, "fatal": self.fatal}
        if self.param is not None:
            event["param"] = self.param
        if self.upstream is not None:
            event["upstream"] = self.upstream
        return event


def _scrub_upstream(upstream: dict[str, Any]) -> dict[str, Any]:
    kept = {}
    for key in ("code", "type", "param", "event_id"):
        value = upstream.get(key)
        kept[key] = clean(value) if isinstance(value, str) else value  # may echo the client's input
    retry_after = upstream.get("retry_after_s")  # a refused upgrade's Retry-After, in seconds
    if isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool):
        kept["retry_after_s"] = retry_after
    return kept


class AuthenticationFailed(GatewayError):
    """The upstream refused the gateway's API key (HTTP 401/403 or `invalid_api_key`)."""


class NotConnected(GatewayError):
    """The session cannot take this yet (e.g. the pre-ready buffer is full)."""


class ConnectionFailed(GatewayError):
    """The upstream could not be reached, timed out, or dropped the connection."""


class RateLimitExceeded(GatewayError):
    """The upstream failed a response with `rate_limit_exceeded` (the session goes on), or
    refused the handshake with HTTP 429 (fatal: there is no session; close 1013, try later)."""


class InvalidConfig(GatewayError):
    """A `config` field has an invalid value; that field is ignored, the rest applies."""


class InvalidMessage(GatewayError):
    """A client message is malformed, unknown, or has a wrong field type."""


class UpstreamError(GatewayError):
    """Any other upstream `error` event or failed response."""


class SessionExpired(GatewayError):
    """The session hit its maximum duration (the upstream's, or the node's --max-session-s)."""


class Overloaded(GatewayError):
    """The node cannot take more work for this session (limits)."""


class IdleTimeout(GatewayError):
    """No traffic in either direction for --idle-timeout-s."""


class SlowClient(GatewayError):
    """The client stopped reading and its queued audio passed --max-client-queue-ms (policy close)."""


class ClientUnresponsive(GatewayError):
    """The client sent nothing, not even a pong, for --client-ping-timeout-s after a ping: it is
    gone without closing (close 4005; it usually never sees the error or the close)."""


# Every table row has its class, and every class its row.
assert {cls.__name__ for cls in GatewayError.__subclasses__()} == set(ERROR_TABLE)

#: Upstream error codes that are expected races and never end a session.
BENIGN_UPSTREAM_CODES = frozenset({
    "response_cancel_not_active",
    "item_truncate_invalid_item_id",
    "conversation_already_has_active_response",
    "input_audio_buffer_commit_empty",
})

#: Upstream error codes after which the upstream session is unusable.
FATAL_UPSTREAM_CODES = {
    "invalid_api_key": AuthenticationFailed,
    "session_expired": SessionExpired,
    "beta_api_shape_disabled": UpstreamError,
    "insufficient_quota": UpstreamError,
    "account_deactivated": UpstreamError,
    "billing_hard_limit_reached": UpstreamError,
}


def from_upstream_error(error: dict[str, Any]) -> GatewayError:
    """Map an upstream `error.error` object (or a failed response's `status_details.error`)."""
    code = error.get("code")
    message = str(error.get("message") or "upstream error")
    details = {"code": code, "type": error.get("type"), "param": error.get("param"),
               "event_id": error.get("event_id")}
    if code == "rate_limit_exceeded":
        return RateLimitExceeded(message, upstream=details)
    fatal_cls = FATAL_UPSTREAM_CODES.get(code) if isinstance(code, str) else None
    if fatal_cls is not None:
        return fatal_cls(message, upstream=details, fatal=True)
    return UpstreamError(message, upstream=details, fatal=False)
