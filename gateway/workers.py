"""`--workers N`: N processes share the node's port (SO_REUSEPORT); a supervisor keeps N alive.

The process the operator started becomes the supervisor. It forks the workers before any event
loop exists, then only waits on them:
- a worker that dies is replaced (no faster than once a second per worker slot, so a worker that
  crashes at start cannot spin the machine); the others are untouched, and the kernel spreads new
  connections over the live listeners;
- SIGTERM / SIGINT are forwarded to every worker, each of which drains (stops accepting, tells its
  clients, closes them after the drain timeout); the supervisor returns once all have exited;
- SIGHUP is forwarded too: each worker re-reads its API keys file, TLS certificate and upstream
  CAs, and goes on.

Metrics: every worker writes prometheus-client's value files into one shared directory, so
`GET /metrics` on whichever worker answers reports the sum over all workers.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from typing import Callable

from gateway.auth import SHARED_LIMITS_FILE, forget_worker
from gateway.metrics import mark_worker_dead, prepare_multiprocess_dir

log = logging.getLogger("gateway.workers")

#: a worker slot is restarted at most this often
RESTART_INTERVAL_S = 1.0
#: a worker's exit code when it could not start (EX_CONFIG): no replacement, the node stops
CANNOT_START = 78
#: prctl(2) option: the signal a process gets when its parent dies (Linux)
PR_SET_PDEATHSIG = 1


def supervise(worker_main: Callable[[int], int], workers: int, metrics_dir: str) -> int:
    """Run `worker_main(slot)` in `workers` forked processes until told to stop; returns 0, or
    2 when a worker could not start (exit code CANNOT_START: its replacement would not either).

    `worker_main` runs in the child and returns its exit code; it must bind with
    `reuse_port=True` and write its metrics into `metrics_dir`.
    """
    prepare_multiprocess_dir(metrics_dir)
    supervisor = os.getpid()
    children: dict[int, int] = {}       # pid -> worker slot
    started_at: dict[int, float] = {}   # slot -> monotonic time of its latest start
    stopping = False
    result = 0

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # until its event loop takes SIGHUP over: a worker that is still starting reads the
            # keys file anyway, and the default action would kill it
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _die_with_parent(supervisor)
            code = 1
            try:
                code = worker_main(slot)
            except BaseException:  # noqa: BLE001 - the worker's last words, then its exit code
                log.exception("worker %d failed", slot)
            finally:
                os._exit(code)
        children[pid] = slot
        started_at[slot] = time.monotonic()
        log.info("worker %d started (pid %d)", slot, pid)

    def signal_workers(signum: int, _frame) -> None:
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def forward(signum: int, _frame) -> None:
        nonlocal stopping
        stopping = True
        signal_workers(signum, _frame)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal_workers)  # a reload, not a stop: the workers go on
    for slot in range(workers):
        spawn(slot)

    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        slot = children.pop(pid, None)
        if slot is None:
            continue
        mark_worker_dead(pid, metrics_dir)
        forget_worker(os.path.join(metrics_dir, SHARED_LIMITS_FILE), pid)  # its sessions died with it
        if stopping:
            log.info("worker %d (pid %d) exited", slot, pid)
            continue
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == CANNOT_START:
            log.error("worker %d could not start: stopping the node", slot)
            result = 2
            forward(signal.SIGTERM, None)
            continue
        log.warning("worker %d (pid %d) died (%s): starting a replacement", slot, pid, _describe(status))
        # pace restarts of a slot: this is a supervisor's back-off, not a synchronisation sleep
        time.sleep(max(0.0, RESTART_INTERVAL_S - (time.monotonic() - started_at[slot])))
        if not stopping:
            spawn(slot)
    return result


def _die_with_parent(supervisor: int) -> None:
    """Ask Linux to SIGTERM this worker when the supervisor dies, even by SIGKILL (which cannot
    be forwarded): orphaned workers would keep the port and their sessions with no one to
    replace or stop them. Elsewhere this is a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"
