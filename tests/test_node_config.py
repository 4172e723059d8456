"""NodeConfig from flags and env, provider key rules, and the `serve` command's refusal/--help."""
from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from gateway import config as node_config
from gateway.cli import build_parser
from gateway.client_protocol import VOICES
from tests.relay_harness import free_port
from gateway.config import ConfigError, NodeConfig


def build(argv: list[str], env: dict[str, str]) -> NodeConfig:
    parser = argparse.ArgumentParser()
    node_config.add_arguments(parser)
    return node_config.from_args(parser.parse_args(argv), env)


def test_defaults_flags_and_env_fallbacks():
    config = build(["--upstream", "mock"], {})
    assert (config.host, config.port, config.default_model, config.coalesce_ms) == ("0.0.0.0", 3001, "gpt-realtime", 20)
    assert (config.pre_ready_buffer_ms, config.level_interval_ms, config.upstream_dialect) == (5000, 100, "ga")
    from_env = build([], {"GATEWAY_UPSTREAM": "mock", "GATEWAY_PORT": "4100", "GATEWAY_UPSTREAM_DIALECT": "beta"})
    assert (from_env.port, from_env.upstream_dialect) == (4100, "beta")
    flag_wins = build(["--port", "4200"], {"GATEWAY_UPSTREAM": "mock", "GATEWAY_PORT": "4100"})
    assert flag_wins.port == 4200
    assert (config.jwt_leeway_s, config.jwt_max_sessions_claim) == (30.0, "max_sessions")
    assert (config.client_ping_interval_s, config.client_ping_timeout_s) == (20.0, 20.0)
    pings_env = build([], {"GATEWAY_UPSTREAM": "mock", "GATEWAY_CLIENT_PING_INTERVAL_S": "0",
                           "GATEWAY_CLIENT_PING_TIMEOUT_S": "0"})  # no pings: the timeout is moot
    assert (pings_env.client_ping_interval_s, pings_env.client_ping_timeout_s) == (0.0, 0.0)
    jwt_env = build([], {"GATEWAY_UPSTREAM": "mock", "GATEWAY_JWT_LEEWAY_S": "0",
                         "GATEWAY_JWT_MAX_SESSIONS_CLAIM": "https://example.com/max_sessions"})
    assert (jwt_env.jwt_leeway_s, jwt_env.jwt_max_sessions_claim) == (0.0, "https://example.com/max_sessions")


def test_the_log_level_is_read_in_any_case():
    assert build(["--upstream", "mock", "--log-level", "warning"], {}).log_level == "WARNING"
    assert build(["--upstream", "mock"], {"GATEWAY_LOG_LEVEL": "Debug"}).log_level == "DEBUG"
    with pytest.raises(SystemExit):  # argparse: not a level in any case
        build(["--upstream", "mock", "--log-level", "loud"], {})


