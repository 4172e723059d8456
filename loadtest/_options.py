"""The load test's own options: Locust custom arguments, each with an environment-variable twin.

They appear in the web UI's "Custom parameters" (Locust's `--help` does not list a
locustfile's own options). In a distributed run the master sends its values to every worker.
`LoadSettings.from_options` turns the parsed options into one immutable object per process.
"""
from __future__ import annotations

import dataclasses
import os
import urllib.parse
from typing import Any

DEFAULT_HOST = "ws://127.0.0.1:3001"
ENDPOINT_PATH = "/realtime"


def add_arguments(parser: Any) -> None:
    """Register the custom arguments on Locust's (configargparse) parser."""
    # Locust's own add_argument (an argument group's would not) knows is_secret / include_in_web_ui.
    parser.add_argument(
        "--gateway-url", env_var="LOADTEST_GATEWAY_URL", default="",
        help="full WebSocket URL of the endpoint, e.g. ws://10.0.0.5:3001/realtime?model=gpt-realtime; "
        "default: --host plus /realtime",
    )
    parser.add_argument(
        "--token", env_var="LOADTEST_TOKEN", default="", is_secret=True,
        help="client token for a gateway with auth enabled (sent as configured by --token-in)",
    )
    parser.add_argument(
        "--token-in", env_var="LOADTEST_TOKEN_IN", choices=("header", "query"), default="header",
        help="how --token is sent: 'Authorization: Bearer <token>' header or ?token= in the URL",
    )
    parser.add_argument(
        "--clip", env_var="LOADTEST_CLIP", default="generated",
        help="what users say: 'generated' (a deterministic speech-like clip of tone bursts) "
        "or a 16-bit mono 24 kHz WAV file of one utterance (silence around it is cut; a pause "
        "inside it that would end the VAD turn is refused)",
    )
    parser.add_argument(
        "--turns", env_var="LOADTEST_TURNS", type=int, default=5,
        help="turns per session: after this many, a user closes its session and opens a new one "
        "(0 = one session for the user's whole life)",
    )
    parser.add_argument(
        "--chunk-ms", env_var="LOADTEST_CHUNK_MS", type=int, default=20,
        help="audio frame size in ms, sent in real time (20 = 960-byte frames, 50 per second)",
    )
    parser.add_argument(
        "--pause-ms", env_var="LOADTEST_PAUSE_MS", type=int, default=500,
        help="pause between a reply and the user's next turn (VAD users keep streaming silence meanwhile)",
    )
    parser.add_argument(
        "--barge-in-after-ms", env_var="LOADTEST_BARGE_IN_AFTER_MS", type=int, default=300,
        help="barge-in users start talking this long after the first reply audio arrived "
        "(in the frame the microphone is capturing, sent when it ends: up to --chunk-ms later)",
    )
    parser.add_argument(
        "--reply-timeout", env_var="LOADTEST_REPLY_TIMEOUT", type=float, default=20.0,
        help="seconds to wait for ready, speech events and a complete reply before counting a failure",
    )
    parser.add_argument(
        "--model", env_var="LOADTEST_MODEL", default="",
        help="model requested in the config message (default: the gateway's default model)",
    )


@dataclasses.dataclass(frozen=True)
class LoadSettings:
    """Everything a voice user needs to know, resolved once per process."""

    url: str
    token: str
    token_in: str
    clip: str
    turns: int
    chunk_ms: int
    pause_ms: int
    barge_in_after_ms: int
    reply_timeout_s: float
    model: str

    @classmethod
    def from_options(cls, options: Any, host: str | None) -> "LoadSettings":
        """Build from Locust's parsed options (None when Locust runs as a library: env + defaults)."""

        def pick(name: str, env: str, default: Any, kind: type = str) -> Any:
            if options is not None and hasattr(options, name):
                return kind(getattr(options, name))
            return kind(os.environ.get(env, default))

        settings = cls(
            url=pick("gateway_url", "LOADTEST_GATEWAY_URL", "") or endpoint_url(host or DEFAULT_HOST),
            token=pick("token", "LOADTEST_TOKEN", ""),
            token_in=pick("token_in", "LOADTEST_TOKEN_IN", "header"),
            clip=pick("clip", "LOADTEST_CLIP", "generated"),
            turns=pick("turns", "LOADTEST_TURNS", 5, int),
            chunk_ms=pick("chunk_ms", "LOADTEST_CHUNK_MS", 20, int),
            pause_ms=pick("pause_ms", "LOADTEST_PAUSE_MS", 500, int),
            barge_in_after_ms=pick("barge_in_after_ms", "LOADTEST_BARGE_IN_AFTER_MS", 300, int),
            reply_timeout_s=pick("reply_timeout", "LOADTEST_REPLY_TIMEOUT", 20.0, float),
            model=pick("model", "LOADTEST_MODEL", ""),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """ValueError naming the option when a value cannot work (the clip is checked by loading it)."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            # the URL itself is not shown: it may carry a token
            raise ValueError("--gateway-url must be a ws:// or wss:// URL with a host, e.g. ws://h:3001/realtime")
        if self.token_in not in ("header", "query"):
            raise ValueError(f"--token-in must be header or query, got {self.token_in!r}")
        if self.turns < 0:
            raise ValueError(f"--turns must be 0 (never reconnect) or more, got {self.turns}")
        if not 5 <= self.chunk_ms <= 1000:
            raise ValueError(f"--chunk-ms must be within 5..1000, got {self.chunk_ms}")
        if self.pause_ms < 0:
            raise ValueError(f"--pause-ms must be 0 or more, got {self.pause_ms}")
        if self.barge_in_after_ms < 0:
            raise ValueError(f"--barge-in-after-ms must be 0 or more, got {self.barge_in_after_ms}")
        if not 0 < self.reply_timeout_s < float("inf"):  # also refuses nan
            raise ValueError(f"--reply-timeout must be a positive number of seconds, got {self.reply_timeout_s}")

    def connect_url(self) -> str:
        """The URL to dial, with ?token= added when the token goes in the query."""
        if not (self.token and self.token_in == "query"):
            return self.url
        parts = urllib.parse.urlsplit(self.url)
        query = urllib.parse.parse_qsl(parts.query) + [("token", self.token)]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))

    def connect_headers(self) -> list[str]:
        """Extra handshake headers (the bearer token when it goes in a header)."""
        return [f"Authorization: Bearer {self.token}"] if self.token and self.token_in == "header" else []


def endpoint_url(host: str) -> str:
    """The `/realtime` URL for a Locust --host: ws(s)://h:p → ws(s)://h:p/realtime.

    http(s):// is mapped to ws(s)://, a bare "h:p" gets ws://, and a host that already names a
    path (e.g. ws://h:p/realtime?model=x) is used as given.
    """
    if "://" not in host:
        host = "ws://" + host
    parts = urllib.parse.urlsplit(host)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"--host must be a ws://, wss://, http:// or https:// URL, got {host!r}")
    path = parts.path if parts.path not in ("", "/") else ENDPOINT_PATH
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, parts.query, ""))
