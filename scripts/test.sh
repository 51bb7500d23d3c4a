#!/usr/bin/env bash
# Runs every test suite and fails if any of them fails. Called by `make test` after set-up and
# the release builds (the end-to-end tests start target/release/dbtask-worker).
#   1. cargo test --workspace           (protocol, worker, client crates; real servers)
#   2. pytest tests/                     (end to end: real nats-server, redis-server, worker)
#   3. pytest client-py/tests/           (the Python client's own tests, when the folder exists)
#   4. pytest examples/pytest-project/   (a sample project's tests, through dbtask's pytest plugin)
# Every suite runs even when an earlier one failed, so one run reports all failures.
#
# Options: --python-only (skip cargo test); --chaos (only the end-to-end tests marked chaos:
# servers killed under load, left out of the default run); --containers (only the tests marked
# containers: the worker's image run with podman; scripts/test-containers.sh builds it first);
# --dist (only the tests marked dist: the wheels installed and run; scripts/test-dist.sh).
# Extra pytest arguments: PYTEST_ARGS="-x -k sigterm".
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
export PATH="$VENV/bin:$HOME/.cargo/bin:$PATH"
cd "$ROOT"

rust=1
chaos=0
containers=0
dist=0
case "${1:-}" in
    --python-only) rust=0 ;;
    --chaos) rust=0; chaos=1 ;;
    --containers) rust=0; containers=1 ;;
    --dist) rust=0; dist=1 ;;
esac

failed=()
step() { printf '\n==> %s\n' "$*"; }

if [ "$rust" = 1 ]; then
    step "cargo test --workspace"
    cargo test --workspace || failed+=("cargo test --workspace")
fi

# Each suite runs on its own so that it finds its own pytest configuration (tests/pytest.ini,
# client-py/pyproject.toml). The per-test timeout turns a hang into a failure.
# shellcheck disable=SC2206
extra=(${PYTEST_ARGS:-})
run_pytest() {
    local dir="$1" required="$2"
    shift 2
    step "pytest $dir"
    local rc=0
    "$VENV/bin/pytest" "$dir" -q -p no:cacheprovider "$@" "${extra[@]}" || rc=$?
    if [ "$rc" = 5 ] && [ "$required" = optional ]; then
        echo "(no tests collected in $dir)"
    elif [ "$rc" != 0 ]; then
        failed+=("pytest $dir (exit $rc)")
    fi
}
if [ "$chaos" = 1 ]; then
    run_pytest tests required -m chaos
elif [ "$containers" = 1 ]; then
    run_pytest tests required -m containers
elif [ "$dist" = 1 ]; then
    run_pytest tests required -m dist
else
    run_pytest tests required -m "not chaos and not containers and not dist"   # per-test timeout: tests/pytest.ini
fi
if [ "$chaos" = 0 ] && [ "$containers" = 0 ] && [ "$dist" = 0 ] && [ -d client-py/tests ]; then
    # A generous ceiling in case that suite sets none: a hang must fail, not stall CI.
    run_pytest client-py/tests optional --timeout=600
    # A sample project's own tests through dbtask's pytest plugin (docs/testing.md), with the
    # worker of this checkout (the client installed from it carries none).
    step "pytest examples/pytest-project (dbtask's pytest plugin)"
    (cd examples/pytest-project && DBTASK_WORKER_BIN="${DBTASK_WORKER_BIN:-$ROOT/target/release/dbtask-worker}" \
        "$VENV/bin/pytest" -q -p no:cacheprovider "${extra[@]}") || failed+=("pytest examples/pytest-project")
fi

echo
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all test suites passed"
