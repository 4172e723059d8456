"""`NodeConfig`: the one configuration object of a gateway node, from flags with env fallbacks.

Every flag has an environment variable (`GATEWAY_<FLAG>`, e.g. `GATEWAY_PORT`); an explicit flag
wins over the environment, the environment over the default. Provider keys come only from the
environment (`OPENAI_API_KEY`, `AZURE_OPENAI_API_KEY`) and are never printed: `repr()` masks them.
Client credentials likewise come only from the environment (`GATEWAY_API_KEYS`, comma-separated
`key` or `id:key`; `GATEWAY_JWT_SECRET`, an HS256 secret) or from `--api-keys-file`.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import urllib.request
from dataclasses import dataclass, field, fields
from typing import Any, Callable
from urllib.parse import urlsplit

from gateway import tls
from gateway.client_protocol import VOICES, is_model_name

OPENAI_URL = "wss://api.openai.com/v1/realtime"
PROVIDERS = ("mock", "openai", "azure")
DIALECTS = ("ga", "beta")
SLOW_CLIENT_POLICIES = ("drop-oldest", "close")
_SECRET_FIELDS = ("api_key", "client_api_keys", "jwt_secret")
_URL_FIELDS = ("upstream_url", "upstream_proxy")  # shown without userinfo or query: they may hold credentials
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ConfigError(ValueError):
    """The node cannot start with this configuration (message is safe to print)."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Node settings. Units are in the names: `_ms`, `_s`, `_bytes`."""

    host: str = "0.0.0.0"
    port: int = 3001
    tls_cert: str | None = None
    tls_key: str | None = None
    upstream: str = "openai"
    upstream_url: str | None = None
    upstream_dialect: str = "ga"
    upstream_proxy: str | None = None  # http://[user:password@]host:port, resolved (flag, env, or none)
    default_model: str = "gpt-realtime"
    default_voice: str = "alloy"
    connect_timeout_s: float = 10.0
    coalesce_ms: int = 20
    direct_reads: str = "on"
    read_batch_ms: int = 2
    pre_ready_buffer_ms: int = 5000
    max_message_bytes: int = 10 * 1024 * 1024
    level_interval_ms: int = 100
    log_level: str = "INFO"
    log_format: str = "text"
    # operations (SPEC §6): limits, timeouts, drain, workers, client auth
    max_sessions: int = 0
    max_sessions_per_ip: int = 0
    max_sessions_per_key: int = 0
    overload_lag_ms: int = 250
    idle_timeout_s: float = 300.0
    client_ping_interval_s: float = 20.0
    client_ping_timeout_s: float = 20.0
    max_session_s: float = 3600.0
    session_warning_s: float = 60.0
    max_client_queue_ms: int = 5000
    slow_client_policy: str = "drop-oldest"
    drain_timeout_s: float = 30.0
    workers: int = 1
    api_keys_file: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = 30.0
    jwt_max_sessions_claim: str = "max_sessions"
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    client_api_keys: str | None = field(default=None, repr=False)
    jwt_secret: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        # the URL may carry credentials too (userinfo, Azure's ?api-key=): host and path only
        shown = ", ".join(f"{f.name}={_shown_url(getattr(self, f.name)) if f.name in _URL_FIELDS else getattr(self, f.name)!r}"
                          for f in fields(self) if f.name not in _SECRET_FIELDS)
        masked = ", ".join(f"{name}={'***' if getattr(self, name) else None}" for name in _SECRET_FIELDS)
        return f"NodeConfig({shown}, {masked})"

    @property
    def auth_headers(self) -> list[tuple[str, str]]:
        """Upstream auth header for the provider. Never log the result."""
        if self.upstream == "azure":
            return [("api-key", self.api_key or "")]
        return [("Authorization", f"Bearer {self.api_key or ''}")]


