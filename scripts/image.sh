#!/usr/bin/env bash
# Builds the worker's container image (`make image`): the dbtask wheel (client + worker, for
# .venv's Python) is built on this machine by scripts/wheels.sh into a build context
# (target/image/) with config/worker.toml, and deploy/Dockerfile installs it into an image.
# No compiler runs inside the image.
#
# Environment:
#   IMAGE      tag of the image (default dbtask-worker:latest)
#   BASE       base image (default debian:<release>-slim, the release whose python3 has the
#              minor version the worker was built for)
#   CONTAINER  podman or docker (default: podman if installed, else docker)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
CONTEXT="$ROOT/target/image"
IMAGE="${IMAGE:-dbtask-worker:latest}"

die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'image: %s\n' "$*" >&2; }

[ -x "$VENV/bin/maturin" ] || die ".venv has no maturin: run 'make setup'"

# The wheel is built for the venv's Python (its worker embeds that libpython).
PY_VERSION="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
# shellcheck source=scripts/pythons.sh
source "$ROOT/scripts/pythons.sh"
if [ -z "${BASE:-}" ]; then
    RELEASE="$(debian_release "$PY_VERSION")" ||
        die "the worker is built for Python $PY_VERSION and no Debian release has it as python3: set BASE to an image whose python3 is $PY_VERSION"
    BASE="debian:${RELEASE}-slim"
fi

if [ -z "${CONTAINER:-}" ]; then
    if command -v podman >/dev/null 2>&1; then CONTAINER=podman
    elif command -v docker >/dev/null 2>&1; then CONTAINER=docker
    else die "neither podman nor docker is installed"
    fi
fi
# podman on these machines needs runc, cgroupfs and explicit limits (docs/deployment.md).
if [ "$CONTAINER" = podman ]; then
    BUILD=(podman --runtime runc --cgroup-manager=cgroupfs build
           --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 --network host)
else
    BUILD=(docker build)
fi

rm -rf "$CONTEXT"
mkdir -p "$CONTEXT"
DIST="$CONTEXT" bash "$ROOT/scripts/wheels.sh" "$VENV/bin/python"
cp "$ROOT/config/worker.toml" "$CONTEXT/"

log "building $IMAGE from $BASE (worker built for Python $PY_VERSION) with $CONTAINER"
"${BUILD[@]}" --build-arg "BASE=$BASE" --build-arg "PYTHON_VERSION=$PY_VERSION" \
    -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$CONTEXT"
log "built $IMAGE"
