"""The ``dbtask-worker`` command of an installed wheel: starts the worker binary shipped in
the package (``dbtask/_bin/dbtask-worker``) on this environment's Python.

A wheel of dbtask is built for one CPython minor version, and its worker embeds that version's
libpython. This launcher replaces itself (``exec``) with the binary, after making sure that it
finds this environment's interpreter (``DBTASK_PYTHON``, unless ``--python`` or
``DBTASK_PYTHON`` say otherwise) and the folder of its libpython (``LD_LIBRARY_PATH``), so that
no ``--python`` and no ``VIRTUAL_ENV`` are needed. The process keeps its PID: signals, systemd's
``Type=notify`` and container stop signals reach the worker itself.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import NoReturn

_BIN = Path(__file__).resolve().parent / "_bin"


def _fail(message: str) -> NoReturn:
    print(f"dbtask-worker: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    binary = _BIN / "dbtask-worker"
    if not binary.is_file():
        _fail(
            "this installation of dbtask has no worker (it was built from source without one): "
            "install a dbtask wheel (pip install dbtask), or build the worker from a checkout "
            "with `make build` and run target/release/dbtask-worker (docs/building.md)"
        )
    here = "%d.%d" % sys.version_info[:2]
    try:
        built_for = (_BIN / "python-version").read_text().strip()
    except OSError:
        built_for = here
    if built_for != here:
        _fail(
            f"this dbtask wheel's worker embeds Python {built_for}, but this environment runs "
            f"Python {here}: reinstall dbtask with this environment's pip (pip install "
            f"--force-reinstall dbtask) to get the wheel built for Python {here}"
        )
    env = dict(os.environ)
    env.setdefault("DBTASK_PYTHON", sys.executable)
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            paths = [libdir, *filter(None, env.get("LD_LIBRARY_PATH", "").split(os.pathsep))]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.execve(binary, [str(binary), *sys.argv[1:]], env)
