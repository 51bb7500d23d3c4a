"""Tasks for the process-pool tests (`-A pool_tasks`, `--pool processes`).

Each reports the pid of the process that ran it, so that the tests can tell the pool's
children apart from the worker and from each other. Some misbehave on purpose: they spin in
pure Python past their hard limit, end their process, crash it, or grow it.
"""

from __future__ import annotations

import ctypes
import os
import time

import dbtask
from dbtask import task


def _mark(path: str | None, text: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


@task
def whoami(n=0):
    """Returns [n, pid of the process that ran it]."""
    return [n, os.getpid()]


@task
def burn(ms=10):
    """`ms` of pure-Python CPU work (it holds the GIL the whole time); returns the pid."""
    end = time.perf_counter() + ms / 1000
    x = 0
    while time.perf_counter() < end:
        x += 1
    return os.getpid()


@task
def environment():
    return {
        "cwd": os.getcwd(),
        "mark": os.environ.get("DBTASK_TEST_MARK"),
        "child_var": os.environ.get("DBTASK_POOL_CHILD"),
    }


@task
async def async_whoami():
    """`async def` tasks run in the worker's own asyncio loop, not in a pool process."""
    return os.getpid()


@task(soft_time_limit=0.3, time_limit=1.0)
def spin(marker=None):
    """Pure Python that swallows every exception: a thread could never be stopped; a pool
    process is killed at the hard limit."""
    _mark(marker, f"start {os.getpid()}")
    while True:
        try:
            while True:
                pass
        except BaseException as exc:  # noqa: BLE001 - ignoring the limits is the point
            _mark(marker, f"ignored {type(exc).__name__}")


@task(soft_time_limit=0.5, time_limit=20)
def soft_in_pool(marker=None):
    _mark(marker, f"start {os.getpid()}")
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            pass
    except dbtask.SoftTimeLimitExceeded as exc:
        return f"cleaned up after: {exc}"
    return "not interrupted"


@task
def long(seconds, marker=None):
    _mark(marker, f"start {os.getpid()}")
    time.sleep(seconds)
    _mark(marker, "finished")
    return "finished"


@task
def exit_process(code=1, marker=None):
    _mark(marker, f"start {os.getpid()}")
    os._exit(code)


@task
def segfault(marker=None):
    _mark(marker, f"start {os.getpid()}")
    ctypes.string_at(0)


@task(autoretry_for=(dbtask.WorkerLost,), max_retries=2, retry_delay=0.1)
def crash_then_succeed(marker):
    """Kills its process on the first two attempts (counted in `marker`), then succeeds."""
    with open(marker, "a", encoding="utf-8") as f:
        f.write("attempt\n")
    with open(marker, encoding="utf-8") as f:
        attempts = len(f.read().splitlines())
    if attempts < 3:
        os._exit(3)
    return attempts


_HOARD: list[bytes] = []


@task
def grow(mib):
    """Keeps `mib` MiB alive in its process (touched, so resident), returns the pid."""
    _HOARD.append(b"x" * (mib << 20))
    return os.getpid()
