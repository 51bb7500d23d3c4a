"""Tasks of tests/test_priority.py."""

import os
import time

from dbtask import task


def _record(path: str, label: str) -> None:
    line = f"{time.time():.6f} {label}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@task(name="prio.record")
def record(path: str, label: str) -> str:
    _record(path, label)
    time.sleep(0.01)
    return label


@task(name="prio.urgent", priority=9)
def urgent(path: str, label: str) -> str:
    _record(path, label)
    time.sleep(0.01)
    return label