def test_openai_needs_a_key_and_azure_a_url():
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        build(["--upstream", "openai"], {})
    openai = build(["--upstream", "openai"], {"OPENAI_API_KEY": "test-key-1"})
    assert openai.upstream_url == "wss://api.openai.com/v1/realtime" and openai.api_key == "test-key-1"
    assert "test-key-1" not in repr(openai) and "***" in repr(openai)
    with pytest.raises(ConfigError, match="upstream-url"):
        build(["--upstream", "azure"], {"AZURE_OPENAI_API_KEY": "test-key-1"})
    azure = build(["--upstream", "azure", "--upstream-url", "wss://r.example/openai/v1/realtime?model=d"],
                  {"AZURE_OPENAI_API_KEY": "test-key-2"})
    assert azure.auth_headers == [("api-key", "test-key-2")]
    # the start-up log shows the config: a URL with credentials in it shows host and path only
    keyed = build(["--upstream", "azure", "--upstream-url",
                   "wss://user:url-password@r.example/openai/v1/realtime?deployment=d&api-key=url-key"],
                  {"AZURE_OPENAI_API_KEY": "test-key-2"})
    assert "upstream_url='wss://r.example/openai/v1/realtime?…'" in repr(keyed)
    assert "url-password" not in repr(keyed) and "url-key" not in repr(keyed)
    with pytest.raises(ConfigError):
        build(["--upstream", "mock"], {"GATEWAY_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError):
        build(["--upstream", "mock", "--coalesce-ms", "0"], {})


def test_serve_refuses_without_key_and_help_documents_env_vars():
    env = {"PATH": "/usr/bin:/bin"}
    refused = subprocess.run([sys.executable, "-m", "gateway", "--upstream", "openai"], capture_output=True,
                             text=True, timeout=30, env=env)
    assert refused.returncode == 2 and "OPENAI_API_KEY" in refused.stderr
    helped = subprocess.run([sys.executable, "-m", "gateway", "serve", "--help"], capture_output=True, text=True,
                            timeout=30)
    for flag in ("--upstream-dialect", "--connect-timeout", "--coalesce-ms", "--pre-ready-buffer-ms",
                 "GATEWAY_PORT", "GATEWAY_LOG_FORMAT"):
        assert flag in helped.stdout


def test_json_logs_carry_the_session_id_and_never_the_keys():
    import io
    import logging

    from gateway.node import setup_logging
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    setup_logging("INFO", "json")
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)
    try:
        logging.getLogger("gateway.session").info("session %s: ready (model=%s)", "gw_abc", "gpt-realtime")
        entry = orjson.loads(stream.getvalue().splitlines()[-1])
        assert entry["session_id"] == "gw_abc" and entry["message"] == "session gw_abc: ready (model=gpt-realtime)"
        assert entry["level"] == "INFO" and entry["logger"] == "gateway.session"
        assert logging.getLogger("picows").level == logging.WARNING  # raw handshakes never logged
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_text_logs_keep_one_line_per_event_whatever_a_client_put_in_a_message():
    """An upstream error repeats a client's item or call id: a newline in it would start a line
    of the client's own, which a log reader would take for the node's (an audit forged a
    `reloaded 0 client keys` line). Control characters are escaped; a traceback keeps its lines."""
    import io
    import logging

    from gateway.node import setup_logging
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    setup_logging("INFO", "text")
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)
    forged = "x\n2026-11-24 23:00:00,000 WARNING gateway.server: reloaded 0 client keys\r\x1b[2K"
    try:
        logging.getLogger("gateway.session").warning("session %s: upstream error: item '%s' not found",
                                                     "gw_abc", forged)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("gateway.session").exception("session %s: failed\n", "gw_abc")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 6, lines  # the warning, the error, and the traceback's 4 lines
        assert lines[0].endswith("item 'x\\n2026-11-24 23:00:00,000 WARNING gateway.server: reloaded 0 client "
                                 "keys\\r\\x1b[2K' not found")
        assert lines[1].endswith("ERROR gateway.session: session gw_abc: failed\\n")
        assert lines[2] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


