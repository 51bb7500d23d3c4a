"""Tasks for the task API tests (`-A taskapi_tasks`): the request a task sees, results kept or
ignored, progress, and logging. Nothing here connects a signal or defines a hook (see
`hook_tasks`), so these run the worker's plain path.

A task that must wait for the test waits for a file to appear (`wait_for`), so that a test can
show an update arrived while the task was still running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import dbtask
from dbtask import task

log = logging.getLogger("taskapi")


def _request() -> dict:
    me = dbtask.current_task()
    if me is None:
        return {}
    r = me.request
    return {
        "id": r.id,
        "task": r.task,
        "retries": r.retries,
        "queue": r.queue,
        "eta": r.eta,
        "parent_id": r.parent_id,
        "root_id": r.root_id,
        "pid": os.getpid(),
    }


@task
def request_of(x=None):
    """The request `current_task()` gives, as a dict (and the pid that ran it)."""
    return _request()


@task(bind=True)
def bound_request(self):
    """True when `current_task()` is the `self` a bound task gets, and the request."""
    return [dbtask.current_task() is self, _request()]


@task
async def async_request():
    """The request, read in the task and in a child asyncio task it starts."""
    inner = await asyncio.create_task(asyncio.sleep(0, result=_request()))
    return [_request(), inner]


@task
def first_step():
    return 1


@task
def next_step(prev):
    return _request()


@task(ignore_result=True)
def fire_and_forget(path):
    with open(path, "a", encoding="utf-8") as f:
        f.write("ran\n")
    return "not stored"


@task(ignore_result=True)
def ignored_failure():
    raise ValueError("recorded even so")


@task(ignore_result=True, store_errors_even_if_ignored=False)
def silent_failure(path):
    with open(path, "a", encoding="utf-8") as f:
        f.write("ran\n")
    raise ValueError("not recorded")


@task
def plain(x):
    return x


@task(result_ttl=30)
def short_lived():
    return "gone soon"


def wait_for(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


@task(bind=True)
def counting(self, steps, go=None):
    """Stores PROGRESS {"done": i, "total": steps} for each step; waits for `go` to exist
    after the first one."""
    for i in range(1, steps + 1):
        self.update_state(state="PROGRESS", meta={"done": i, "total": steps})
        if i == 1 and go:
            wait_for(go)
    return steps


@task
async def async_counting(steps):
    """The same through `current_task()`, in an async task."""
    for i in range(1, steps + 1):
        dbtask.current_task().update_state(state="PROGRESS", meta={"done": i})
        await asyncio.sleep(0.01)
    return steps


@task
def bad_state(state, meta=None, unserializable=False):
    """update_state with what the test passes (or a set as meta); returns the error it
    raised, if any."""
    if unserializable:
        meta = {1, 2}
    try:
        dbtask.current_task().update_state(state=state, meta=meta)
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
    return None


@task
def chatty(word):
    """Logs at INFO and DEBUG, prints a line, and returns its id."""
    log.info("said %s", word)
    log.debug("quietly %s", word)
    print(f"printed {word}")
    return dbtask.current_task().request.id
