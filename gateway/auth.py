"""Admission of client connections: who may connect (`ClientAuthenticator`), from which web page
(`OriginPolicy`) and how many at once (`SessionLimiter`). Self-contained: the server calls these
from its picows listener factory and listener; nothing here opens sockets or touches a session.

Credentials (checked in this order; the first location present is the one used):

1. ``Authorization: Bearer <token>`` — any other scheme is refused (no silent fallback).
2. WebSocket subprotocol, for browsers (which cannot set headers on a WebSocket)::

       new WebSocket(url, ["realtime-gateway", "realtime-gateway.bearer." + token])

   The client offers BOTH entries; the server must answer with ``Sec-WebSocket-Protocol:
   realtime-gateway`` (``Principal.subprotocol``), never with the entry carrying the token. Offering
   the bearer entry without ``realtime-gateway`` is refused, because the handshake could not
   complete without echoing the secret. The token must consist of RFC 7230 token characters
   (true for JWTs and for keys made of letters, digits and ``-._~+``).
3. ``?token=<token>`` in the query string. Never log ``request.path`` raw: use `redact_path`.

A token is accepted if it equals one of the configured static API keys (SHA-256 digests compared
with `hmac.compare_digest` against *every* key, no early exit) or is an HS256 JWT signed with the
configured secret whose ``exp`` (required), ``nbf``, and optional ``aud``/``iss`` check out; the
principal id is ``sub``, and an optional integer claim (default ``max_sessions``) overrides the
per-key session limit for that token.

Nothing in this module logs, returns or stores a token or key in clear: keys are kept as SHA-256
digests only, refusal reasons are fixed strings, and settings mask their secrets in ``repr``.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Iterable, Mapping
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import jwt
import orjson
from multidict import CIMultiDict
from picows.common import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from gateway.config import ConfigError

log = logging.getLogger("gateway.auth")

#: the non-secret subprotocol a browser offers and the server echoes back
SUBPROTOCOL = "realtime-gateway"
#: prefix of the subprotocol entry that carries the token
BEARER_SUBPROTOCOL_PREFIX = "realtime-gateway.bearer."
#: env var with static keys: comma-separated ``key`` or ``id:key`` entries
API_KEYS_ENV = "GATEWAY_API_KEYS"
#: env var with the HS256 secret (secrets never come from flags: flags show up in `ps`)
JWT_SECRET_ENV = "GATEWAY_JWT_SECRET"
#: longer credentials are refused before any parsing (bounds the work an anonymous peer can cause)
MAX_TOKEN_CHARS = 8192
#: RFC 7518 §3.2: an HS256 key must be at least as long as the hash output
MIN_JWT_SECRET_BYTES = 32
#: a static key is a password nobody types: short ones (``x``, or the tail of a split ``id:key``)
#: are refused at start
MIN_API_KEY_CHARS = 16
#: key ids are the operator's: a conservative charset keeps them easy to grep and quote
_PRINCIPAL_ID = re.compile(r"[A-Za-z0-9._:@/+=#-]{1,128}")
#: a token's `sub` is its identity provider's (Auth0's `auth0|…`, Google's 21 digits, emails)
MAX_SUBJECT_CHARS = 256
#: the ids keys without one get (``keyfile#<line>``, ``env#<entry>``): not for explicit ids
_AUTOMATIC_KEY_ID = re.compile(r"(keyfile|env)#[0-9]+")
#: characters allowed in a static key (printable ASCII without whitespace, comma or double quote)
_KEY_CHARS = re.compile(r"[!#-+\--~]+")
#: RFC 7230 token characters: all that a WebSocket subprotocol (the browsers' way to send a key) holds
_SUBPROTOCOL_CHARS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: (id, digest) of the keys `_parse_key_entry` has warned about in this process (a reload of the
#: same key says nothing new; another key under the same automatic id does)
_KEYS_WARNED: set[tuple[str, bytes]] = set()


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated client. `id` names the key or token subject — never the secret itself.

    `max_sessions` is this principal's concurrent-session limit (None = no per-key limit);
    `subprotocol` is the value the server must echo in ``Sec-WebSocket-Protocol`` (None = send
    none); `method` is ``"api_key"``, ``"jwt"`` or ``"anonymous"`` (auth disabled).
    """

    id: str
    max_sessions: int | None
    subprotocol: str | None
    method: str

    @property
    def limit_key(self) -> str:
        """The name its sessions are counted under for per-key limits: ``key:<id>``, ``jwt:<sub>``
        (``anonymous:anonymous``). A key id and a token subject may be the same text (a JWT with
        ``sub: keyfile#1``): they are different clients and must not share a limit."""
        return f"{_LIMIT_PREFIXES.get(self.method, self.method)}:{self.id}"