@pytest.mark.parametrize("argv, env, message", [
    (["--port", "70000"], {}, r"^--port \(GATEWAY_PORT\) must be 0-65535"),
    (["--drain-timeout-s", "nan"], {}, r"^--drain-timeout-s \(GATEWAY_DRAIN_TIMEOUT_S\) must be a finite number"),
    ([], {"GATEWAY_IDLE_TIMEOUT_S": "inf"}, r"^--idle-timeout-s \(GATEWAY_IDLE_TIMEOUT_S\) must be a finite"),
    (["--trusted-proxies", "10.0.0.0/8,not-an-ip"], {}, r"^--trusted-proxies .*: 'not-an-ip'"),
    (["--default-model", ""], {}, r"^--default-model .* got ''"),   # an empty flag is a value, not unset
    (["--upstream-url", "ws://h:99999/x"], {}, "invalid port"),
    (["--upstream-url", "ws://h/v1/realtime#x"], {}, "fragment"),
    (["--upstream-url", "ws://exa mple.com/v1/realtime"], {}, r"\(got a host with characters no host name has\)"),
    (["--upstream-url", "wss://api\x00.openai.com/v1/realtime"], {}, "a host with characters no host name has"),
    (["--upstream-proxy", "http://pro xy:3128"], {}, r"^--upstream-proxy .* a host with characters"),
    ([], {"GATEWAY_UPSTREAM_DIALECT": "v2"},
     r"^--upstream-dialect \(GATEWAY_UPSTREAM_DIALECT\) must be one of .* \(got 'v2'\)"),
    ([], {"GATEWAY_WORKERS": "0"}, r"^--workers \(GATEWAY_WORKERS\) must be at least 1"),
    ([], {"GATEWAY_CONNECT_TIMEOUT": "0"}, r"^--connect-timeout \(GATEWAY_CONNECT_TIMEOUT\) must be positive"),
    (["--jwt-leeway-s", "-1"], {}, r"^--jwt-leeway-s \(GATEWAY_JWT_LEEWAY_S\) must not be negative"),
    ([], {"GATEWAY_JWT_LEEWAY_S": "inf"}, "GATEWAY_JWT_LEEWAY_S\\) must be a finite number"),
    (["--jwt-max-sessions-claim", ""], {}, r"^--jwt-max-sessions-claim .* must name a claim"),
    (["--client-ping-interval-s", "-5"], {}, r"^--client-ping-interval-s .* must not be negative"),
    ([], {"GATEWAY_CLIENT_PING_TIMEOUT_S": "0"}, r"^--client-ping-timeout-s .* must be positive while "
                                                  r"--client-ping-interval-s .* is on"),
])
def test_settings_a_node_could_not_run_with_are_refused_at_start(argv, env, message):
    """Found by operations audits: a wrapped port, a NaN timeout that crashed the drain, a
    trusted-proxy entry that failed every session at connect, a space in the upstream's host.
    Each refusal names the setting both ways it can be given: flag and environment variable."""
    with pytest.raises(ConfigError, match=message):
        build(["--upstream", "mock", *argv], env)


@pytest.mark.parametrize("flag, env_name, value, message", [
    ("--default-voice", "GATEWAY_DEFAULT_VOICE", "nosuchvoice", "'nosuchvoice' is not a realtime voice"),
    ("--default-model", "GATEWAY_DEFAULT_MODEL", "gpt\trealtime", "must be a non-empty model name"),
    ("--upstream-url", "GATEWAY_UPSTREAM_URL", "http://127.0.0.1:1/x?api-key=sk-test-secret-1",
     r"must be a ws:// or wss:// URL with a host \(got http://\)"),
    ("--upstream-url", "GATEWAY_UPSTREAM_URL", "wss:///v1/realtime", r"with a host \(got no host\)"),
])
@pytest.mark.parametrize("source", ["flag", "env"])
def test_defaults_every_session_would_fail_with_are_refused_at_start(flag, env_name, value, message, source):
    """Found by an operations audit: such a node started, /ready said 200, and every client that
    named no voice (or model) got InvalidConfig, or every session ConnectionFailed. Now the node
    refuses them with one line naming the setting, exit 2, whichever way it was given; the check
    is the one a client's `config.voice` / `config.model` gets. A URL is never quoted (its query
    may hold a key)."""
    argv, env = ([flag, value], {}) if source == "flag" else ([], {env_name: value})
    done = subprocess.run([sys.executable, "-m", "gateway", "--upstream", "mock", *argv], capture_output=True,
                          text=True, timeout=10, env={"PATH": "/usr/bin:/bin", **env})
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"realtime-gateway: {flag} ({env_name})") and "Traceback" not in line
    assert re.search(message, line) and "sk-test-secret-1" not in line