# (flag, dest, env, type, default, help). One row per tunable; --help and env docs come from here.
_FLAGS: list[tuple[str, str, str, Callable[[str], Any], Any, str]] = [
    ("--host", "host", "GATEWAY_HOST", str, "0.0.0.0", "interface to listen on"),
    ("--port", "port", "GATEWAY_PORT", int, 3001, "TCP port for /realtime and /health"),
    ("--tls-cert", "tls_cert", "GATEWAY_TLS_CERT", str, None,
     "serve wss:// (and https:// for /health, /ready, /metrics) with this PEM certificate chain, "
     "leaf first; SIGHUP re-reads it and --tls-key for new connections (default: plain ws://, for "
     "a node behind a TLS-terminating load balancer)"),
    ("--tls-key", "tls_key", "GATEWAY_TLS_KEY", str, None,
     "the unencrypted PEM private key of --tls-cert (default: the key in --tls-cert's file)"),
    ("--upstream", "upstream", "GATEWAY_UPSTREAM", str, "openai",
     "upstream provider: mock (built-in mock, in-process, no key), openai (needs OPENAI_API_KEY), "
     "azure (needs AZURE_OPENAI_API_KEY and --upstream-url)"),
    ("--upstream-url", "upstream_url", "GATEWAY_UPSTREAM_URL", str, None,
     "upstream WebSocket URL (default: wss://api.openai.com/v1/realtime for openai; required for azure)"),
    ("--upstream-dialect", "upstream_dialect", "GATEWAY_UPSTREAM_DIALECT", str, "ga",
     "upstream protocol shape: ga (current OpenAI) or beta (OpenAI-Beta: realtime=v1, Azure preview)"),
    ("--upstream-proxy", "upstream_proxy", "GATEWAY_UPSTREAM_PROXY", str, None,
     "HTTP proxy the upstream connections tunnel through (CONNECT), http://[user:password@]host:port; "
     "none: no proxy. Unset: https_proxy / HTTPS_PROXY for a wss:// upstream, http_proxy / HTTP_PROXY "
     "for ws://, minus no_proxy / NO_PROXY, as curl reads them; a loopback upstream never goes through them"),
    ("--default-model", "default_model", "GATEWAY_DEFAULT_MODEL", str, "gpt-realtime",
     "model when the client names none (?model= or config.model)"),
    ("--default-voice", "default_voice", "GATEWAY_DEFAULT_VOICE", str, "alloy",
     "voice when the client names none"),
    ("--connect-timeout", "connect_timeout_s", "GATEWAY_CONNECT_TIMEOUT", float, 10.0,
     "seconds to open the upstream session (TCP + TLS + WebSocket handshake + session.created)"),
    ("--coalesce-ms", "coalesce_ms", "GATEWAY_COALESCE_MS", int, 20,
     "merge client audio into upstream appends of this many ms; also the longest audio waits"),
    ("--direct-reads", "direct_reads", "GATEWAY_DIRECT_READS", str, "on",
     "on: once a session's audio flows, the compiled fast path reads its plain-TCP sockets itself "
     "(one epoll set per worker) instead of through uvloop and picows; off: always through them"),
    ("--read-batch-ms", "read_batch_ms", "GATEWAY_READ_BATCH_MS", int, 2,
     "with direct reads: while frames keep arriving, read the flowing sessions' sockets once per "
     "this many ms, by timer (fewer wake-ups: less CPU; a frame may wait up to this long); 0: "
     "read on every wake-up. A read that finds nothing ends the pacing: a lone frame is read at once"),
    ("--pre-ready-buffer-ms", "pre_ready_buffer_ms", "GATEWAY_PRE_READY_BUFFER_MS", int, 5000,
     "audio (ms) buffered per session before `ready`; beyond it the client gets an error"),
    ("--max-message-bytes", "max_message_bytes", "GATEWAY_MAX_MESSAGE_BYTES", int, 10 * 1024 * 1024,
     "largest client message (bytes, after reassembly); larger closes with 1009"),
    ("--level-interval-ms", "level_interval_ms", "GATEWAY_LEVEL_INTERVAL_MS", int, 100,
     "minimum interval between `level` events for clients that asked for them"),
    ("--log-level", "log_level", "GATEWAY_LOG_LEVEL", str.upper, "INFO", "DEBUG, INFO, WARNING, ERROR (any case)"),
    ("--log-format", "log_format", "GATEWAY_LOG_FORMAT", str, "text", "text or json"),
    ("--max-sessions", "max_sessions", "GATEWAY_MAX_SESSIONS", int, 0,
     "concurrent sessions on this node (all workers together); more are refused with HTTP 503 "
     "(0 = no limit)"),
    ("--max-sessions-per-ip", "max_sessions_per_ip", "GATEWAY_MAX_SESSIONS_PER_IP", int, 0,
     "concurrent sessions per client address; more get an Overloaded error and close 1013 "
     "once connected (0 = no limit)"),
    ("--max-sessions-per-key", "max_sessions_per_key", "GATEWAY_MAX_SESSIONS_PER_KEY", int, 0,
     "concurrent sessions per client key / token subject; more get HTTP 429 (0 = no limit; "
     "a JWT's max_sessions claim overrides it)"),
    ("--overload-lag-ms", "overload_lag_ms", "GATEWAY_OVERLOAD_LAG_MS", int, 250,
     "while the event loop runs this many ms late or more (two once-a-second checks in a row: more "
     "sessions than the CPU carries), /ready answers 503 and new upgrades get 503 Overloaded; "
     "admitted sessions go on (0 = never)"),
    ("--idle-timeout-s", "idle_timeout_s", "GATEWAY_IDLE_TIMEOUT_S", float, 300.0,
     "close a session after this long with no audio or message in either direction (pings do not "
     "count; 0 = never)"),
    ("--client-ping-interval-s", "client_ping_interval_s", "GATEWAY_CLIENT_PING_INTERVAL_S", float, 20.0,
     "ping a client that has sent nothing (no audio, message, ping or pong, nor a piece of one) for "
     "this long: a client that vanished without closing (a dropped network, a sleeping laptop) is "
     "found, and idle clients keep NAT and load-balancer mappings alive (0 = never)"),
    ("--client-ping-timeout-s", "client_ping_timeout_s", "GATEWAY_CLIENT_PING_TIMEOUT_S", float, 20.0,
     "a pinged client that sends nothing more for this long is gone: ClientUnresponsive, close 4005"),
    ("--max-session-s", "max_session_s", "GATEWAY_MAX_SESSION_S", float, 3600.0,
     "longest session; clients get a `closing` warning --session-warning-s before (0 = no limit)"),
    ("--session-warning-s", "session_warning_s", "GATEWAY_SESSION_WARNING_S", float, 60.0,
     "how long before --max-session-s the `closing` warning is sent"),
    ("--max-client-queue-ms", "max_client_queue_ms", "GATEWAY_MAX_CLIENT_QUEUE_MS", int, 5000,
     "reply audio (ms) held for a client that is not reading; beyond it --slow-client-policy applies"),
    ("--slow-client-policy", "slow_client_policy", "GATEWAY_SLOW_CLIENT_POLICY", str, "drop-oldest",
     "drop-oldest (discard the oldest queued audio, counted in gateway_drops_total) or close (code 4004)"),
    ("--drain-timeout-s", "drain_timeout_s", "GATEWAY_DRAIN_TIMEOUT_S", float, 30.0,
     "on SIGTERM: stop accepting, send `closing`, let sessions finish this long, then close them (1001)"),
    ("--workers", "workers", "GATEWAY_WORKERS", int, 1,
     "worker processes sharing the port (SO_REUSEPORT; more than 1 needs a port number, not 0); "
     "a dead worker is replaced"),
    ("--api-keys-file", "api_keys_file", "GATEWAY_API_KEYS_FILE", str, None,
     "client API keys, one `key` or `id:key` (split at the first ':'; keys of 16+ characters) per line, "
     "blank and '#' lines skipped (a key starting with '#' needs an id); "
     "with this, GATEWAY_API_KEYS or "
     "GATEWAY_JWT_SECRET set, clients must authenticate (Bearer header, ?token= or subprotocol); "
     "SIGHUP re-reads the file"),
    ("--jwt-audience", "jwt_audience", "GATEWAY_JWT_AUDIENCE", str, None, "required `aud` of client JWTs"),
    ("--jwt-issuer", "jwt_issuer", "GATEWAY_JWT_ISSUER", str, None, "required `iss` of client JWTs"),
    ("--jwt-leeway-s", "jwt_leeway_s", "GATEWAY_JWT_LEEWAY_S", float, 30.0,
     "clock skew (s) allowed when checking a client JWT's exp, nbf and iat against this node's clock"),
    ("--jwt-max-sessions-claim", "jwt_max_sessions_claim", "GATEWAY_JWT_MAX_SESSIONS_CLAIM", str, "max_sessions",
     "the client JWT claim (a positive integer) that overrides --max-sessions-per-key for its token, "
     "for identity providers that must namespace custom claims"),
    ("--allowed-origins", "allowed_origins", "GATEWAY_ALLOWED_ORIGINS", str, None,
     "comma-separated browser origins allowed to connect (`https://app.example.com`, "
     "`https://*.example.com`); requests without Origin are not affected (default: any origin)"),
    ("--trusted-proxies", "trusted_proxies", "GATEWAY_TRUSTED_PROXIES", str, None,
     "comma-separated proxy addresses/CIDRs whose X-Forwarded-For is believed for per-IP limits"),
]
_LISTS = ("allowed_origins", "trusted_proxies")
_CHOICES = {"upstream": PROVIDERS, "upstream_dialect": DIALECTS, "log_format": ("text", "json"),
            "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"), "slow_client_policy": SLOW_CLIENT_POLICIES,
            "direct_reads": ("on", "off")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every node flag; defaults are None so `from_args` can apply env fallbacks."""
    for flag, dest, env, type_, default, help_ in _FLAGS:
        parser.add_argument(flag, dest=dest, type=type_, default=None, choices=_CHOICES.get(dest),
                            help=f"{help_} [env {env}; default {default}]")


def from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> NodeConfig:
    """Build and validate the config: flag, else env var, else default. Raises ConfigError."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for _flag, dest, env_name, type_, default, _help in _FLAGS:
        value = getattr(args, dest, None)
        if value is None and env.get(env_name):
            try:
                value = type_(env[env_name])
            except ValueError as exc:
                raise ConfigError(f"{env_name}: {exc}") from None
        values[dest] = default if value is None else value
    for dest in _LISTS:
        raw = values[dest]
        values[dest] = tuple(part.strip() for part in raw.split(",") if part.strip()) if raw else ()
    for dest, choices in _CHOICES.items():
        if values[dest] not in choices:
            raise ConfigError(f"{_setting(dest)} must be one of {', '.join(choices)} (got {values[dest]!r})")
    provider = values["upstream"]
    if provider == "openai":
        values["api_key"] = env.get("OPENAI_API_KEY") or None
        if not values["api_key"]:
            raise ConfigError("--upstream openai needs OPENAI_API_KEY in the environment "
                              "(or run `realtime-gateway --upstream mock` to try it without a key)")
        values["upstream_url"] = values["upstream_url"] or OPENAI_URL
    elif provider == "azure":
        values["api_key"] = env.get("AZURE_OPENAI_API_KEY") or None
        if not values["api_key"]:
            raise ConfigError("--upstream azure needs AZURE_OPENAI_API_KEY in the environment")
        if not values["upstream_url"]:
            raise ConfigError("--upstream azure needs --upstream-url (the deployment's wss:// URL)")
    else:  # mock: the node starts it and fills in the URL; any non-empty key is accepted
        values["api_key"] = env.get("OPENAI_API_KEY") or "mock-key"
    for dest, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_setting(dest)} must be a finite number (got {value})")
    if not 0 <= values["port"] <= 65535:
        raise ConfigError(f"{_setting('port')} must be 0-65535 (got {values['port']})")
    for dest in ("coalesce_ms", "pre_ready_buffer_ms", "max_message_bytes", "level_interval_ms"):
        if values[dest] < 1:
            raise ConfigError(f"{_setting(dest)} must be positive (got {values[dest]})")
    if values["connect_timeout_s"] <= 0:
        raise ConfigError(f"{_setting('connect_timeout_s')} must be positive (got {values['connect_timeout_s']})")
    for dest in ("max_sessions", "max_sessions_per_ip", "max_sessions_per_key", "idle_timeout_s",
                 "client_ping_interval_s",
                 "max_session_s", "session_warning_s", "drain_timeout_s", "max_client_queue_ms",
                 "read_batch_ms", "jwt_leeway_s", "overload_lag_ms"):
        if values[dest] < 0:
            raise ConfigError(f"{_setting(dest)} must not be negative (got {values[dest]})")
    if values["tls_key"] and not values["tls_cert"]:
        raise ConfigError(f"{_setting('tls_key')} needs {_setting('tls_cert')}")
    if values["tls_cert"]:
        try:
            tls.server_context(values["tls_cert"], values["tls_key"])
        except tls.TLSFilesError as exc:  # named by the flag of the file at fault
            at_fault = "tls_key" if values["tls_key"] and exc.path == values["tls_key"] else "tls_cert"
            raise ConfigError(f"{_setting(at_fault)}: {exc}") from None
    if values["client_ping_interval_s"] and values["client_ping_timeout_s"] <= 0:
        raise ConfigError(f"{_setting('client_ping_timeout_s')} must be positive while "
                          f"{_setting('client_ping_interval_s')} is on (got {values['client_ping_timeout_s']})")
    if values["workers"] < 1:
        raise ConfigError(f"{_setting('workers')} must be at least 1 (got {values['workers']})")
    if not values["jwt_max_sessions_claim"].strip():
        raise ConfigError(f"{_setting('jwt_max_sessions_claim')} must name a claim (got an empty value)")
    if values["port"] == 0 and values["workers"] > 1:
        # each worker would bind a random port of its own: N nodes instead of one on N processes
        raise ConfigError(f"{_setting('port')} 0 (a random port) cannot be shared by {_setting('workers')} "
                          f"{values['workers']}: give a port number")
    # defaults every session would be refused with: the rules a client's own `config` gets
    if values["default_voice"] not in VOICES:
        raise ConfigError(f"{_setting('default_voice')}: {values['default_voice']!r} is not a realtime voice "
                          f"(one of {', '.join(VOICES)})")
    if not is_model_name(values["default_model"]):
        raise ConfigError(f"{_setting('default_model')} must be a non-empty model name (printable, at most "
                          f"128 characters; got {values['default_model'][:40]!r})")
    if values["upstream_url"]:
        problem = _upstream_url_problem(values["upstream_url"])
        if problem:
            raise ConfigError(f"{_setting('upstream_url')} must be a ws:// or wss:// URL with a host ({problem})")
    values["upstream_proxy"] = _upstream_proxy(values["upstream_proxy"], values["upstream_url"], env)
    for entry in values["trusted_proxies"]:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"{_setting('trusted_proxies')}: {entry!r} is not an IP address or network") from None
    values["client_api_keys"] = env.get("GATEWAY_API_KEYS") or None
    values["jwt_secret"] = env.get("GATEWAY_JWT_SECRET") or None
    return NodeConfig(**values)


