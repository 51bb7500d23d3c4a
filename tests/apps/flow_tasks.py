"""Tasks for the workflow tests (tests/test_workflows.py). The worker imports this module with
`-A flow_tasks`; the tests import it too, so both sides register the same names.

Tasks that the tests count append one line to a file given as an argument (O_APPEND writes of
one short line are atomic), so a test counts executions, not results."""

from __future__ import annotations

import os
import time

from dbtask import task


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")


@task
def add(x, y):
    return x + y


@task
def tsum(values, *extra):
    return sum(values) + sum(extra)


@task
def mul(x, y):
    return x * y


@task
def ident(x):
    return x


@task
def fail(*args):
    raise ValueError(f"failing on purpose with {list(args)!r}")


@task
def counted_sum(values, path, tag):
    """A chord callback that records each execution (with its tag and input) in `path`."""
    _append(path, f"{tag} {len(values)} {sum(values)} {os.getpid()}")
    return sum(values)


@task
def slow_add(x, y, marker, seconds):
    """Marks its start (with the pid) in `marker`, then sleeps `seconds`."""
    _append(marker, f"start {x} {os.getpid()}")
    time.sleep(seconds)
    return x + y


@task
def on_error(task_id, error, path):
    _append(path, f"{task_id} {error['type']} {error['message']}")
    return task_id


@task
def on_success(result, path):
    _append(path, f"ok {result}")
    return result


@task
def big(n):
    return "x" * n


@task
def pid_ident(x, path):
    """Returns `x`; records which worker ran it."""
    _append(path, str(os.getpid()))
    return x
