"""Start a gateway node whose upstream is the built-in mock, for local load tests.

    python -m loadtest.node                       # node on 127.0.0.1:3001, until Ctrl-C
    python -m loadtest.node --port 3101 -- --log-level DEBUG   # flags after -- go to the node

It runs `python -m gateway --upstream mock --host HOST --port PORT --log-level WARNING [node
flags]` (exactly what `realtime-gateway --upstream mock` does; `--log-level` is yours to override
after --), raises the open-files limit first (each session holds
two sockets: client and upstream), waits until the node's own `GET /health` answers (its `pid` is
the node's, or with `--workers N` one of its workers'), prints the Locust command to run, and
stops the node on Ctrl-C / SIGTERM. A port some other server already listens on is refused with
one line and exit code 2: a load test would measure that server instead. The mock's voice echoes each user turn
bit-exactly, which is what lets the load test check every reply byte for byte.

`MockNode` is the same thing as a context manager (the test suite uses it).

Locust loads every .py file of `loadtest/` as a locustfile; this one defines no users and does
nothing on import.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import IO, Sequence


def raise_open_file_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep what we have; the node reports its own limits
    return soft


class PortInUse(RuntimeError):
    """Another server already listens on the node's port."""


def port_in_use(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when something already accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def health_pid(host: str, port: int, timeout_s: float = 1.0) -> int | None:
    """The `pid` of a 200 answer to `GET /health` (a gateway's `{"status":"ok",...,"pid":P}`);
    None when nothing answers, or the answer is not that."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        if response.status != 200:
            return None
        body = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError):  # not up yet, or not HTTP / JSON
        return None
    finally:
        connection.close()
    pid = body.get("pid") if isinstance(body, dict) else None
    return pid if isinstance(pid, int) else None


def parent_pid(pid: int) -> int | None:
    """The parent of process `pid` (Linux /proc, else `ps`); None when it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rpartition(b")")[2].split()[1])  # after "(comm)": state, ppid
    except (OSError, ValueError, IndexError):
        pass
    try:
        output = subprocess.run(["ps", "-o", "ppid=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        return int(output.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class MockNode:
    """A `python -m gateway --upstream mock` subprocess, up once its own `/health` answers.

    `url` is the client endpoint (ws://HOST:PORT/realtime), `host_url` the Locust --host.
    stdout/stderr go to `log` (a file object) or are inherited.
    """

    def __init__(
        self, port: int = 3001, host: str = "127.0.0.1", node_args: Sequence[str] = (),
        log: IO | None = None, start_timeout_s: float = 60.0,
    ) -> None:
        self.host, self.port = host, port
        self.command = [
            sys.executable, "-m", "gateway", "--upstream", "mock", "--host", host, "--port", str(port), *node_args,
        ]
        self._log = log
        self._start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def host_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.host_url}/realtime"

    def answers_for_node(self, pid: int) -> bool:
        """Is `pid`, the process that answered `/health`, this node: its process, or (`--workers N`)
        one of the workers it forked?"""
        node = self.process.pid
        return pid == node or parent_pid(pid) == node

    def start(self) -> "MockNode":
        """Start the node and wait until it answers; PortInUse when another server holds the port."""
        if port_in_use(self.host, self.port):  # refused before the node starts: one clear message
            raise PortInUse(f"port {self.port} on {self.host} is in use: another server already listens there")
        raise_open_file_limit()
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        # Poll /health: the node is a separate process; there is no in-process event to await.
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            pid = health_pid(self.host, self.port)
            if pid is not None and self.answers_for_node(pid):
                break
            if pid is not None:  # another server took the port after the check above
                self.stop()
                raise PortInUse(f"port {self.port} on {self.host} is in use: /health there is answered by "
                                f"pid {pid}, not by the node (pid {self.process.pid})")
            if self.process.poll() is not None:
                raise RuntimeError(f"the node exited with code {self.process.returncode} before /health answered")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the node's /health did not answer within {self._start_timeout_s:g} s")
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (the node drains), then SIGKILL after `timeout_s`; returns the exit code."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout_s)

    def __enter__(self) -> "MockNode":
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def _port(text: str) -> int:
    """argparse type of --port: a TCP port number, so a bad one gets argparse's one-line error."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {text!r}")
    return port


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def locust_command() -> str:
    """`locust` as the shell finds it; else the one beside this interpreter (a virtualenv that
    is not activated: `.venv/bin/python -m loadtest.node` prints `.venv/bin/locust`)."""
    beside = os.path.join(os.path.dirname(sys.executable), "locust")
    found = shutil.which("locust")
    if not os.path.exists(beside) or (found and os.path.samefile(found, beside)):
        return "locust"
    return os.path.relpath(beside)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.node",
        description="Run a realtime-gateway node with the built-in mock upstream for local load tests.",
        epilog="Anything after -- is passed to the node (see `realtime-gateway serve --help`).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the node listens on")
    parser.add_argument("--port", type=_port, default=3001, help="port the node listens on")
    parser.add_argument("node_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    node_args = args.node_args[1:] if args.node_args[:1] == ["--"] else args.node_args
    if not any(arg.startswith("--log-level") for arg in node_args):
        # Quiet by default: INFO logs a line per connection, which costs the node CPU under load.
        node_args = ["--log-level", "WARNING", *node_args]

    node = MockNode(args.port, args.host, node_args)
    # SIGTERM (e.g. from a process manager) ends the wait below like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        node.start()
        print(f"node ready: {node.url}  (pid {node.process.pid}; open-files limit {raise_open_file_limit()})")
        print(f"load test:  {locust_command()} -f loadtest/ --host {node.host_url}")
        print("Ctrl-C stops the node.", flush=True)
        return node.process.wait()
    except KeyboardInterrupt:
        return 0
    except PortInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if node.process is not None and node.process.returncode == 2:
            return 2  # the node refused its flags and said why, in one line: no second line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        node.stop()


if __name__ == "__main__":
    sys.exit(main())