def _setting(dest: str) -> str:
    """`--flag (GATEWAY_FLAG)`: how an error names a setting that may have come from either."""
    flag, env_name = next((flag, env_name) for flag, dest_, env_name, *_ in _FLAGS if dest_ == dest)
    return f"{flag} ({env_name})"


def _upstream_url_problem(url: str) -> str | None:
    """What stops every upstream connect to `url` (picows' own URL rules), or None. Never quotes
    the URL: its query may hold a key."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        return f"got {parts.scheme}://" if parts.scheme else "got no scheme"
    if not parts.hostname:
        return "got no host"
    if not _is_host_name(parts.hostname):
        return "got a host with characters no host name has"
    if parts.fragment:
        return "got a #fragment"
    try:
        parts.port
    except ValueError:
        return "got an invalid port"
    return None


def _upstream_proxy(given: str | None, upstream_url: str | None, env) -> str | None:
    """The proxy upstream connections go through: the setting ("none": none), else the standard
    variable for the upstream's scheme unless no_proxy lists its host. Raises ConfigError for a
    proxy the gateway cannot use, naming where it came from (never quoting it: credentials)."""
    if given is not None:
        proxy, source = (None if given.strip().lower() in ("", "none") else given), _setting("upstream_proxy")
    else:
        proxy, source = _environment_proxy(upstream_url, env)
    if proxy is not None:
        problem = _proxy_url_problem(proxy)
        if problem:
            unless = f"; {_setting('upstream_proxy').split()[0]} none ignores it" if given is None else ""
            raise ConfigError(f"{source} must be an http:// proxy URL with a host ({problem}){unless}")
    return proxy


def _environment_proxy(upstream_url: str | None, env) -> tuple[str | None, str]:
    """(proxy, variable it came from) per the conventions curl and most HTTP clients follow;
    a loopback upstream (the embedded mock: no URL yet) is never proxied by them (Go's rule),
    so a proxy set for the rest of a machine cannot reroute a local upstream."""
    parts = urlsplit(upstream_url or "ws://127.0.0.1")
    if _is_loopback(parts.hostname or ""):
        return None, ""
    name = "https_proxy" if parts.scheme == "wss" else "http_proxy"
    source = name if env.get(name) else name.upper()
    proxy = env.get(source) or None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    if proxy and no_proxy and urllib.request.proxy_bypass_environment(parts.hostname or "", {"no": no_proxy}):
        return None, ""
    return proxy, source


def _is_host_name(host: str) -> bool:
    """A DNS name (letters, digits, `-`, `_`, dots) or an IP address: what a connect can resolve.
    urlsplit takes anything between `//` and the port, a space or a control character included."""
    if _HOST_NAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _proxy_url_problem(url: str) -> str | None:
    """What stops a CONNECT tunnel through `url`, or None. Never quotes the URL."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return f"got {parts.scheme}:// (only http:// proxies are supported)" if parts.scheme else "got no scheme"
    if not parts.hostname:
        return "got no host"
    if not _is_host_name(parts.hostname):
        return "got a host with characters no host name has"
    try:
        parts.port
    except ValueError:
        return "got an invalid port"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "got a path, query or fragment"
    return None


def safe_location(url: str) -> str:
    """host[:port]/path of the URL, without query (may hold keys for Azure browsers) or userinfo."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path}"


def _shown_url(url: str | None) -> str | None:
    if not url:
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{safe_location(url)}" + ("?…" if parts.query else "")
