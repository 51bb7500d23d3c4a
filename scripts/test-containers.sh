#!/usr/bin/env bash
# `make test-containers`: builds the worker's image from deploy/Dockerfile and runs it for real
# with podman (tests/test_containers.py: a task through the container, a graceful `podman
# stop`, a clear failure on a bad setting). CI runs it after `make test`.
#
# These machines have no Docker daemon and no image registry, so this installs what is missing
# (Debian's podman, runc and debootstrap), makes a Debian base image from Debian's packages once
# (localhost/debian:<release>-slim, by debootstrap, about a minute) and builds on it. NATS and
# Redis run from the host's binaries on free ports (their images cannot be pulled here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
log() { printf 'test-containers: %s\n' "$*" >&2; }
die() { printf 'test-containers: error: %s\n' "$*" >&2; exit 1; }

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "install ${missing[*]} (not a Debian-like system)"
    sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    log "apt-get install ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)

# shellcheck source=scripts/pythons.sh
source "$ROOT/scripts/pythons.sh"
PY_VERSION="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
RELEASE="$(debian_release "$PY_VERSION")" ||
    die "the worker is built for Python $PY_VERSION; no Debian release has it as python3"
BASE="localhost/debian:${RELEASE}-slim"
if ! "${PODMAN[@]}" image exists "$BASE"; then
    # The Debian mirror apt uses here (deb822 or one-line sources), else the default one. Either
    # place may be missing (recent Debian has only sources.list.d/debian.sources): grep's exit
    # status 2 for a missing file must not stop the script under pipefail.
    mirror="$( (grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true) | head -n1 | tr -d ' ')"
    mirror="${mirror:-http://deb.debian.org/debian}"
    rootfs="$(mktemp -d -t dbtask-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    log "making $BASE with debootstrap from $mirror"
    debootstrap --variant=minbase "$RELEASE" "$rootfs" "$mirror" >/dev/null
    tar -C "$rootfs" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi

IMAGE="localhost/dbtask-worker:test"
IMAGE="$IMAGE" BASE="$BASE" CONTAINER=podman bash "$ROOT/scripts/image.sh"
DBTASK_TEST_IMAGE="$IMAGE" bash "$ROOT/scripts/test.sh" --containers