def test_what_clients_may_ask_for_is_a_valid_default():
    """Every voice a client may name (on either dialect: the gateway applies one list), the seed's
    model name, ws:// and wss:// URLs with a port, a path and a query (Azure deployments) pass."""
    for voice in VOICES:
        config = build(["--upstream", "mock", "--upstream-dialect", "beta", "--default-voice", voice], {})
        assert config.default_voice == voice
    assert build(["--default-model", "gpt-4o-realtime-preview"], {"GATEWAY_UPSTREAM": "mock"}).default_model == \
        "gpt-4o-realtime-preview"
    for url in ("wss://r.openai.azure.com/openai/v1/realtime?model=my-deployment",
                "wss://r.openai.azure.com/openai/realtime?api-version=2024-10-01-preview&deployment=d",
                "ws://127.0.0.1:4100/v1/realtime", "WSS://API.example.com:443/v1/realtime"):
        assert build(["--upstream", "azure", "--upstream-url", url], {"AZURE_OPENAI_API_KEY": "k"}).upstream_url == url


@pytest.mark.parametrize("workers", [1, 2])
def test_a_node_that_cannot_start_says_why_and_exits_2_without_restarting_workers(workers):
    """Checks that can only run at start (API keys file, origins, JWT secret, the address): one
    clear line, exit code 2, no traceback; with --workers the supervisor does not replace a
    worker that could not start (it would fail the same way, once a second, for ever)."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for extra in (["--port", str(port)], ["--port", str(free_port()), "--api-keys-file", "/nonexistent/keys"]):
            done = subprocess.run([sys.executable, "-m", "gateway", "--upstream", "mock", "--host", "127.0.0.1",
                                   "--workers", str(workers), *extra],
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == 2, done.stderr[-2000:]
            assert "Traceback" not in done.stderr and "starting a replacement" not in done.stderr
            assert ("Address already in use" in done.stderr) or ("cannot read API keys file" in done.stderr)


@pytest.mark.parametrize("keys, where", [("Zq9", "GATEWAY_API_KEYS entry 1"),
                                         ("sk-live:Zm9vYmFy", "GATEWAY_API_KEYS entry 1")])
def test_a_short_client_key_stops_the_node(keys, where):
    """Found by an auth audit: a one-character key was accepted. One line, exit 2, the key never
    quoted (the JWT secret's 32-byte rule has always worked this way)."""
    done = subprocess.run([sys.executable, "-m", "gateway", "--upstream", "mock", "--host", "127.0.0.1",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "GATEWAY_API_KEYS": keys})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if "realtime-gateway:" in line]
    assert line.startswith(f"realtime-gateway: {where}: the key must be at least 16 characters")
    assert keys.split(":")[-1] not in done.stderr


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_port_in_use_stops_the_node_with_one_line_in_the_log_s_format(log_format):
    """Found by a logging audit: with --log-format json, a node that could not listen said so in
    plain text after its JSON lines. A log shipper reads the reason as one JSON line now."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "gateway", "--upstream", "mock", "--host", "127.0.0.1",
                               "--port", str(port), "--log-format", log_format], capture_output=True, text=True,
                              timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    reason = f"cannot listen on 127.0.0.1:{port}: Address already in use"
    if log_format == "text":
        assert last == f"realtime-gateway: {reason}"
    else:
        assert all(orjson.loads(line) for line in done.stderr.splitlines())
        record = orjson.loads(last)
        assert (record["level"], record["message"]) == ("ERROR", f"cannot start: {reason}")


@pytest.mark.parametrize("argv, env", [(["--port", "0", "--workers", "2"], {}),
                                       ([], {"GATEWAY_PORT": "0", "GATEWAY_WORKERS": "3"})])
def test_workers_cannot_share_a_random_port(argv, env):
    """Found by an operations audit: with --port 0 each worker bound a random port of its own, so
    `--workers 2` made two one-process nodes on two ports (the log named both). The node refuses
    it with one line, exit 2; one process may still take a random port."""
    done = subprocess.run([sys.executable, "-m", "gateway", "--upstream", "mock", "--host", "127.0.0.1", *argv],
                          capture_output=True, text=True, timeout=10, env={"PATH": "/usr/bin:/bin", **env})
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("realtime-gateway: --port (GATEWAY_PORT) 0 (a random port) cannot be shared by "
                           "--workers (GATEWAY_WORKERS)")
    assert build(["--upstream", "mock", "--port", "0"], {}).port == 0


@pytest.mark.parametrize("argv, env, proxy", [
    ([], {"HTTPS_PROXY": "http://egress:3128"}, "http://egress:3128"),                   # wss:// -> https_proxy
    ([], {"https_proxy": "http://lower:3128", "HTTPS_PROXY": "http://upper:3128"}, "http://lower:3128"),
    ([], {"HTTP_PROXY": "http://egress:3128"}, None),                                    # not for wss://
    (["--upstream-url", "ws://upstream.internal/v1/realtime"], {"HTTP_PROXY": "http://egress:3128"},
     "http://egress:3128"),
    ([], {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "localhost,.openai.com"}, None),
    ([], {"HTTPS_PROXY": "http://egress:3128", "no_proxy": "*"}, None),
    (["--upstream-url", "wss://127.0.0.1:9443/v1/realtime"], {"HTTPS_PROXY": "http://egress:3128"}, None),
    (["--upstream-url", "wss://[::1]:9443/v1/realtime"], {"HTTPS_PROXY": "http://egress:3128"}, None),
    (["--upstream-url", "wss://localhost:9443/v1/realtime"], {"HTTPS_PROXY": "http://egress:3128"}, None),
    (["--upstream-proxy", "http://explicit:8080"], {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "*"},
     "http://explicit:8080"),                                                           # the flag wins
    (["--upstream-proxy", "none"], {"HTTPS_PROXY": "http://egress:3128"}, None),
    ([], {"GATEWAY_UPSTREAM_PROXY": "http://gw-env:8080"}, "http://gw-env:8080"),
])
def test_the_upstream_proxy_comes_from_the_setting_or_the_standard_variables(argv, env, proxy):
    assert build(argv, dict(env, OPENAI_API_KEY="sk-test")).upstream_proxy == proxy


def test_the_embedded_mock_is_never_proxied_by_the_standard_variables():
    env = {"HTTPS_PROXY": "http://egress:3128", "HTTP_PROXY": "http://egress:3128"}
    assert build(["--upstream", "mock"], env).upstream_proxy is None


@pytest.mark.parametrize("argv, env, message", [
    (["--upstream-proxy", "https://egress:3128"], {},
     r"--upstream-proxy \(GATEWAY_UPSTREAM_PROXY\) must be an http:// proxy URL with a host "
     r"\(got https:// \(only http:// proxies are supported\)\)$"),
    ([], {"HTTPS_PROXY": "socks5://user:secret-pw@egress:1080"},
     r"HTTPS_PROXY must be .* \(got socks5:// .*\); --upstream-proxy none ignores it$"),
    (["--upstream-proxy", "http://user:secret-pw@:3128"], {}, r"\(got no host\)$"),
    (["--upstream-proxy", "http://egress:99999"], {}, r"\(got an invalid port\)$"),
    (["--upstream-proxy", "http://egress:3128/path"], {}, r"\(got a path, query or fragment\)$"),
])
def test_a_proxy_the_gateway_cannot_use_stops_it_without_quoting_it(argv, env, message):
    with pytest.raises(ConfigError, match=message) as refused:
        build(argv, dict(env, OPENAI_API_KEY="sk-test"))
    assert "secret-pw" not in str(refused.value)


def test_the_proxy_credentials_never_show_in_the_config_repr():
    config = build(["--upstream-proxy", "http://user:secret-pw@egress:3128"], {"OPENAI_API_KEY": "sk-test"})
    assert config.upstream_proxy == "http://user:secret-pw@egress:3128"
    assert "secret-pw" not in repr(config) and "upstream_proxy='http://egress:3128'" in repr(config)


@pytest.mark.parametrize("command", ["serve", "mock", "client"])
def test_the_readme_documents_every_flag_of_every_command(command):
    """`--help` is not the only place an operator looks: the mock's flags were listed only
    there. Every flag of every command appears in README.md."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (commands,) = [action for action in build_parser(command)._actions if isinstance(action, argparse._SubParsersAction)]
    flags = [option for action in commands.choices[command]._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    assert len(flags) >= 8
    assert [flag for flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", readme)] == []
