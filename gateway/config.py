"""`NodeConfig`: the one configuration object of a gateway node, from flags with env fallbacks.

Every flag has an environment variable (`GATEWAY_<FLAG>`, e.g. `GATEWAY_PORT`); an explicit flag
wins over the environment, the environment over the default. Provider keys come only from the
environment (`OPENAI_API_KEY`, `AZURE_OPENAI_API_KEY`) and are never printed: `repr()` masks them.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable

OPENAI_URL = "wss://api.openai.com/v1/realtime"
PROVIDERS = ("mock", "openai", "azure")
DIALECTS = ("ga", "beta")


class ConfigError(ValueError):
    """The node cannot start with this configuration (message is safe to print)."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Node settings. Units are in the names: `_ms`, `_s`, `_bytes`."""

    host: str = "0.0.0.0"
    port: int = 3001
    upstream: str = "openai"
    upstream_url: str | None = None
    upstream_dialect: str = "ga"
    default_model: str = "gpt-realtime"
    default_voice: str = "alloy"
    connect_timeout_s: float = 10.0
    coalesce_ms: int = 20
    pre_ready_buffer_ms: int = 5000
    max_message_bytes: int = 10 * 1024 * 1024
    level_interval_ms: int = 100
    log_level: str = "INFO"
    log_format: str = "text"
    api_key: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "api_key")
        return f"NodeConfig({shown}, api_key={'***' if self.api_key else None})"

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
    ("--upstream", "upstream", "GATEWAY_UPSTREAM", str, "openai",
     "upstream provider: mock (built-in mock, in-process, no key), openai (needs OPENAI_API_KEY), "
     "azure (needs AZURE_OPENAI_API_KEY and --upstream-url)"),
    ("--upstream-url", "upstream_url", "GATEWAY_UPSTREAM_URL", str, None,
     "upstream WebSocket URL (default: wss://api.openai.com/v1/realtime for openai; required for azure)"),
    ("--upstream-dialect", "upstream_dialect", "GATEWAY_UPSTREAM_DIALECT", str, "ga",
     "upstream protocol shape: ga (current OpenAI) or beta (OpenAI-Beta: realtime=v1, Azure preview)"),
    ("--default-model", "default_model", "GATEWAY_DEFAULT_MODEL", str, "gpt-realtime",
     "model when the client names none (?model= or config.model)"),
    ("--default-voice", "default_voice", "GATEWAY_DEFAULT_VOICE", str, "alloy",
     "voice when the client names none"),
    ("--connect-timeout", "connect_timeout_s", "GATEWAY_CONNECT_TIMEOUT", float, 10.0,
     "seconds to open the upstream session (TCP + TLS + WebSocket handshake + session.created)"),
    ("--coalesce-ms", "coalesce_ms", "GATEWAY_COALESCE_MS", int, 20,
     "merge client audio into upstream appends of this many ms; also the longest audio waits"),
    ("--pre-ready-buffer-ms", "pre_ready_buffer_ms", "GATEWAY_PRE_READY_BUFFER_MS", int, 5000,
     "audio (ms) buffered per session before `ready`; beyond it the client gets an error"),
    ("--max-message-bytes", "max_message_bytes", "GATEWAY_MAX_MESSAGE_BYTES", int, 10 * 1024 * 1024,
     "largest client message (bytes, after reassembly); larger closes with 1009"),
    ("--level-interval-ms", "level_interval_ms", "GATEWAY_LEVEL_INTERVAL_MS", int, 100,
     "minimum interval between `level` events for clients that asked for them"),
    ("--log-level", "log_level", "GATEWAY_LOG_LEVEL", str, "INFO", "DEBUG, INFO, WARNING, ERROR"),
    ("--log-format", "log_format", "GATEWAY_LOG_FORMAT", str, "text", "text or json"),
]
_CHOICES = {"upstream": PROVIDERS, "upstream_dialect": DIALECTS, "log_format": ("text", "json"),
            "log_level": ("DEBUG", "INFO", "WARNING", "ERROR")}


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
    for dest, choices in _CHOICES.items():
        if values[dest] not in choices:
            raise ConfigError(f"{dest} must be one of {', '.join(choices)} (got {values[dest]!r})")
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
    for dest in ("port", "coalesce_ms", "pre_ready_buffer_ms", "max_message_bytes", "level_interval_ms"):
        if values[dest] < (0 if dest == "port" else 1):
            raise ConfigError(f"{dest} must be positive (got {values[dest]})")
    if values["connect_timeout_s"] <= 0:
        raise ConfigError("connect timeout must be positive")
    return NodeConfig(**values)