_LIMIT_PREFIXES = {"api_key": "key", "jwt": "jwt"}


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP refusal of an upgrade: status, a stable `code`, a short human `reason`.

    `reason` is a fixed string chosen by this module and never contains a credential.
    """

    status: int
    code: str
    reason: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def body(self) -> bytes:
        return orjson.dumps({"error": {"code": self.code, "message": self.reason}})

    def to_response(self) -> WSUpgradeResponseWithListener:
        """The picows answer for the listener factory: this status, a JSON body, no listener."""
        headers = {"Content-Type": "application/json", **dict(self.headers)}
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_error_response(self.status, self.body, extra_headers=headers), None)


@dataclass(frozen=True, slots=True)
class AuthRefusal(Refusal):
    """Missing or invalid credentials: HTTP 401 with a ``WWW-Authenticate`` challenge."""


@dataclass(frozen=True, slots=True)
class LimitRefusal(Refusal):
    """A session limit is reached. `scope` is ``global`` (503), ``key`` or ``ip`` (429); `code`
    is the wire error code ``Overloaded`` for a client that is refused after the upgrade."""

    scope: str = "global"


def _auth_refusal(reason: str) -> AuthRefusal:
    return AuthRefusal(401, "Unauthorized", reason,
                       (("WWW-Authenticate", f'Bearer realm="{SUBPROTOCOL}"'),))


#: the refusal for a wrong key, a bad signature, a malformed token: deliberately one reason
_INVALID = _auth_refusal("invalid credentials")
_MISSING = _auth_refusal("missing credentials")


# --------------------------------------------------------------------------------------------
# Settings and static keys


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Client-auth settings (the node builds one from its flags/env). Secrets are hidden in repr.

    `api_keys` is the raw value of ``GATEWAY_API_KEYS`` (comma-separated ``key`` / ``id:key``);
    `api_keys_file` a file with one ``key`` or ``id:key`` per line (``#`` starts a comment line).
    `max_sessions_per_key` is the default concurrent-session limit per principal (None = none).
    """

    api_keys_file: str | None = None
    api_keys: str | None = field(default=None, repr=False)
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = 0.0
    jwt_max_sessions_claim: str = "max_sessions"
    max_sessions_per_key: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **fields) -> "AuthSettings":
        """Settings with the secrets taken from ``GATEWAY_API_KEYS`` / ``GATEWAY_JWT_SECRET``."""
        env = os.environ if environ is None else environ
        return cls(api_keys=env.get(API_KEYS_ENV) or None, jwt_secret=env.get(JWT_SECRET_ENV) or None,
                   **fields)


@dataclass(frozen=True, slots=True)
class _StoredKey:
    id: str
    digest: bytes = field(repr=False)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def _parse_key_entry(entry: str, default_id: str, where: str) -> _StoredKey:
    """One ``key`` or ``id:key`` entry, split at the first ``:`` (so a key itself may contain
    ``:``, a bare key may not). Errors name the location, never the entry's text."""
    key_id, sep, key = entry.partition(":")
    if not sep:
        key_id, key = default_id, entry
    key_id, key = key_id.strip(), key.strip()
    if not _PRINCIPAL_ID.fullmatch(key_id):
        raise ConfigError(f"{where}: key id must be 1-128 of [A-Za-z0-9._:@/+=#-]")
    if sep and _AUTOMATIC_KEY_ID.fullmatch(key_id):
        # it would share the per-key limit and the log name of another entry's bare key
        raise ConfigError(f"{where}: key ids keyfile#N and env#N are reserved for keys given without an id")
    if not key or not _KEY_CHARS.fullmatch(key):
        raise ConfigError(f"{where}: key must be non-empty printable ASCII without spaces, commas or double quotes")
    if len(key) < MIN_API_KEY_CHARS:
        split = " (an entry with a ':' is `id:key`, split at its first ':')" if sep else ""
        raise ConfigError(f"{where}: the key must be at least {MIN_API_KEY_CHARS} characters{split}")
    if not _SUBPROTOCOL_CHARS.fullmatch(key) and (key_id, _digest(key)) not in _KEYS_WARNED:
        # a base64 key, say (`/`, `=`): browsers and most libraries refuse to offer it, so only
        # the query token is left to them; said at start (not again at each SIGHUP's reload)
        # rather than found by each browser user
        _KEYS_WARNED.add((key_id, _digest(key)))
        log.warning("%s: key %s has a character a WebSocket subprotocol cannot carry (one of "
                    "( ) < > @ ; : \\ / [ ] ? = { }): browsers cannot send it as a subprotocol, only as "
                    "?token= (percent-encoded)", where, key_id)
    return _StoredKey(key_id, _digest(key))


