#!/usr/bin/env bash
# `make wheels`: builds the dbtask wheels into dist/, one per CPython minor version, each with
# the client and a worker built for that version (dbtask/_bin/dbtask-worker, started by the
# `dbtask-worker` command the wheel installs).
#
#   scripts/wheels.sh [PYTHON ...]     interpreters to build for (default: every CPython 3.10 to
#                                      3.13 with a shared libpython found on PATH or under
#                                      `pyenv root`, else .venv's python)
#
# The worker for .venv's Python is target/release/dbtask-worker (`make build`); another
# version's worker and client are built in target/py<X.Y>/ (PYO3_PYTHON=that python), so the
# usual builds are not redone each time. The wheel is tagged cp3X-cp3X with the lowest manylinux tag maturin finds
# the files compatible with, else plain linux (see docs/building.md on release wheels).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
DIST="${DIST:-$ROOT/dist}"
BIN_DIR="$ROOT/client-py/python/dbtask/_bin"
export PATH="$VENV/bin:$HOME/.cargo/bin:$PATH"

log() { printf 'wheels: %s\n' "$*" >&2; }
die() { printf 'wheels: error: %s\n' "$*" >&2; exit 1; }

[ -x "$VENV/bin/maturin" ] || die ".venv has no maturin: run 'make setup'"
# shellcheck source=scripts/pythons.sh
source "$ROOT/scripts/pythons.sh"
if [ "$#" = 0 ]; then
    here="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    for v in 3.10 3.11 3.12 3.13; do
        if [ "$v" = "$here" ]; then
            set -- "$@" "$VENV/bin/python"
        elif p="$(find_python "$v")" && has_shared_libpython "$p"; then
            set -- "$@" "$p"
        fi
    done
fi

# The binary must not outlive the build in the source tree: an editable install would find it.
trap 'rm -rf "$BIN_DIR"' EXIT
mkdir -p "$DIST"

for python in "$@"; do
    command -v "$python" >/dev/null 2>&1 || die "no Python interpreter $python"
    version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ "$("$python" -c 'import sys; print(sys.prefix)')" = "$("$VENV/bin/python" -c 'import sys; print(sys.prefix)')" ]; then
        target="$ROOT/target"
        maturin_target="$ROOT/target/maturin"   # shared with `make build-client`
        log "worker for Python $version: target/release (the .venv's)"
        (cd "$ROOT" && cargo build --release --quiet -p dbtask-worker)
    else
        target="$ROOT/target/py$version"
        maturin_target="$target"   # most dependencies are built once for both
        log "worker for Python $version ($python): building in target/py$version"
        (cd "$ROOT" && PYO3_PYTHON="$python" CARGO_TARGET_DIR="$target" \
            cargo build --release --quiet -p dbtask-worker)
    fi
    rm -rf "$BIN_DIR"
    mkdir -p "$BIN_DIR"
    cp "$target/release/dbtask-worker" "$BIN_DIR/dbtask-worker"
    # The release build keeps line tables for backtraces (54 MB); a wheel carries symbols only
    # (about 13 MB), as does the extension module (maturin --strip).
    strip --strip-debug "$BIN_DIR/dbtask-worker"
    printf '%s\n' "$version" > "$BIN_DIR/python-version"
    log "wheel for Python $version"
    (cd "$ROOT/client-py" && CARGO_TARGET_DIR="$maturin_target" \
        maturin build --release --quiet --strip --interpreter "$python" --out "$DIST")
done
rm -rf "$BIN_DIR"
log "built: $(cd "$DIST" && ls -1 ./*.whl | tr '\n' ' ')"
