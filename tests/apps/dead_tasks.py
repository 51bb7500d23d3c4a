"""Tasks of tests/test_dead_letters.py."""

import ctypes
import os
import time

from dbtask import task


@task(name="dead.poison")
def poison(marker: str) -> str:
    """Kills its worker process while `marker` exists (a task no worker survives)."""
    if os.path.exists(marker):
        os._exit(1)
    return "survived"


@task(name="dead.segfault")
def segfault(marker: str) -> str:
    """Crashes its worker with a segmentation fault while `marker` exists, a moment after it
    starts (the tasks running beside it finish first)."""
    if os.path.exists(marker):
        time.sleep(0.3)
        ctypes.string_at(0)
    return "survived"


@task(name="dead.innocent")
def innocent(i: int) -> int:
    time.sleep(0.02)
    return i