def parse_api_keys_file(text: str, source: str = "api keys file") -> list[_StoredKey]:
    """Keys from a key file: one ``key`` or ``id:key`` per line, blank lines and ``#`` lines skipped.
    A bare key gets the id ``<source>#<line>`` (ids must not be derived from the secret)."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_parse_key_entry(line, f"keyfile#{number}", f"{source} line {number}"))
    return keys


def parse_api_keys_env(value: str) -> list[_StoredKey]:
    """Keys from ``GATEWAY_API_KEYS``: comma-separated ``key`` or ``id:key``; bare key id ``env#<n>``."""
    keys = []
    for number, entry in enumerate(value.split(","), 1):
        if entry.strip():
            keys.append(_parse_key_entry(entry, f"env#{number}", f"{API_KEYS_ENV} entry {number}"))
    return keys


# --------------------------------------------------------------------------------------------
# Token extraction


def _header_values(request: WSUpgradeRequest, name: str) -> list[str]:
    return list(request.headers.getall(name, ()))


def extract_credentials(request: WSUpgradeRequest) -> tuple[str | None, str | None, AuthRefusal | None]:
    """Find the token in a picows upgrade request: ``(token, subprotocol_to_echo, refusal)``.

    `subprotocol_to_echo` is ``SUBPROTOCOL`` when the client offered it (with or without a token),
    else None. `refusal` is set for malformed credentials (a non-Bearer Authorization header,
    repeated tokens, a bearer subprotocol without ``SUBPROTOCOL``, an oversized token).
    """
    offered: list[str] = []
    for value in _header_values(request, "Sec-WebSocket-Protocol"):
        offered.extend(item.strip() for item in value.split(",") if item.strip())
    echo = SUBPROTOCOL if SUBPROTOCOL in offered else None
    protocol_tokens = [item[len(BEARER_SUBPROTOCOL_PREFIX):] for item in offered
                       if item.startswith(BEARER_SUBPROTOCOL_PREFIX)]

    authorization = _header_values(request, "Authorization")
    if authorization:
        if len(authorization) > 1:
            return None, echo, _auth_refusal("more than one Authorization header")
        scheme, _, token = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return None, echo, _auth_refusal("Authorization scheme must be Bearer")
        return _checked(token.strip(), echo)

    if protocol_tokens:
        if len(protocol_tokens) > 1:
            return None, echo, _auth_refusal("more than one bearer subprotocol")
        if echo is None:
            return None, None, _auth_refusal(f"offer subprotocol '{SUBPROTOCOL}' with the bearer subprotocol")
        return _checked(protocol_tokens[0], echo)

    query = urlsplit(request.path.decode("latin-1")).query
    query_tokens = [value for name, value in parse_qsl(query, keep_blank_values=True) if name == "token"]
    if query_tokens:
        if len(query_tokens) > 1:
            return None, echo, _auth_refusal("more than one token parameter")
        return _checked(query_tokens[0], echo)
    return None, echo, None


def _checked(token: str, echo: str | None) -> tuple[str | None, str | None, AuthRefusal | None]:
    if not token:
        return None, echo, _MISSING
    if len(token) > MAX_TOKEN_CHARS:
        return None, echo, _auth_refusal("credentials too long")
    return token, echo, None


