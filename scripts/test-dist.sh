#!/usr/bin/env bash
# `make test-dist`: the wheels as a user gets them. Builds the dbtask wheel for .venv's Python
# and for one other CPython minor version found on this machine, installs each into a fresh
# virtualenv of its version outside the checkout, and runs a task end to end with the installed
# `dbtask-worker` (tests/test_dist.py: no cargo, no checkout on sys.path, no VIRTUAL_ENV); with
# a 3.12+ interpreter, also Django 6's Tasks backend on it (tests/test_django_tasks.py).
# CI runs it after `make test`. The other version's builds live in target/py<X.Y>/ and are
# incremental after the first run.
#
# Environment: DBTASK_DIST_PYTHON, the other interpreter (default: the first of python3.12,
# 3.13, 3.10 found on PATH or under `pyenv root`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
log() { printf 'test-dist: %s\n' "$*" >&2; }
die() { printf 'test-dist: error: %s\n' "$*" >&2; exit 1; }

here="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

# shellcheck source=scripts/pythons.sh
source "$ROOT/scripts/pythons.sh"

other="${DBTASK_DIST_PYTHON:-}"
if [ -z "$other" ]; then
    for v in 3.12 3.13 3.10 3.11; do
        [ "$v" = "$here" ] && continue
        if other="$(find_python "$v")" && has_shared_libpython "$other"; then break; fi
        other=""
    done
fi
[ -n "$other" ] || die "no CPython 3.10-3.13 other than $here found (PATH, pyenv): set DBTASK_DIST_PYTHON"
runs "$other" || die "$other does not run or lacks the venv module"
# The worker embeds libpython: that interpreter must have been built with --enable-shared.
has_shared_libpython "$other" ||
    die "$other has no shared libpython (built without --enable-shared): set DBTASK_DIST_PYTHON to one that has"

WHEELS="$ROOT/target/dist-test"
rm -rf "$WHEELS"
log "wheels for Python $here (.venv) and $("$other" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ($other)"
DIST="$WHEELS" bash "$ROOT/scripts/wheels.sh" "$VENV/bin/python" "$other"
# Django 6 (the Tasks backend's test, tests/test_django_tasks.py) needs Python 3.12+: its
# pinned wheels, downloaded for that interpreter's version, are installed by the test offline.
other_version="$("$other" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if "$other" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    log "Django 6 wheels for Python $other_version (scripts/requirements-django6.txt)"
    "$VENV/bin/pip" download --quiet --no-deps --only-binary=:all: --python-version "$other_version" \
        -r "$ROOT/scripts/requirements-django6.txt" -d "$WHEELS/django6"
    export DBTASK_TEST_DJANGO6="$WHEELS/django6"
fi
DBTASK_TEST_WHEELS="$WHEELS" DBTASK_TEST_PYTHONS="$VENV/bin/python:$other" \
    bash "$ROOT/scripts/test.sh" --dist
