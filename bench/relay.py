"""End-to-end relay benchmark: our gateway against peer relays, side by side, in one invocation.

    .venv/bin/python bench/relay.py --sessions 50,100,200 --duration 15
    .venv/bin/python bench/relay.py --relays gateway,gateway-pure,websockets,node,nginx \\
        --sessions 50,100,200,500,1000 --max-sessions 1000 --budget 1800

Load (per session): PCM16 24 kHz mono streamed in real time in 20 ms binary frames (960 B,
50 frames/s), staggered starts, by bench/_loadgen.py. An echoing upstream returns the audio as
100 ms `response.output_audio.delta` events (+ one transcript delta each); the relay under test
turns them into binary frames (+ transcript JSON) for the client. nginx cannot transcode, so it
proxies binary both ways to bench/peers/binary_echo.py, which answers the same 100 ms blocks
plus one small JSON text frame each: the floor of moving the same bytes through one process.

Placement: the relay alone on core 0; load generator, upstream and this script on core 1.

Per relay and N it reports:
  - CPU µs per session-second: the relay's utime+stime (/proc/<pid>/stat, whole process tree)
    over the steady-state window / (N x window seconds); sessions/core = 1e6 / that;
  - p50/p99 round trip: from sending the client frame that completed a 100 ms block to receiving
    that block's audio back (blocks identified by a counter written into the PCM);
  - bytes lost: audio bytes sent - received after the drain (must be 0); content mismatches
    (every returned byte is checked); text frames missing (one transcript per block expected);
  - RSS per session, whole process tree: what the second half of the N sessions added, per
    session, plus what streaming added, per session (`rss_per_session_kib`);
  - saturation marks: the load generator's own CPU > 85 % of its core, core 1 (load generator +
    upstream) > 95 %, those two waiting for core 1 > --load-wait-limit % of the time, or pacing lag
    p99 > --lag-threshold-ms mark the row as not trustworthy;
    a relay using > 95 % of core 0 is itself saturated (it is not run at larger N).
  - the relay's run-queue wait (time it was runnable but another process held core 0): on a
    shared machine other work makes absolute numbers noisy; this column shows how much, and
    ratios measured back to back are what this benchmark is for.
Points are run N by N, all relays at one N before the next N, so slow background drift hits
every relay alike. Results: a markdown table on stdout and JSON in bench/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / "peers"
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable
RELAY_CORE = 0
LOAD_CORE = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
BENCH_API_KEY = "test-key-bench"  # the upstreams are local echo servers; no real key exists here

# ==========================================================================================
# COMMAND LINES OF EVERYTHING THIS BENCHMARK STARTS — the one place to change them.
# {port} is the process's own listening port, {upstream_port} the upstream's.
# ==========================================================================================
MOCK_LAUNCHER = ("import argparse, sys; from gateway.mock import cli; "
                 "parser = argparse.ArgumentParser(prog='realtime-gateway mock'); cli.add_arguments(parser); "
                 "sys.exit(cli.run(parser.parse_args()))")
UPSTREAM_COMMANDS = {
    # The project's mock in stream-echo mode: `realtime-gateway mock ...`, started through the
    # mock CLI module's own contract (add_arguments/run) so that it runs even while another
    # command of the dispatcher (gateway/cli.py builds every subparser) cannot be imported.
    "mock": [PYTHON, "-c", MOCK_LAUNCHER, "--host", "127.0.0.1", "--port", "{port}",
             "--echo-mode", "stream", "--delta-ms", "100"],
    # A minimal stand-in with the same stream-echo rule (bench/peers/realtime_echo.py).
    "bench-echo": [PYTHON, str(PEERS_DIR / "realtime_echo.py"), "--host", "127.0.0.1", "--port", "{port}",
                   "--delta-ms", "100"],
    # Binary echo for the nginx pass-through (no JSON, no base64).
    "binary-echo": [PYTHON, str(PEERS_DIR / "binary_echo.py"), "--host", "127.0.0.1", "--port", "{port}",
                    "--block-ms", "100"],
}
UPSTREAM_PATH = "/v1/realtime"
GATEWAY_COMMAND = [PYTHON, "-m", "gateway", "--host", "127.0.0.1", "--port", "{port}",
                   "--upstream", "openai", "--upstream-url", "{scheme}://127.0.0.1:{upstream_port}" + UPSTREAM_PATH,
                   "--log-level", "WARNING"]
#: what the mock or the gateway adds to serve wss:// (both take the same flags). A relay trusts
#: the bench's CA through SSL_CERT_FILE, the load generator through its --ca.
TLS_SERVER_FLAGS = ["--tls-cert", "{cert}", "--tls-key", "{key}"]


@dataclass(frozen=True)
class RelaySpec:
    """How to start one relay under test and how the load generator talks to it."""

    name: str
    description: str
    command: list[str]  # empty for nginx (built from the template at start)
    env: dict[str, str] = field(default_factory=dict)
    protocol: str = "relay"  # load generator protocol: "relay" (JSON ready, binary audio) or "binary"
    client_path: str = "/realtime"
    upstream: str = "realtime"  # "realtime" (mock or bench-echo, per --upstream) or "binary-echo"
    upstream_tls: bool = False  # wss:// to the mock, as to OpenAI
    client_tls: bool = False  # the relay serves wss:// (--tls-cert/--tls-key); the load generator verifies it


RELAYS = {
    "gateway": RelaySpec("gateway", "this gateway, compiled fast path", GATEWAY_COMMAND,
                         env={"OPENAI_API_KEY": BENCH_API_KEY}),
    "gateway-picows-reads": RelaySpec("gateway-picows-reads", "this gateway, compiled, --direct-reads off",
                                      GATEWAY_COMMAND, env={"OPENAI_API_KEY": BENCH_API_KEY,
                                                            "GATEWAY_DIRECT_READS": "off"}),
    "gateway-unpaced": RelaySpec("gateway-unpaced", "this gateway, compiled, --read-batch-ms 0",
                                 GATEWAY_COMMAND, env={"OPENAI_API_KEY": BENCH_API_KEY,
                                                       "GATEWAY_READ_BATCH_MS": "0"}),
    "gateway-coalesce-40": RelaySpec("gateway-coalesce-40", "this gateway, compiled, --coalesce-ms 40",
                                     GATEWAY_COMMAND, env={"OPENAI_API_KEY": BENCH_API_KEY,
                                                           "GATEWAY_COALESCE_MS": "40"}),
    "gateway-tls-upstream": RelaySpec("gateway-tls-upstream", "this gateway, compiled, wss:// upstream (as to OpenAI)",
                                      GATEWAY_COMMAND, env={"OPENAI_API_KEY": BENCH_API_KEY}, upstream_tls=True),
    "gateway-tls-client": RelaySpec("gateway-tls-client",
                                    "this gateway, compiled, serving wss:// to its clients (--tls-cert), "
                                    "ws:// upstream",
                                    GATEWAY_COMMAND, env={"OPENAI_API_KEY": BENCH_API_KEY}, client_tls=True),
    "gateway-pure": RelaySpec("gateway-pure", "this gateway, GATEWAY_NO_EXTENSIONS=1", GATEWAY_COMMAND,
                              env={"OPENAI_API_KEY": BENCH_API_KEY, "GATEWAY_NO_EXTENSIONS": "1"}),
    "websockets": RelaySpec("websockets", "typical Python relay (websockets, json, base64, asyncio)",
                            [PYTHON, str(PEERS_DIR / "websockets_relay.py"), "--host", "127.0.0.1",
                             "--port", "{port}", "--upstream-url", "ws://127.0.0.1:{upstream_port}" + UPSTREAM_PATH],
                            env={"OPENAI_API_KEY": BENCH_API_KEY}),
    "node": RelaySpec("node", "Node.js relay (ws package)",
                      ["node", str(PEERS_DIR / "node_ws_relay" / "relay.js"), "--host", "127.0.0.1",
                       "--port", "{port}", "--upstream-url", "ws://127.0.0.1:{upstream_port}" + UPSTREAM_PATH],
                      env={"OPENAI_API_KEY": BENCH_API_KEY}),
    "nginx": RelaySpec("nginx", "nginx WebSocket pass-through (binary both ways, no transcoding)", [],
                       protocol="binary", client_path="/", upstream="binary-echo"),
}
# ==========================================================================================


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (("/usr/sbin/nginx") if os.path.exists("/usr/sbin/nginx") else None)


def availability(name: str, upstream: str) -> str | None:
    """None when relay `name` can run here, else why not."""
    spec = RELAYS[name]
    if name.startswith("gateway"):
        probe = subprocess.run([PYTHON, "-m", "gateway", "serve", "--help"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            return "gateway CLI not runnable: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
        needed = ("--upstream-url", "--port", "--log-level") + (("--tls-cert", "--tls-key") if spec.client_tls else ())
        missing = [flag for flag in needed if flag not in probe.stdout]
        if missing:
            return f"gateway CLI lacks {missing}"
    if spec.upstream_tls and upstream != "mock":
        return "a TLS upstream needs the mock (--upstream mock): bench-echo speaks ws:// only"
    if spec.upstream_tls or spec.client_tls:  # a TLS client leg takes either upstream
        try:
            import trustme  # noqa: F401  (the bench's certificates; a test extra)
        except ImportError:
            return "trustme not installed (pip install -e '.[test]')"
    if name in ("gateway", "gateway-pure", "gateway-tls-upstream", "gateway-tls-client", "websockets", "node") \
            and upstream == "mock":
        probe = subprocess.run([PYTHON, "-c", MOCK_LAUNCHER, "--help"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode != 0 or "--echo-mode" not in probe.stdout:
            return ("mock CLI not runnable or lacks --echo-mode (use --upstream bench-echo): "
                    + (probe.stderr.strip().splitlines() or ["?"])[-1])
    if name == "node":
        if not shutil.which("node"):
            return "node not installed"
        if not (PEERS_DIR / "node_ws_relay" / "node_modules" / "ws").is_dir():
            return "ws package missing: run bench/setup_peers.sh"
    if name == "nginx" and not nginx_binary():
        return "nginx not installed: run bench/setup_peers.sh"
    return None


# -- /proc accounting ---------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx master + worker; wrappers + the real process)."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    queue.extend(int(child) for child in handle.read().split())
    return pids


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process tree, seconds (all threads of each process)."""
    user = kernel = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{member}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime (field 14)
            kernel += int(fields[12])  # stime (field 15)
    return user / CLK_TCK, kernel / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process tree, seconds."""
    return sum(cpu_split(pid))


def rss_kib(pid: int) -> int:
    """VmRSS of a process tree, KiB."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{member}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE_KIB
    return total


