"""Tasks for the events / inspect / control tests (`-A inspect_tasks`)."""

from __future__ import annotations

import os
import time

from dbtask import task


@task
def hold(marker, release, value):
    """Appends "start <value> <pid>" to `marker`, then waits until the file `release` exists."""
    with open(marker, "a", encoding="utf-8") as f:
        f.write(f"start {value} {os.getpid()}\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


@task
def stamp(path, n):
    """Appends "<unix time> <pid> <n>" to `path`."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{time.time()} {os.getpid()} {n}\n")
    return n


@task
def add(x, y):
    return x + y


@task
def fail(message):
    raise ValueError(message)
