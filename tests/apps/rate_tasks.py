"""Tasks of tests/test_rate_limit.py."""

import os
import time

from dbtask import task


def _record(path: str, label: str) -> None:
    # One short O_APPEND write per line: lines of concurrent processes never interleave.
    line = f"{time.time():.6f} {os.getpid()} {label}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@task(name="rate.limited", rate_limit="20/s")
def limited(path: str, i: int) -> int:
    _record(path, str(i))
    return i


@task(name="rate.unlimited")
def unlimited(path: str, i: int) -> int:
    _record(path, str(i))
    return i
