"""Packets that stop arriving, for the tests of peers that vanish without a FIN or RST: a test's
scenario runs in a child process in a new network namespace (`unshare -n`, root), where a `tc`
class on loopback can slow one port to 8 bit/s. Where that is not possible, the test is skipped."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE_TOOLS_MISSING = 77  # the child's exit status when the namespace cannot drop packets


def black_hole(port: int) -> None:
    """From now on, TCP to and from `port` on loopback stalls: 8 bit/s, one byte of burst."""
    for command in ("tc qdisc add dev lo root handle 1: htb default 10",
                    "tc class add dev lo parent 1: classid 1:10 htb rate 10gbit",
                    "tc class add dev lo parent 1: classid 1:20 htb rate 8bit ceil 8bit burst 1 cburst 1",
                    f"tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport {port} 0xffff flowid 1:20",
                    f"tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport {port} 0xffff flowid 1:20"):
        subprocess.run(command.split(), check=True, capture_output=True)


def prepare_namespace() -> None:
    """In the child: loopback up and tc usable, or exit NAMESPACE_TOOLS_MISSING."""
    try:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        subprocess.run("tc qdisc add dev lo root handle 9: htb".split(), check=True, capture_output=True)
        subprocess.run("tc qdisc del dev lo root".split(), check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        sys.exit(NAMESPACE_TOOLS_MISSING)


def run_in_namespace(module: str, call: str) -> Any:
    """Run `from module import ...; call` in a new network namespace; it prints its result as
    JSON on its last line, which is returned. Skips the test where no namespace can be made."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "ip", "tc")):
        pytest.skip("needs root, unshare, ip and tc to drop packets in a network namespace")
    function = call.split("(", 1)[0]
    child = subprocess.run(["unshare", "-n", sys.executable, "-c", f"from {module} import {function}; {call}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    if child.returncode == NAMESPACE_TOOLS_MISSING or (child.returncode != 0 and "unshare failed" in child.stderr):
        pytest.skip(f"no network namespace with tc here: {child.stderr.strip()[-200:]}")
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])