def runqueue_wait_seconds(pid: int) -> float:
    """Time the process tree's threads were runnable but waiting for a CPU, seconds.

    From /proc/<pid>/task/<tid>/schedstat (second field, ns). The relay is alone on core 0 only
    if nothing else runs there: on a shared machine, this is how much other work delayed it.
    (Per-core /proc/stat counters are tick-sampled and miss short timer-aligned bursts, so
    they are not used.)
    """
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{member}/task"):
                with open(f"/proc/{member}/task/{task}/schedstat") as handle:
                    total += int(handle.read().split()[1])
    return total / 1e9


# -- child processes ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded: timeout_s at 50 ms per attempt
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {timeout_s} s: {tail(log)}")


def tail(log: Path, lines: int = 8) -> str:
    """The log's last distinct lines, a repeated one once with its count: a flooded log (e.g.
    asyncio's write-pause warning thousands of times) still says what else happened."""
    with contextlib.suppress(OSError):
        counts: dict[str, int] = {}
        for line in log.read_text(errors="replace").strip().splitlines():
            counts[line] = counts.pop(line, 0) + 1  # re-inserted: ordered by last occurrence
        return " | ".join(line if count == 1 else f"{line} (×{count})"
                          for line, count in list(counts.items())[-lines:])
    return ""


