"""`realtime-gateway mock`: run the mock OpenAI Realtime server standalone.

    realtime-gateway mock --host 127.0.0.1 --port 3002 --echo-mode stream --delta-ms 100
    realtime-gateway mock --tls-cert cert.pem --tls-key key.pem     # wss://, as OpenAI

Every `MockOptions` knob is a flag. Runs on uvloop until SIGINT/SIGTERM. Standalone, nobody can
read the sessions' event records, so recording is off unless `--record` is given.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import signal
import ssl
import sys

import uvloop

from gateway import sockets

from .options import MockOptions
from .server import MockRealtimeServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=3002, help="port to bind (0 = any free port)")
    parser.add_argument("--api-key", dest="api_keys", action="append", default=None,
                        metavar="KEY", help="accepted API key (repeatable); default: any non-empty key")
    parser.add_argument("--bad-key", choices=["ws_error", "http_401"], default="ws_error",
                        help="bad/missing key: error event + close 3000, or HTTP 401 at the upgrade")
    parser.add_argument("--beta", choices=["serve", "reject"], default="reject",
                        help="beta-shaped clients (OpenAI-Beta: realtime=v1): speak beta, or reject "
                             "with beta_api_shape_disabled + close 4000 (OpenAI since 2026)")
    parser.add_argument("--handshake-delay-s", type=float, default=0.0,
                        help="hold each new connection this long before the HTTP upgrade")
    parser.add_argument("--pacing", choices=["fast", "realtime"], default="fast",
                        help="response audio as fast as possible, or each delta spaced by its duration")
    parser.add_argument("--delta-ms", type=int, default=100,
                        help="audio per response.output_audio.delta, in ms")
    parser.add_argument("--echo-mode", choices=["turn", "stream"], default="turn",
                        help="echo each committed turn in a response, or echo every appended byte "
                             "continuously (relay benchmarks; no VAD)")
    parser.add_argument("--transcription-delay-ms", type=int, default=0,
                        help="start each turn's input transcription this long after its commit "
                             "(the real server's may land after the response)")
    parser.add_argument("--text-tone-hz", type=float, default=440.0,
                        help="frequency of the tone spoken in reply to a text turn")
    parser.add_argument("--reply-item-ms", type=int, default=0,
                        help="split spoken replies into assistant items of at most this much audio "
                             "(the real server splits long replies); 0 = one item")
    parser.add_argument("--function-trigger", choices=["name_in_text", "none"], default="name_in_text",
                        help="a text turn naming a configured tool is answered by a call to it")
    parser.add_argument("--function-every-n-audio-turns", type=int, default=0,
                        help="with tools configured, every Nth audio turn is answered by a function call")
    parser.add_argument("--fail-responses", choices=["rate_limit_exceeded", "server_error", "model_not_found",
                                                         "insufficient_quota"],
                        default=None, help="make responses end as failed response.done with this error")
    parser.add_argument("--fail-every-n", type=int, default=1,
                        help="with --fail-responses: every Nth response fails (1 = all)")
    parser.add_argument("--close-after-s", type=float, default=None,
                        help="drop each connection this many seconds after it was accepted")
    parser.add_argument("--close-after-events", type=int, default=None,
                        help="drop each connection after it has sent this many server events")
    parser.add_argument("--close-with-frame", action="store_true",
                        help="--close-after-* sends close 1011 instead of dropping the TCP connection")
    parser.add_argument("--session-max-s", type=float, default=None,
                        help="session lifetime: then session_expired error and close 1001 "
                             "(default: the dialect's, 3600 s GA, 1800 s beta)")
    parser.add_argument("--slow-read-s", type=float, default=0.0,
                        help="after each client frame stop reading the socket for this long")
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="serve wss:// with this certificate chain (with --tls-key), as OpenAI does")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--record", action="store_true",
                        help="keep every event in memory (only useful in-process)")


def options_from_args(args: argparse.Namespace) -> MockOptions:
    return MockOptions(
        api_keys=set(args.api_keys) if args.api_keys else None,
        bad_key=args.bad_key, beta=args.beta, handshake_delay_s=args.handshake_delay_s,
        pacing=args.pacing, delta_ms=args.delta_ms, echo_mode=args.echo_mode,
        text_tone_hz=args.text_tone_hz, transcription_delay_ms=args.transcription_delay_ms,
        reply_item_ms=args.reply_item_ms,
        function_trigger=args.function_trigger,
        function_every_n_audio_turns=args.function_every_n_audio_turns,
        fail_responses=args.fail_responses, fail_every_n=args.fail_every_n,
        close_after_s=args.close_after_s, close_after_events=args.close_after_events,
        close_with_frame=args.close_with_frame, session_max_s=args.session_max_s,
        slow_read_s=args.slow_read_s, record=args.record)


def tls_from_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server context for --tls-cert/--tls-key, or None; ValueError names what is wrong."""
    if args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load --tls-cert/--tls-key: {exc.strerror or exc.reason or exc}") from None
    return context


async def serve(options: MockOptions, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
    """Run a mock server until SIGINT/SIGTERM."""
    server = MockRealtimeServer(options)
    await server.start(host, port, tls=tls)
    print(f"mock OpenAI Realtime server listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def run(args: argparse.Namespace) -> int:
    """One line on stderr and exit code 2 for options that cannot work, as the node does."""
    try:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be 0-65535, got {args.port}")
        options = options_from_args(args)
        tls = tls_from_args(args)
    except ValueError as exc:
        # MockOptions names its fields (delta_ms); here they are flags (--delta-ms)
        message = re.sub(r"^([a-z]+(?:_[a-z0-9]+)+)\b", lambda m: "--" + m.group(1).replace("_", "-"), str(exc))
        print(f"realtime-gateway mock: {message}", file=sys.stderr)
        return 2
    sockets.raise_open_files_limit()  # a load test's thousands of sessions: one socket each
    try:
        uvloop.run(serve(options, args.host, args.port, tls))
    except OSError as exc:  # the port is taken, the host does not resolve
        print(f"realtime-gateway mock: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    return 0