def redact_path(path: bytes | str) -> str:
    """The request path for logs, with the value of any ``token`` query parameter replaced."""
    text = path.decode("latin-1") if isinstance(path, bytes) else path
    parts = urlsplit(text)
    if not parts.query:
        return text
    pairs = [(name, "[redacted]" if name == "token" else value)
             for name, value in parse_qsl(parts.query, keep_blank_values=True)]
    return f"{parts.path}?{urlencode(pairs, safe='[]', quote_via=quote)}"


# --------------------------------------------------------------------------------------------
# Authenticator


class ClientAuthenticator:
    """Decides who a connecting client is. Build with `from_settings`; call `authenticate`.

    With neither keys nor a JWT secret configured, `enabled` is False and every request gets the
    anonymous principal (the node must then call `auth_warning(host)` at start and log the result).
    Holds only SHA-256 digests of the static keys; `repr` shows counts, never secrets.
    """

    def __init__(self, keys: Iterable[_StoredKey] = (), *, jwt_secret: str | None = None,
                 jwt_audience: str | None = None, jwt_issuer: str | None = None,
                 jwt_leeway_s: float = 0.0, jwt_max_sessions_claim: str = "max_sessions",
                 max_sessions_per_key: int | None = None) -> None:
        self._keys = tuple(keys)
        digests = [key.digest for key in self._keys]
        if len(set(digests)) != len(digests):
            raise ConfigError("the same API key is configured twice (under one or two ids)")
        if jwt_secret is not None and len(jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(f"the JWT secret must be at least {MIN_JWT_SECRET_BYTES} bytes")
        if max_sessions_per_key is not None and max_sessions_per_key < 1:
            raise ConfigError("max sessions per key must be at least 1")
        if jwt_leeway_s < 0:
            raise ConfigError("JWT leeway must not be negative")
        self._jwt_secret = jwt_secret
        self._jwt_audience = jwt_audience
        self._jwt_issuer = jwt_issuer
        self._jwt_leeway_s = jwt_leeway_s
        self._jwt_max_sessions_claim = jwt_max_sessions_claim
        self.max_sessions_per_key = max_sessions_per_key

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> "ClientAuthenticator":
        """Load keys from the file and the env value in `settings`. Raises ConfigError."""
        keys: list[_StoredKey] = []
        if settings.api_keys_file:
            try:
                with open(settings.api_keys_file, encoding="utf-8") as handle:
                    text = handle.read()
            except OSError as exc:
                raise ConfigError(f"cannot read API keys file {settings.api_keys_file}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"API keys file {settings.api_keys_file} is not UTF-8") from None
            keys.extend(parse_api_keys_file(text, settings.api_keys_file))
            if not keys:
                raise ConfigError(f"API keys file {settings.api_keys_file} holds no keys")
        if settings.api_keys:
            keys.extend(parse_api_keys_env(settings.api_keys))
        return cls(keys, jwt_secret=settings.jwt_secret, jwt_audience=settings.jwt_audience,
                   jwt_issuer=settings.jwt_issuer, jwt_leeway_s=settings.jwt_leeway_s,
                   jwt_max_sessions_claim=settings.jwt_max_sessions_claim,
                   max_sessions_per_key=settings.max_sessions_per_key)

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self._jwt_secret is not None

    @property
    def key_count(self) -> int:
        """How many static API keys are accepted (file and environment together)."""
        return len(self._keys)

    def __repr__(self) -> str:
        return (f"ClientAuthenticator(keys={len(self._keys)}, jwt={self._jwt_secret is not None}, "
                f"max_sessions_per_key={self.max_sessions_per_key})")

    def auth_warning(self, host: str) -> str | None:
        """The loud start-up warning for an open relay: auth off and a non-loopback bind, else None."""
        if self.enabled or is_loopback_host(host):
            return None
        return (f"CLIENT AUTH IS DISABLED and the node listens on {host or 'all interfaces'}: anyone who can "
                f"reach this port can use the upstream API key. Configure {API_KEYS_ENV}, an API keys file "
                f"or {JWT_SECRET_ENV}, or bind to 127.0.0.1.")

    def authenticate(self, request: WSUpgradeRequest) -> Principal | AuthRefusal:
        """Who is this? A `Principal`, or an `AuthRefusal` (401). Never raises."""
        try:
            token, echo, refusal = extract_credentials(request)
            if not self.enabled:
                return Principal("anonymous", None, echo, "anonymous")
            if refusal is not None:
                return refusal
            if token is None:
                return _MISSING
            return self.verify_token(token, echo)
        except Exception as exc:  # a malformed request must be a refusal, not a 500 with a message
            log.warning("authentication failed unexpectedly (%s); refusing", type(exc).__name__)
            return _INVALID

    def verify_token(self, token: str, subprotocol: str | None = None) -> Principal | AuthRefusal:
        """Check one token against the static keys (all of them, constant time) and the JWT secret."""
        key_id = self._match_static_key(token)
        if key_id is not None:
            return Principal(key_id, self.max_sessions_per_key, subprotocol, "api_key")
        if self._jwt_secret is not None and token.count(".") == 2:
            return self._verify_jwt(token, subprotocol)
        return _INVALID

    def _match_static_key(self, token: str) -> str | None:
        # Equal-length digests, every key compared, no early exit: the time does not depend on
        # which key (if any) matched nor on how much of a key a guess got right.
        candidate = _digest(token)
        matched = None
        for key in self._keys:
            if hmac.compare_digest(candidate, key.digest):
                matched = key.id
        return matched

    def _verify_jwt(self, token: str, subprotocol: str | None) -> Principal | AuthRefusal:
        try:
            claims = jwt.decode(
                token, self._jwt_secret, algorithms=["HS256"], audience=self._jwt_audience,
                issuer=self._jwt_issuer, leeway=self._jwt_leeway_s,
                options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            return _auth_refusal("token expired")
        except jwt.ImmatureSignatureError:
            return _auth_refusal("token not yet valid")
        except jwt.InvalidAudienceError:
            return _auth_refusal("token audience mismatch")
        except jwt.InvalidIssuerError:
            return _auth_refusal("token issuer mismatch")
        except jwt.MissingRequiredClaimError as exc:
            return _auth_refusal(f"token lacks the {exc.claim!r} claim" if exc.claim in ("exp", "sub", "aud", "iss")
                                 else "token lacks a required claim")
        except jwt.InvalidTokenError:  # bad signature, wrong algorithm (incl. "none"), malformed
            return _INVALID
        subject = claims.get("sub")
        # identity providers use `|`, spaces and long ids (`auth0|…`, `google-oauth2|…`); the
        # text log escapes control characters, and those alone are refused here
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS or not subject.isprintable():
            return _auth_refusal(f"token subject must be 1-{MAX_SUBJECT_CHARS} printable characters")
        # absent: the node's per-key limit; present, it must be a limit (null is not "unlimited")
        claim = self._jwt_max_sessions_claim
        limit = claims[claim] if claim in claims else self.max_sessions_per_key
        if claim in claims and (type(limit) is not int or limit < 1):
            return _auth_refusal(f"token claim {claim!r} must be a positive integer")
        return Principal(subject, limit, subprotocol, "jwt")


def is_loopback_host(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for wildcards and anything else."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Origin allow-list

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class _OriginRule:
    schemes: frozenset[str]
    host: str           # lower-case; for a wildcard rule the suffix after "*."
    wildcard: bool      # "*.example.com": any subdomain, not example.com itself
    port: int | None    # None: the scheme's default port


def _parse_origin(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of a browser Origin value, or None if it is not a plain origin."""
    try:
        parts = urlsplit(origin)  # raises on an unclosed "[" (an IPv6 literal cut short)
        port = parts.port
    except ValueError:
        return None
    if (not parts.scheme or not parts.hostname or parts.path or parts.query or parts.fragment
            or parts.username is not None or parts.password is not None):
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


class OriginPolicy:
    """Which web pages may open a session (browsers send ``Origin``; other clients usually don't).

    Entries: ``https://app.example.com`` (exact origin; scheme, host and port must match, default
    ports implied), ``https://*.example.com`` (any subdomain of example.com, at any depth, NOT
    example.com itself), ``example.com`` / ``*.example.com[:port]`` without a scheme (http or
    https), ``null`` (the opaque origin of sandboxed pages and files; only if listed), and ``*``
    (any origin). An empty list allows no browser origin at all: deny by default.

    A request without an Origin header (non-browser clients) is allowed: they can forge any header
    anyway, so the allow-list protects browsers' users from other sites, not the node from clients.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = [entry.strip() for entry in allowed if entry.strip()]
        self._any = "*" in self.allowed
        self._null = "null" in self.allowed
        self._rules = [self._rule(entry) for entry in self.allowed if entry not in ("*", "null")]

    @staticmethod
    def _rule(entry: str) -> _OriginRule:
        text = entry if "://" in entry else "http://" + entry
        schemes = frozenset({text.split("://", 1)[0].lower()}) if "://" in entry else frozenset({"http", "https"})
        wildcard = "://*." in text
        if wildcard:
            text = text.replace("://*.", "://", 1)
        parsed = _parse_origin(text)
        if parsed is None or "*" in parsed[1]:
            raise ConfigError(f"allowed origin {entry!r} is not scheme://host[:port], host[:port] or *.host")
        _scheme, host, _port = parsed
        explicit_port = urlsplit(text).port
        return _OriginRule(schemes, host, wildcard, explicit_port)

    def __repr__(self) -> str:
        return f"OriginPolicy({self.allowed!r})"

    def allows(self, origin: str | None) -> bool:
        """True if a request with this Origin value (None: no header) may connect."""
        if origin is None:
            return True
        origin = origin.strip()
        if self._any:
            return True
        if origin == "null":
            return self._null
        parsed = _parse_origin(origin)
        if parsed is None:
            return False
        scheme, host, port = parsed
        for rule in self._rules:
            if scheme not in rule.schemes:
                continue
            if port != (rule.port if rule.port is not None else _DEFAULT_PORTS.get(scheme)):
                continue
            if host == rule.host if not rule.wildcard else host.endswith("." + rule.host):
                return True
        return False

    def check(self, request: WSUpgradeRequest) -> bool:
        """True if the upgrade's Origin is allowed (absent: allowed; repeated: refused)."""
        origins = _header_values(request, "Origin")
        if len(origins) > 1:
            return False
        return self.allows(origins[0] if origins else None)

    #: the refusal to send when `check` is False
    refusal = Refusal(403, "OriginNotAllowed", "origin not allowed")


# --------------------------------------------------------------------------------------------
# Session limits


class Slot:
    """One admitted session's place in a `SessionLimiter`. `release()` gives it back; it is
    idempotent, also runs on ``with`` exit, and as a last resort when the slot is garbage-collected
    (logged as a warning: a slot must be released on every exit path, see WaaV bug B1)."""

    __slots__ = ("_limiter", "principal_id", "ip", "_released")

    def __init__(self, limiter: "SessionLimiter", principal_id: str, ip: str | None) -> None:
        self._limiter = limiter
        self.principal_id = principal_id
        self.ip = ip
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> bool:
        """Give the slot back. True the first time, False (and no effect) after that."""
        if self._released:
            return False
        self._released = True
        self._limiter._release(self.principal_id, self.ip)
        return True

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if not getattr(self, "_released", True):
            log.warning("session slot of %s was never released; releasing on garbage collection",
                        self.principal_id)
            self.release()

    def __repr__(self) -> str:
        return f"Slot(principal_id={self.principal_id!r}, ip={self.ip!r}, released={self._released})"


class SessionLimiter:
    """Admission control: at most `max_sessions` on the node (503), at most a principal's own limit
    per principal (counted under its `Principal.limit_key`) and `max_per_ip` per client address
    (429). None means unlimited.

    Single-threaded (one event loop): `acquire` checks and increments in one synchronous call, so
    two upgrades can never both take the last slot. Counts are exact and drop to zero (entries
    removed) when every slot is released, so the tables stay bounded by the live sessions.
    """

    def __init__(self, max_sessions: int | None = None, max_per_ip: int | None = None) -> None:
        for name, value in (("max sessions", max_sessions), ("max sessions per IP", max_per_ip)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 (or unset for no limit)")
        self.max_sessions = max_sessions
        self.max_per_ip = max_per_ip
        self.active = 0
        self._per_key: dict[str, int] = {}
        self._per_ip: dict[str, int] = {}
        #: refusals so far by scope ("global", "key", "ip"), for metrics and tests
        self.refused = {"global": 0, "key": 0, "ip": 0}

    def active_for_key(self, principal_id: str) -> int:
        return self._per_key.get(principal_id, 0)

    def active_for_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

    def _counts(self, principal_id: str, ip: str | None) -> tuple[int, int, int]:
        """Sessions open now: on the node, for `principal_id`, from `ip`."""
        return self.active, self._per_key.get(principal_id, 0), self._per_ip.get(ip, 0) if ip else 0

    def check(self, principal_id: str, ip: str | None = None, *,
              key_limit: int | None = None) -> LimitRefusal | None:
        """The refusal `acquire` would give now, without taking a slot or counting a refusal."""
        active, for_key, for_ip = self._counts(principal_id, ip)
        if self.max_sessions is not None and active >= self.max_sessions:
            return LimitRefusal(503, "Overloaded", "the gateway is at capacity, retry later",
                                (("Retry-After", "5"),), scope="global")
        if key_limit is not None and for_key >= key_limit:
            return LimitRefusal(429, "Overloaded", "too many concurrent sessions for this key", scope="key")
        if ip is not None and self.max_per_ip is not None and for_ip >= self.max_per_ip:
            return LimitRefusal(429, "Overloaded", "too many concurrent sessions from this address", scope="ip")
        return None

    def acquire(self, principal_id: str, ip: str | None = None, *,
                key_limit: int | None = None) -> Slot | LimitRefusal:
        """Take a slot for `principal_id` from `ip` (None: no per-IP check), or refuse.

        `key_limit` is the principal's concurrent-session limit (`Principal.max_sessions`).
        """
        refusal = self.check(principal_id, ip, key_limit=key_limit)
        if refusal is not None:
            self.refused[refusal.scope] += 1
            return refusal
        self.active += 1
        self._per_key[principal_id] = self._per_key.get(principal_id, 0) + 1
        if ip is not None:
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return Slot(self, principal_id, ip)

    def _release(self, principal_id: str, ip: str | None) -> None:
        self.active -= 1
        _decrement(self._per_key, principal_id)
        if ip is not None:
            _decrement(self._per_ip, ip)


#: the file, in a node's shared directory, that holds its workers' session counts
SHARED_LIMITS_FILE = "sessions.sqlite"


class SharedSessionLimiter(SessionLimiter):
    """The same admission control for a node of several worker processes (`--workers N`): the
    counts live in a SQLite file every worker opens (in the node's shared directory), one row
    per worker and key, address or the node; a check and its taking of the slot are one write
    transaction, so two workers can never both take the last slot. The supervisor removes the
    rows of a worker that died (`forget_worker`). Only connects and disconnects touch the file,
    never a frame; nothing secret is in it (principal ids are key ids or JWT subjects)."""

    def __init__(self, path: str, max_sessions: int | None = None, max_per_ip: int | None = None) -> None:
        super().__init__(max_sessions, max_per_ip)
        self._pid = os.getpid()
        self._db = _open_limits(path)

    def _counts(self, principal_id: str, ip: str | None) -> tuple[int, int, int]:
        totals = dict(self._db.execute(
            "SELECT kind, SUM(n) FROM sessions WHERE kind = 'node' OR (kind = 'key' AND name = ?)"
            " OR (kind = 'ip' AND name = ?) GROUP BY kind", (principal_id, ip or "")).fetchall())
        return totals.get("node", 0), totals.get("key", 0), totals.get("ip", 0)

    def acquire(self, principal_id: str, ip: str | None = None, *,
                key_limit: int | None = None) -> Slot | LimitRefusal:
        with self._db:  # BEGIN IMMEDIATE ... COMMIT: the check and the take are one step
            self._db.execute("BEGIN IMMEDIATE")
            taken = super().acquire(principal_id, ip, key_limit=key_limit)
            if isinstance(taken, Slot):
                self._add(principal_id, ip, 1)
        return taken

    def _release(self, principal_id: str, ip: str | None) -> None:
        super()._release(principal_id, ip)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._add(principal_id, ip, -1)

    def _add(self, principal_id: str, ip: str | None, delta: int) -> None:
        for kind, name in (("node", ""), ("key", principal_id), ("ip", ip)):
            if name is None:
                continue
            self._db.execute("INSERT INTO sessions (pid, kind, name, n) VALUES (?, ?, ?, ?) ON CONFLICT"
                             " (pid, kind, name) DO UPDATE SET n = n + excluded.n", (self._pid, kind, name, delta))
        self._db.execute("DELETE FROM sessions WHERE pid = ? AND n <= 0", (self._pid,))


def _open_limits(path: str) -> sqlite3.Connection:
    """The shared counts file (created if new). Autocommit mode; `with` blocks are transactions."""
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")  # counts of live sessions: nothing to keep across a crash
    db.execute("CREATE TABLE IF NOT EXISTS sessions (pid INTEGER, kind TEXT, name TEXT, n INTEGER,"
               " PRIMARY KEY (pid, kind, name))")
    return db


def forget_worker(path: str, pid: int) -> None:
    """A worker died: the sessions it counted are gone with it."""
    db = _open_limits(path)
    try:
        with db:
            db.execute("DELETE FROM sessions WHERE pid = ?", (pid,))
    finally:
        db.close()


def _decrement(counts: dict[str, int], name: str) -> None:
    left = counts[name] - 1
    if left:
        counts[name] = left
    else:
        del counts[name]


# --------------------------------------------------------------------------------------------
# Client address


def peer_ip(transport) -> str | None:
    """The TCP peer address of a picows `WSTransport` (None if the socket is already gone)."""
    peer = transport.underlying_transport.get_extra_info("peername")
    return peer[0] if peer else None


def forwarded_address(hop: str) -> str | None:
    """The IP address in one ``X-Forwarded-For`` entry, normalised, or None if it is not one.

    Proxies write ``203.0.113.9``, ``203.0.113.9:5555``, ``2001:db8::1``, ``[2001:db8::1]`` or
    ``[2001:db8::1]:443``. A port is dropped only where it cannot be part of the address: after
    an IPv4 address (one colon) or after a bracketed IPv6 one; a bare IPv6 address keeps every
    colon. Anything else (``unknown``, a host name, an obfuscated ``_id``) is None.
    """
    hop = hop.strip()
    if hop.startswith("["):  # [v6] or [v6]:port
        address, bracket, rest = hop[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and _is_port(rest[1:]))):
            return None
    elif hop.count(":") == 1:  # v4:port (an IPv6 address has at least two colons)
        address, _, port = hop.partition(":")
        if not _is_port(port):
            return None
    else:
        address = hop
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if hop.startswith("[") and ip.version != 6:
        return None
    return str(ip)


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535


#: IPv6 clients are counted per /64: one host, or one home or office network, is routinely
#: given a whole /64 and can take a fresh address in it for every connection
IPV6_LIMIT_PREFIX = 64


def limit_address(ip: str | None) -> str | None:
    """The key per-IP limits count `ip` under: an IPv4 address as it is, an IPv4-mapped IPv6
    address (``::ffff:203.0.113.9``, how a dual-stack socket shows an IPv4 peer) as that IPv4
    address, and any other IPv6 address as its /64 (``2001:db8:0:1::/64``)."""
    if ip is None:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # not an address (a Unix socket's peer): counted as written
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/{IPV6_LIMIT_PREFIX}", strict=False))


def client_ip(peer: str | None, headers: "CIMultiDict[str] | None" = None,
              trusted_proxies: Iterable[str] = ()) -> str | None:
    """The address to count per-IP limits against.

    ``X-Forwarded-For`` is honoured only when the TCP peer is one of `trusted_proxies` (addresses or
    CIDR networks); then the right-most entry that is not itself a trusted proxy is the client
    (entries may carry a port or IPv6 brackets: `forwarded_address`).
    Without trusted proxies the header is ignored: anyone can write it (WaaV B16).
    """
    networks = [ipaddress.ip_network(entry, strict=False) for entry in trusted_proxies]

    def trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    if peer is None or not networks or headers is None or not trusted(peer):
        return peer
    hops = [hop.strip() for value in headers.getall("X-Forwarded-For", ()) for hop in value.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        address = forwarded_address(hop)
        if address is None:
            return peer  # garbage in the header: count against the proxy, do not trust it
        if not trusted(address):
            return address
    return peer
