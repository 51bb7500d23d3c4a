"""Tasks with class hooks, and receivers on every signal (`-A hook_tasks`), for the hook and
signal tests. Each hook and receiver appends one JSON line `[event, task_id or sender, ...]`
to the file named by `DBTASK_TEST_EVENTS` (set by the test in the worker's environment).
`DBTASK_TEST_RAISE` names events whose receiver or hook then raises, to show that a raising
one is logged and changes nothing.
"""

from __future__ import annotations

import json
import os

import dbtask
from dbtask import signals, task

EVENTS = os.environ.get("DBTASK_TEST_EVENTS")
RAISE = set(filter(None, os.environ.get("DBTASK_TEST_RAISE", "").split(",")))


def record(event: str, *details: object) -> None:
    if EVENTS:
        with open(EVENTS, "a", encoding="utf-8") as f:
            f.write(json.dumps([event, *details]) + "\n")
    if event in RAISE:
        raise RuntimeError(f"{event} raises on purpose")


class Hooked(dbtask.Task):
    def before_start(self, task_id, args, kwargs):
        record("before_start", task_id, list(args))

    def on_success(self, retval, task_id, args, kwargs):
        record("on_success", task_id, retval)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        record("on_failure", task_id, type(exc).__name__, "Traceback" in einfo.traceback)

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        record("on_retry", task_id, type(exc).__name__)

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        record("after_return", task_id, status)


class AsyncHooked(dbtask.Task):
    async def before_start(self, task_id, args, kwargs):
        record("before_start", task_id, list(args))

    async def on_success(self, retval, task_id, args, kwargs):
        record("on_success", task_id, retval)

    async def on_failure(self, exc, task_id, args, kwargs, einfo):
        record("on_failure", task_id, type(exc).__name__, "Traceback" in einfo.traceback)

    async def after_return(self, status, retval, task_id, args, kwargs, einfo):
        record("after_return", task_id, status)


@task(base=Hooked)
def hooked_add(x, y):
    return x + y


@task(base=Hooked)
def hooked_fail():
    raise ValueError("boom")


@task(base=Hooked, bind=True, max_retries=1, retry_delay=0)
def hooked_retry(self):
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return "second run"


@task(base=AsyncHooked)
async def async_hooked_add(x, y):
    return x + y


@task(base=AsyncHooked)
async def async_hooked_fail():
    raise KeyError("nope")


@task
def plain_add(x, y):
    return x + y


@task(bind=True, max_retries=0)
def plain_retry(self):
    raise self.retry(countdown=0)


# -- signals ---------------------------------------------------------------------------------


@signals.worker_init.connect
def on_worker_init(sender=None, **kwargs):
    record("worker_init", os.getpid())


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", os.getpid())


@signals.worker_shutdown.connect
def on_worker_shutdown(sender=None, **kwargs):
    record("worker_shutdown", os.getpid())


@signals.worker_process_init.connect
def on_worker_process_init(sender=None, **kwargs):
    record("worker_process_init", os.getpid())


@signals.task_prerun.connect
def on_prerun(sender=None, task_id=None, task=None, args=None, kwargs=None, **extra):
    record("task_prerun", task_id, task.name)


@signals.task_postrun.connect
def on_postrun(sender=None, task_id=None, retval=None, state=None, **extra):
    record("task_postrun", task_id, state)


@signals.task_success.connect
def on_task_success(sender=None, result=None, **extra):
    record("task_success", dbtask.current_task().request.id, result)


@signals.task_failure.connect
def on_task_failure(sender=None, task_id=None, exception=None, **extra):
    record("task_failure", task_id, type(exception).__name__)


@signals.task_retry.connect
def on_task_retry(sender=None, request=None, reason=None, **extra):
    record("task_retry", request.id, type(reason).__name__)


@signals.task_revoked.connect
def on_task_revoked(sender=None, request=None, terminated=None, expired=None, **extra):
    record("task_revoked", request.id, terminated, expired)
