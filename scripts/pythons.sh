# Sourced by wheels.sh and test-dist.sh: finds CPython interpreters of a minor version on this
# machine, on PATH (python3.X) or under `pyenv root`, without naming any machine's paths.

# runs PYTHON: true when it starts and has the venv module.
runs() { [ -n "$1" ] && "$1" -c 'import sys, venv' >/dev/null 2>&1; }

# find_python X.Y: prints an interpreter of that version, or fails.
find_python() {
    local v="$1" p root
    p="$(command -v "python$v" 2>/dev/null || true)"
    if runs "$p"; then printf '%s\n' "$p"; return 0; fi
    if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then
        for p in "$root"/versions/"$v".*/bin/python"$v"; do
            if runs "$p"; then printf '%s\n' "$p"; return 0; fi
        done
    fi
    return 1
}

# has_shared_libpython PYTHON: the worker embeds libpython, so it needs a shared one.
has_shared_libpython() {
    [ "$("$1" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)')" = 1 ]
}

# debian_release X.Y: the Debian release whose python3 is that version (the container image
# must embed the same minor version as the worker), or fails.
debian_release() {
    case "$1" in
        3.11) echo bookworm ;;
        3.13) echo trixie ;;
        *) return 1 ;;
    esac
}
