#!/usr/bin/env bash
# Where the gateway's CPU goes under the relay benchmark's load: the gateway on core 0, the
# stream-echo mock and the load generator on core 1 (as in bench/relay.py), then
#   1. `perf record -g` of the gateway: CPU share per binary (kernel, _fastpath, uvloop, ...),
#      the top user-space symbols, and the kernel's share per syscall;
#   2. `perf trace -s`: how many syscalls of each kind it makes.
# Needs Linux perf (Debian: linux-perf) and root or perf_event_paranoid <= 1. Bounded: about
# 45 s; everything binds 127.0.0.1 and is stopped on exit.
#
#   bash bench/profile.sh [--sessions N] [--tls] [-- gateway flags, e.g. --direct-reads off]
#
# --tls: the mock serves wss:// (a certificate from a CA made here with trustme, trusted by the
# gateway through SSL_CERT_FILE), the upstream leg as it is to OpenAI.
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=200
if [[ "${1:-}" == "--sessions" ]]; then SESSIONS=$2; shift 2; fi
TLS=0
if [[ "${1:-}" == "--tls" ]]; then TLS=1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi
PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d /tmp/gateway-profile.XXXXXX)
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK_PORT=$(free_port); GATEWAY_PORT=$(free_port)

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 never opened" >&2; exit 1
}

SCHEME=ws; MOCK_TLS=()
if [[ $TLS == 1 ]]; then
    # the relay benchmark's own CA and certificate (ca.pem, cert.pem, key.pem in $OUT)
    "$PY" -c 'import sys; from pathlib import Path; sys.path.insert(0, "bench")
from relay import tls_files; tls_files(Path(sys.argv[1]))' "$OUT"
    SCHEME=wss; MOCK_TLS=(--tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem")
    export SSL_CERT_FILE="$OUT/ca.pem"
fi
taskset -c 1 "$PY" -m gateway mock --host 127.0.0.1 --port "$MOCK_PORT" --echo-mode stream --delta-ms 100 \
    "${MOCK_TLS[@]}" >"$OUT/mock.log" 2>&1 &
pids+=($!); wait_port "$MOCK_PORT"
OPENAI_API_KEY=test-key-bench taskset -c 0 "$PY" -m gateway --host 127.0.0.1 --port "$GATEWAY_PORT" \
    --upstream-url "$SCHEME://127.0.0.1:$MOCK_PORT/v1/realtime" --log-level WARNING "$@" >"$OUT/gateway.log" 2>&1 &
GATEWAY=$!; pids+=($GATEWAY); wait_port "$GATEWAY_PORT"
taskset -c 1 "$PY" bench/_loadgen.py --url "ws://127.0.0.1:$GATEWAY_PORT/realtime" --sessions "$SESSIONS" \
    --protocol relay --warmup 3 --duration 30 --drain-timeout 3 >"$OUT/loadgen.out" 2>"$OUT/loadgen.err" &
LOADGEN=$!; pids+=($LOADGEN)

sleep 8  # connected and past the warm-up
perf record -F 4000 -g -o "$OUT/perf.data" -p "$GATEWAY" -- sleep 10 >/dev/null 2>&1
perf trace -s -o "$OUT/trace.txt" -p "$GATEWAY" -- sleep 5 >/dev/null 2>&1 || true
wait "$LOADGEN" || true

echo "# gateway at $SESSIONS sessions (flags: ${*:-none}); files in $OUT"
echo "## CPU share per binary"
perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -8 || true
echo "## top user-space symbols"
perf report -i "$OUT/perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null \
    | grep -E '^ +[0-9]' | grep -v kernel | head -15 || true
echo "## kernel share per syscall (children)"
perf report -i "$OUT/perf.data" --children --sort sym --stdio -g none 2>/dev/null \
    | grep -E '\] (__x64_sys_[a-z_]+|do_softirq\.part\.0) *$' | head -8 || true
echo "## syscalls in 5 s"
grep -E '^ +(sendto|recvfrom|sendmsg|writev|epoll_pwait|epoll_wait|read|write) ' "$OUT/trace.txt" || true
echo "## load generator (its latency figures are disturbed by the tracing; bench/relay.py measures them)"
tail -1 "$OUT/loadgen.out" | "$PY" -c 'import json,sys; r=json.loads(sys.stdin.read()); print({k: r[k] for k in ("sessions_ready","lost_bytes","content_mismatches","rtt_ms")})'