class Child:
    """A started process pinned to one core, with its output in a log file; stopped by pid."""

    def __init__(self, label: str, command: list[str], core: int, workdir: Path, env: dict | None = None):
        self.label = label
        self.log = workdir / f"{label}.log"
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO_DIR, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=lambda: os.sched_setaffinity(0, {core}), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`, to the child's own process group (it was
        started in a new session, so the group holds exactly it and its children, e.g. the
        nginx worker)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # nginx's master stops its worker itself
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            # Still running, so the group id is still ours: kill the whole group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def tls_files(workdir: Path) -> dict[str, str]:
    """A CA and a certificate for 127.0.0.1, written to `workdir`: {"ca", "cert", "key"}. "ca" is
    the system's CA bundle with the bench's CA added, as an operator adds a private CA: the relay
    then loads as many certificates as it does in front of OpenAI (what a TLS context costs
    depends on them). A load generator verifies a wss:// relay against the same file."""
    import ssl
    import trustme
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    paths = {"ca": workdir / "ca.pem", "cert": workdir / "cert.pem", "key": workdir / "key.pem"}
    system_bundle = ssl.get_default_verify_paths().cafile
    paths["ca"].write_bytes((Path(system_bundle).read_bytes() if system_bundle else b"") + ca.cert_pem.bytes())
    issued.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    issued.private_key_pem.write_to_path(str(paths["key"]))
    return {name: str(path) for name, path in paths.items()}


def start_upstream(kind: str, workdir: Path, tls: dict[str, str] | None = None) -> tuple[Child, int]:
    port = free_port()
    command = [part.format(port=port) for part in UPSTREAM_COMMANDS[kind]]
    if tls:
        command += [part.format(**tls) for part in TLS_SERVER_FLAGS]
    child = Child(f"upstream-{kind}", command, LOAD_CORE, workdir)
    wait_for_port(port, child.process, 30, child.log)
    return child, port


def start_relay(spec: RelaySpec, upstream_port: int, workdir: Path,
                tls: dict[str, str] | None = None) -> tuple[Child, int]:
    """`tls`: the bench's certificates (tls_files), used on the legs `spec` says are TLS."""
    port = free_port()
    if spec.name == "nginx":
        prefix = workdir / "nginx"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        template = string.Template((PEERS_DIR / "nginx" / "nginx.conf.template").read_text())
        # safe_substitute: nginx's own $variables stay as they are.
        conf = template.safe_substitute(
            user_directive="user root;" if os.geteuid() == 0 else "",
            worker_affinity=format(1 << RELAY_CORE, "b").zfill(2),
            prefix=str(prefix), listen_port=port, upstream_port=upstream_port)
        (prefix / "nginx.conf").write_text(conf)
        command = [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    else:
        command = [part.format(port=port, upstream_port=upstream_port, scheme="wss" if spec.upstream_tls else "ws")
                   for part in spec.command]
        if spec.client_tls:
            command += [part.format(**tls) for part in TLS_SERVER_FLAGS]
    env = dict(spec.env, SSL_CERT_FILE=tls["ca"]) if spec.upstream_tls else spec.env
    child = Child(f"relay-{spec.name}", command, RELAY_CORE, workdir, env)
    wait_for_port(port, child.process, 30, child.log)
    return child, port


# -- one measurement point ----------------------------------------------------------------
def run_point(spec: RelaySpec, sessions: int, args, upstream_kind: str, workdir: Path) -> dict:
    """Start upstream + relay, drive `sessions` sessions through it, stop everything."""
    point = {"relay": spec.name, "sessions": sessions, "upstream": upstream_kind}
    children: list[Child] = []
    try:
        tls = tls_files(workdir) if spec.upstream_tls or spec.client_tls else None
        upstream, upstream_port = start_upstream(upstream_kind, workdir, tls if spec.upstream_tls else None)
        children.append(upstream)
        relay, relay_port = start_relay(spec, upstream_port, workdir, tls)
        children.append(relay)
        time.sleep(args.settle)  # let the relay finish start-up work before the idle RSS sample
        point["idle_rss_kib"] = rss_kib(relay.pid)

        client_scheme = "wss" if spec.client_tls else "ws"
        loadgen_cmd = [PYTHON, str(BENCH_DIR / "_loadgen.py"), "--url",
                       f"{client_scheme}://127.0.0.1:{relay_port}{spec.client_path}", "--sessions", str(sessions),
                       "--protocol", spec.protocol, "--warmup", str(args.warmup),
                       "--duration", str(args.duration), "--drain-timeout", str(args.drain_timeout),
                       "--await-parent"] + (["--ca", tls["ca"]] if spec.client_tls else [])
        with open(workdir / "loadgen.log", "wb") as loadgen_log:
            loadgen = subprocess.Popen(loadgen_cmd, cwd=REPO_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=loadgen_log,
                                       preexec_fn=lambda: os.sched_setaffinity(0, {LOAD_CORE}))
        # Bounded: a watchdog kills the load generator past the point's deadline, which ends
        # the read loop below (EOF).
        point_budget_s = args.warmup + args.duration + args.drain_timeout + 60 + sessions / 20
        watchdog = threading.Timer(point_budget_s, loadgen.kill)
        watchdog.start()
        start = {}
        result = None
        for raw in loadgen.stdout:
            event = json.loads(raw)
            now = time.monotonic()
            if event["event"] == "half_connected":
                # memory per session is what the second half adds (see derive)
                point["half_sessions"] = event["sessions"]
                point["half_rss_kib"] = rss_kib(relay.pid)
                go_on(loadgen)
            elif event["event"] == "connected":
                point["connected"] = event
                point["connected_rss_kib"] = rss_kib(relay.pid)
                go_on(loadgen)
            elif event["event"] == "window_start":
                start = {"t": now, "relay": cpu_split(relay.pid), "upstream": cpu_seconds(upstream.pid),
                         "relay_wait": runqueue_wait_seconds(relay.pid),
                         "load_wait": runqueue_wait_seconds(loadgen.pid) + runqueue_wait_seconds(upstream.pid)}
            elif event["event"] == "window_end":
                window = now - start["t"]
                relay_user, relay_kernel = (end - begin for end, begin in zip(cpu_split(relay.pid), start["relay"]))
                relay_cpu = relay_user + relay_kernel
                point.update(
                    window_s=round(window, 3),
                    relay_cpu_s=round(relay_cpu, 3),
                    relay_kernel_s=round(relay_kernel, 3),
                    relay_cpu_pct=round(100 * relay_cpu / window, 1),
                    upstream_cpu_pct=round(100 * (cpu_seconds(upstream.pid) - start["upstream"]) / window, 1),
                    relay_wait_pct=round(100 * (runqueue_wait_seconds(relay.pid) - start["relay_wait"]) / window, 1),
                    load_wait_pct=round(100 * (runqueue_wait_seconds(loadgen.pid) + runqueue_wait_seconds(upstream.pid)
                                               - start["load_wait"]) / window, 1),
                    rss_kib=rss_kib(relay.pid),
                )
            elif event["event"] == "result":
                result = event
        loadgen.wait(30)
        watchdog.cancel()
        if result is None:
            point["error"] = (f"load generator ended without a result (exit {loadgen.returncode}; "
                              f"killed after {point_budget_s:.0f} s if -9): {tail(workdir / 'loadgen.log')}")
            return point
        point["loadgen"] = result
        if relay.process.poll() is not None:
            point["error"] = f"relay exited during the run: {tail(relay.log)}"
        derive(point, args)
        return point
    except Exception as exc:  # noqa: BLE001 - a failed point is reported, the run goes on
        point["error"] = f"{type(exc).__name__}: {exc}"
        return point
    finally:
        for child in reversed(children):
            child.stop()


def go_on(loadgen: subprocess.Popen) -> None:
    """Let a load generator that waits for its parent (--await-parent) go on."""
    with contextlib.suppress(OSError):  # it may have died: the read loop sees EOF
        loadgen.stdin.write(b"\n")
        loadgen.stdin.flush()


def rss_per_session_kib(point: dict, ready: int) -> float:
    """Memory per session, KiB: what the second half of the sessions added to the connected
    relay, per session, plus what streaming added over the connected figure, per session.
    Not (RSS at N - idle RSS) / N: an allocator keeps memory freed during start-up (the
    gateway ~2 MB of glibc heap) and the first sessions reuse it, which hid ~12 KiB per
    session at N = 200."""
    half = point.get("half_sessions")
    if not half or ready <= half or "connected_rss_kib" not in point:
        return (point["rss_kib"] - point["idle_rss_kib"]) / ready
    return ((point["connected_rss_kib"] - point["half_rss_kib"]) / (ready - half)
            + (point["rss_kib"] - point["connected_rss_kib"]) / ready)


def derive(point: dict, args) -> None:
    """Per-session figures and saturation marks from the raw counters of a point."""
    lg = point["loadgen"]
    ready = lg.get("sessions_ready", 0)
    if not ready or "relay_cpu_s" not in point:
        return
    point["cpu_us_per_session_s"] = round(1e6 * point["relay_cpu_s"] / (ready * point["window_s"]), 1)
    # The kernel's share (socket syscalls, TCP) against the process's own work: the split that
    # says whether a gap to nginx is ours to close in user space.
    point["kernel_us_per_session_s"] = round(1e6 * point["relay_kernel_s"] / (ready * point["window_s"]), 1)
    point["sessions_per_core"] = (round(1e6 / point["cpu_us_per_session_s"])
                                  if point["cpu_us_per_session_s"] > 0 else None)
    point["rss_kib_per_session"] = round(rss_per_session_kib(point, ready), 1)
    # Core 1 carries the load generator and the upstream (this script only sleeps on a pipe).
    point["core1_busy_pct"] = round((lg.get("loadgen_cpu_pct") or 0) + point["upstream_cpu_pct"], 1)

    marks = []
    if (lg.get("loadgen_cpu_pct") or 0) > args.loadgen_cpu_limit:
        marks.append(f"loadgen CPU {lg['loadgen_cpu_pct']}%")
    if point["core1_busy_pct"] > 95:
        marks.append(f"core 1 (loadgen + upstream) {point['core1_busy_pct']}%")
    # ... and nothing else, on a quiet machine: another process there delays the load generator's
    # sends and receives (and the upstream's), which inflates every round trip without their own
    # CPU showing it; the time they were runnable but not running does (/proc/stat's per-core
    # figures are tick-sampled and disagreed with the tasks' own by +-10 %, so they are not used).
    # They wait for each other too: 3-10 % of the window on a quiet machine (more behind a fast
    # relay, whose answers wake both at once); with two spinning processes on core 1, 32 %.
    if point["load_wait_pct"] > args.load_wait_limit:
        marks.append(f"core 1 shared: the load generator and the upstream waited {point['load_wait_pct']}% "
                     "of the window for the CPU")
    lag_p99 = (lg.get("pacing_lag_ms") or {}).get("p99")
    if lag_p99 is not None and lag_p99 > args.lag_threshold_ms:
        marks.append(f"pacing lag p99 {lag_p99} ms")
    point["loadgen_saturated"] = bool(marks)
    point["saturation"] = marks
    problems = []
    if lg.get("connect_failures"):
        problems.append(f"{lg['connect_failures']} sessions failed to connect")
    if lg.get("lost_bytes"):
        problems.append(f"{lg['lost_bytes']} bytes lost")
    if lg.get("content_mismatches"):
        problems.append(f"{lg['content_mismatches']} content mismatches")
    if lg.get("errors"):
        problems.append(f"{lg['errors']} error events")
    missing_text = (lg.get("blocks_received") or 0) - (lg.get("text_frames") or 0)
    if missing_text > 0:  # one transcript (nginx: one text frame) comes with every 100 ms block
        problems.append(f"{missing_text} text frames missing")
    if lg.get("unexpected_disconnects"):
        problems.append(f"{lg['unexpected_disconnects']} disconnects")
    point["problems"] = problems
    point["relay_saturated"] = point["relay_cpu_pct"] > 95 or ((lg.get("rtt_ms") or {}).get("p99") or 0) > 1000


# -- reporting ------------------------------------------------------------------------------
def fmt(value, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def median_points(points: list[dict], base: str) -> list[dict]:
    """One point per (relay, N): the median of each figure over the rounds, the sums of what
    must be zero, and `cpu_ratio`: the median over rounds of the CPU ratio to `base` measured in
    the same round (back to back, so shared-machine drift cancels out)."""
    import statistics

    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    measured = [p for p in points if "cpu_us_per_session_s" in p]
    base_cpu = {(p["sessions"], p["round"]): p["cpu_us_per_session_s"] for p in measured if p["relay"] == base}
    merged: list[dict] = []
    for key in dict.fromkeys((p["relay"], p["sessions"]) for p in points):
        group = [p for p in measured if (p["relay"], p["sessions"]) == key]
        if not group:
            merged.append(next(p for p in points if (p["relay"], p["sessions"]) == key))
            continue
        first = dict(group[0])
        for figure in ("cpu_us_per_session_s", "kernel_us_per_session_s", "rss_kib_per_session",
                       "relay_cpu_pct", "relay_wait_pct", "upstream_cpu_pct"):
            first[figure] = median(p.get(figure) for p in group)
        first["sessions_per_core"] = round(1e6 / first["cpu_us_per_session_s"]) if first["cpu_us_per_session_s"] else None
        lg = dict(first["loadgen"])
        lg["rtt_ms"] = {q: median(p["loadgen"]["rtt_ms"].get(q) for p in group) for q in ("p50", "p99")}
        lg["loadgen_cpu_pct"] = median(p["loadgen"].get("loadgen_cpu_pct") for p in group)
        lg["lost_bytes"] = sum(p["loadgen"].get("lost_bytes") or 0 for p in group)
        first["loadgen"] = lg
        first["problems"] = sorted({problem for p in group for problem in p.get("problems", [])})
        first["loadgen_saturated"] = any(p.get("loadgen_saturated") for p in group)
        first["saturation"] = sorted({mark for p in group for mark in p.get("saturation", [])})
        first["relay_saturated"] = any(p.get("relay_saturated") for p in group)
        ratios = [p["cpu_us_per_session_s"] / base_cpu[(p["sessions"], p["round"])] for p in group
                  if base_cpu.get((p["sessions"], p["round"]))]
        first["cpu_ratio"] = median(ratios)
        first["cpu_ratios"] = [round(r, 3) for r in ratios]
        first["rounds"] = len(group)
        merged.append(first)
    return merged


def markdown_table(points: list[dict], base: str) -> str:
    by_key = {(p["relay"], p["sessions"]): p for p in points}
    header = ("| relay | N | CPU µs / session-s | of which kernel | CPU vs " + base + " | sessions/core | p50 ms | p99 ms "
              "| bytes lost | RSS KiB / session | relay CPU % | relay run-queue wait % | loadgen CPU % | upstream CPU % | notes |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for p in points:
        if "cpu_us_per_session_s" not in p:
            lines.append(f"| {p['relay']} | {p['sessions']} | — | — | — | — | — | — | — | — | — | — | — | — | "
                         f"{p.get('error') or p.get('skipped') or 'no data'} |")
            continue
        lg = p["loadgen"]
        base_point = by_key.get((base, p["sessions"]))
        ratio = "—"
        if p.get("cpu_ratio") is not None:  # --repeat: the median of the per-round ratios
            ratio = f"{p['cpu_ratio']:.2f}×"
        elif base_point and base_point.get("cpu_us_per_session_s"):
            ratio = f"{p['cpu_us_per_session_s'] / base_point['cpu_us_per_session_s']:.2f}×"
        notes = list(p.get("problems", []))
        if p.get("loadgen_saturated"):
            notes.insert(0, "**LOADGEN SATURATED** (" + "; ".join(p["saturation"]) + ")")
        if p.get("relay_saturated"):
            notes.insert(0, "relay saturated")
        if p.get("error"):
            notes.append(p["error"])
        lines.append(
            f"| {p['relay']} | {p['sessions']} | {fmt(p['cpu_us_per_session_s'])} "
            f"| {fmt(p['kernel_us_per_session_s'])} | {ratio} "
            f"| {fmt(p['sessions_per_core'])} | {fmt(lg['rtt_ms']['p50'], 2)} | {fmt(lg['rtt_ms']['p99'], 2)} "
            f"| {fmt(lg['lost_bytes'])} | {fmt(p['rss_kib_per_session'], 1)} | {fmt(p['relay_cpu_pct'], 1)} "
            f"| {fmt(p['relay_wait_pct'], 1)} | {fmt(lg.get('loadgen_cpu_pct'), 1)} | {fmt(p['upstream_cpu_pct'], 1)} "
            f"| {'; '.join(notes)} |")
    return "\n".join(lines)


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for label, command in (("node", ["node", "--version"]), ("nginx", [nginx_binary() or "nginx", "-v"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
            versions[label] = (out.stdout + out.stderr).strip()
    for module in ("picows", "websockets", "uvloop", "orjson"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            versions[module] = version(module)
    with contextlib.suppress(OSError):
        versions["ws"] = json.loads((PEERS_DIR / "node_ws_relay" / "node_modules" / "ws" / "package.json")
                                    .read_text())["version"]
    return versions


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def estimate_point_s(args, sessions: int) -> float:
    return args.settle + args.warmup + args.duration + 6 + sessions / 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--relays", default="gateway,gateway-pure,websockets,node,nginx",
                        help="comma-separated, from: " + "; ".join(f"{name}: {spec.description}"
                                                                   for name, spec in RELAYS.items()))
    parser.add_argument("--sessions", default="50,100,200,500,1000", help="comma-separated session counts")
    parser.add_argument("--max-sessions", type=int, default=2000, help="never run a point above this N")
    parser.add_argument("--duration", type=float, default=15.0, help="steady-state window per point, s")
    parser.add_argument("--warmup", type=float, default=3.0, help="streaming before the window, s")
    parser.add_argument("--settle", type=float, default=1.0, help="idle time after start before the idle RSS sample, s")
    parser.add_argument("--drain-timeout", type=float, default=5.0, help="wait for the echo tail after stopping, s")
    parser.add_argument("--budget", type=float, default=1800.0, help="total time budget, s: points that would exceed it are skipped")
    parser.add_argument("--upstream", choices=("auto", "mock", "bench-echo"), default="auto",
                        help="echo upstream of the transcoding relays: the project mock, or the minimal "
                             "bench/peers/realtime_echo.py; auto = mock when its CLI runs")
    parser.add_argument("--loadgen-cpu-limit", type=float, default=85.0, help="loadgen CPU %% above which a row is marked saturated")
    parser.add_argument("--load-wait-limit", type=float, default=20.0,
                        help="%% of the window the load generator and upstream waited for core 1 above which "
                             "a row is marked saturated")
    parser.add_argument("--lag-threshold-ms", type=float, default=10.0, help="pacing lag p99 above which a row is marked saturated")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds per N: the relays run in alternating order each round, and the table "
                             "shows per-relay medians and the median of the per-round CPU ratios (this "
                             "machine is shared: one round's absolute figures wander by +-20%%)")
    parser.add_argument("--base", default=None, help="relay the ratios are computed against (default: gateway if run, else the first)")
    parser.add_argument("--out", default=None, help="JSON results path (default bench/results/relay-<time>.json)")
    args = parser.parse_args(argv)

    if os.cpu_count() < 2 or not {RELAY_CORE, LOAD_CORE} <= os.sched_getaffinity(0):
        parser.error("needs cores 0 and 1 (relay on one, load generator + upstream on the other)")
    os.sched_setaffinity(0, {LOAD_CORE})  # this script must not disturb the relay's core

    names = [n.strip() for n in args.relays.split(",") if n.strip()]
    unknown = [n for n in names if n not in RELAYS]
    if unknown:
        parser.error(f"unknown relays {unknown}; choose from {list(RELAYS)}")
    sizes = sorted({int(n) for n in args.sessions.split(",") if n.strip()})
    sizes = [n for n in sizes if n <= args.max_sessions]

    upstream = args.upstream
    if upstream == "auto":
        upstream = "mock" if availability("websockets", "mock") is None else "bench-echo"
    print(f"# relay benchmark: relays={names} sessions={sizes} duration={args.duration}s "
          f"warmup={args.warmup}s upstream={upstream}", flush=True)

    unavailable = {}
    for name in names:
        reason = availability(name, upstream)
        if reason:
            unavailable[name] = reason
            print(f"# {name}: not run — {reason}", flush=True)
    runnable = [n for n in names if n not in unavailable]
    base = args.base or ("gateway" if "gateway" in runnable else (runnable[0] if runnable else "gateway"))

    started = time.monotonic()
    points: list[dict] = []
    stopped_at: dict[str, str] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        rounds = [(sessions, index) for sessions in sizes for index in range(max(1, args.repeat))]
        for sessions, round_index in rounds:
            # alternate the order each round so slow drift does not favour the relay run first
            for name in (runnable if round_index % 2 == 0 else runnable[::-1]):
                spec = RELAYS[name]
                if name in stopped_at:
                    points.append({"relay": name, "sessions": sessions, "skipped": stopped_at[name]})
                    continue
                if time.monotonic() - started + estimate_point_s(args, sessions) > args.budget:
                    points.append({"relay": name, "sessions": sessions, "skipped": "time budget"})
                    continue
                workdir = Path(tmp) / f"{name}-{sessions}-{round_index}"
                workdir.mkdir()
                kind = "binary-echo" if spec.upstream == "binary-echo" else upstream
                point = run_point(spec, sessions, args, kind, workdir)
                point["round"] = round_index
                points.append(point)
                summary = (f"cpu {point.get('cpu_us_per_session_s')} µs/session-s, "
                           f"p99 {point.get('loadgen', {}).get('rtt_ms', {}).get('p99')} ms, "
                           f"lost {point.get('loadgen', {}).get('lost_bytes')}, "
                           f"loadgen {point.get('loadgen', {}).get('loadgen_cpu_pct')}%"
                           + (f", ERROR {point['error']}" if point.get("error") else ""))
                print(f"# {name} N={sessions}: {summary}", flush=True)
                if point.get("error") or point.get("relay_saturated"):
                    stopped_at[name] = f"stopped: {'failed' if point.get('error') else 'saturated'} at N={sessions}"
                elif point.get("loadgen_saturated"):
                    stopped_at[name] = f"stopped: load generator saturated at N={sessions}"

    if args.repeat > 1:
        points = median_points(points, base)
    table = markdown_table(points, base)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "args": vars(args),
        "upstream": upstream,
        "ratio_base": base,
        "unavailable": unavailable,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "kernel": platform.release()},
        "versions": tool_versions(),
        "points": points,
        "table_markdown": table,
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"relay-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print()
    print(table)
    for name, reason in unavailable.items():
        print(f"\n{name}: not run — {reason}")
    print()
    print(f"upstream of the transcoding relays: {upstream}; nginx: binary echo. Ratios: CPU per session-second "
          f"÷ {base}'s at the same N. Results: {out.relative_to(REPO_DIR) if out.is_relative_to(REPO_DIR) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
