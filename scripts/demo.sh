#!/usr/bin/env bash
# The demo behind `make demo` (which first runs the set-up and the builds):
#   1. starts a private nats-server (JetStream, store in a temp dir) and redis-server, each on
#      a free port of 127.0.0.1 (the machine's own Redis and NATS are never used);
#   2. starts dbtask-worker on the tasks of examples/tasks.py;
#   3. runs examples/client.py (async API) and examples/client_sync.py (sync API);
#   4. stops everything it started, also on failure or Ctrl-C, and removes the temp dir.
# Exits non-zero when anything fails, and then prints the servers' and the worker's logs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
WORKER_BIN="${DBTASK_WORKER_BIN:-$ROOT/target/release/dbtask-worker}"
NATS_BIN="$VENV/bin/nats-server"
PY="$VENV/bin/python"

die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }
[ -x "$WORKER_BIN" ] || die "$WORKER_BIN not found: run 'make build' (or 'make demo')"
[ -x "$NATS_BIN" ] || die "$NATS_BIN not found: run 'make setup'"
command -v redis-server >/dev/null || die "redis-server not found: run 'make setup'"
"$PY" -c 'import dbtask' 2>/dev/null || die "the dbtask package is not in .venv: run 'make build'"

# Settings from the caller's environment must not leak into the demo's worker.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^DBTASK_' || true)

TMP="$(mktemp -d -t dbtask-demo.XXXXXX)"
PIDS=()
OK=0

alive() {
    # True while our child PID runs (an exited child that is not reaped yet is a zombie: dead).
    local state
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$state" ] && [ "$state" != Z ]
}

EXIT_RC=""
wait_exit() {
    # wait_exit PID SECS: waits for our child PID to exit; sets EXIT_RC to its exit code, or
    # to "timeout". (Not in a $(subshell): only this shell can reap its children.)
    local pid="$1" secs="$2"
    EXIT_RC=timeout
    for _ in $(seq $((secs * 10))); do
        if ! alive "$pid"; then
            EXIT_RC=0
            wait "$pid" 2>/dev/null || EXIT_RC=$?
            return 0
        fi
        sleep 0.1
    done
}

stop() {
    # Stops a process we started: SIGTERM, then SIGKILL after 15 s.
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || return 0
    wait_exit "$pid" 15
    if [ "$EXIT_RC" = timeout ]; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Worker first (it drains), then the servers, newest first.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}"; done
    if [ "$OK" != 1 ]; then
        for log in worker:60 nats:15 redis:15; do
            [ -s "$TMP/${log%:*}.log" ] || continue
            printf '\n--- %s log (last %s lines) ---\n' "${log%:*}" "${log#*:}" >&2
            tail -n "${log#*:}" "$TMP/${log%:*}.log" >&2
        done
        [ "$rc" != 0 ] || rc=1
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() {
    # wait_for_port PORT PID NAME: until something accepts on 127.0.0.1:PORT (10 s at most).
    local port="$1" pid="$2" name="$3"
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        alive "$pid" || die "$name exited at start"
        sleep 0.1
    done
    die "$name did not listen on 127.0.0.1:$port within 10 s"
}

NATS_PORT="$(free_port)"
REDIS_PORT="$(free_port)"
while [ "$REDIS_PORT" = "$NATS_PORT" ]; do REDIS_PORT="$(free_port)"; done
NATS_URL="nats://127.0.0.1:$NATS_PORT"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

echo "==> nats-server $("$NATS_BIN" --version | awk '{print $2}') with JetStream on $NATS_URL"
"$NATS_BIN" -js -sd "$TMP/nats" -a 127.0.0.1 -p "$NATS_PORT" >"$TMP/nats.log" 2>&1 &
PIDS+=($!)
wait_for_port "$NATS_PORT" "$!" nats-server

echo "==> redis-server on $REDIS_URL"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$TMP" --save "" --appendonly no \
    >"$TMP/redis.log" 2>&1 &
PIDS+=($!)
wait_for_port "$REDIS_PORT" "$!" redis-server

echo "==> dbtask-worker -A tasks (in examples/)"
(
    cd "$ROOT/examples"
    export VIRTUAL_ENV="$VENV"
    exec "$WORKER_BIN" -A tasks --queues default --concurrency 4 \
        --nats-url "$NATS_URL" --redis-url "$REDIS_URL"
) >"$TMP/worker.log" 2>&1 &
WORKER_PID=$!
PIDS+=("$WORKER_PID")
for _ in $(seq 600); do
    grep -q 'worker ready' "$TMP/worker.log" && break
    alive "$WORKER_PID" || die "the worker exited at start"
    sleep 0.1
done
grep -q 'worker ready' "$TMP/worker.log" || die "the worker was not ready within 60 s"

export DBTASK_NATS_URL="$NATS_URL" DBTASK_REDIS_URL="$REDIS_URL"
echo
echo "==> python examples/client.py"
"$PY" "$ROOT/examples/client.py"
echo
echo "==> python examples/client_sync.py"
"$PY" "$ROOT/examples/client_sync.py"

echo
echo "==> stopping the worker (SIGTERM) and the servers"
kill -TERM "$WORKER_PID"
wait_exit "$WORKER_PID" 30
[ "$EXIT_RC" = 0 ] || die "the worker did not exit cleanly after SIGTERM: $EXIT_RC (expected exit code 0)"
OK=1
echo "demo finished: all results as expected"
