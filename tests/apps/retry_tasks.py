"""Tasks for the retry, countdown/eta and expiry tests (`-A retry_tasks`).

Each task appends a line to a `log` file per run (`<retries> <time> <pid>`), so a test sees
every attempt, when it started and in which worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import dbtask
from dbtask import task


class Flaky(ConnectionError):
    """Retried automatically by the tasks below (a subclass of a listed type)."""


def _log(path: str, retries: int) -> int:
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{retries} {time.time():.6f} {os.getpid()}\n")
    with open(path, encoding="utf-8") as f:
        return len(f.read().splitlines())


@task(bind=True, autoretry_for=(ConnectionError,), max_retries=5, retry_delay=0.2)
def flaky(self, log: str, fail_times: int) -> int:
    """Fails `fail_times` times with a ConnectionError subclass, then returns its retries."""
    runs = _log(log, self.request.retries)
    if runs <= fail_times:
        raise Flaky(f"run {runs} fails")
    return self.request.retries


@task(bind=True, autoretry_for=[ConnectionError], max_retries=5, retry_delay=0.2)
async def async_flaky(self, log: str, fail_times: int) -> int:
    runs = _log(log, self.request.retries)
    await asyncio.sleep(0)
    if runs <= fail_times:
        raise Flaky(f"run {runs} fails")
    return self.request.retries


@task(
    bind=True,
    autoretry_for=(ConnectionError,),
    max_retries=3,
    retry_backoff=0.2,
    retry_backoff_max=0.5,
    retry_jitter=False,
)
def always_down(self, log: str) -> None:
    """Always fails: delays 0.2, 0.4, 0.5 (capped), then FAILURE with the last error."""
    _log(log, self.request.retries)
    raise Flaky(f"still down after {self.request.retries} retries")


@task(bind=True, autoretry_for=(ConnectionError,), max_retries=3, retry_backoff=0.4, retry_backoff_max=5)
def jittered(self, log: str) -> None:
    """Always fails, with full jitter: each delay is between 0 and 0.4 * 2**retries."""
    _log(log, self.request.retries)
    raise Flaky("down")


@task(bind=True, autoretry_for=(ConnectionError,), max_retries=5, retry_delay=0.1)
def wrong_error(self, log: str) -> None:
    """Raises an exception that is not in autoretry_for: no retry."""
    _log(log, self.request.retries)
    raise ValueError("not retriable")


@task(max_retries=4)
def explicit(log: str, times: int) -> str:
    """`raise dbtask.Retry(countdown=..., exc=...)` until it has run `times + 1` times."""
    runs = _log(log, -1)
    if runs <= times:
        raise dbtask.Retry(countdown=0.2, exc=KeyError(f"missing on run {runs}"))
    return f"done after {runs} runs"


@task(bind=True, max_retries=1)
def retry_without_exc(self, log: str) -> None:
    """Asks for a retry every time: FAILURE (MaxRetriesExceeded) once max_retries is used."""
    _log(log, self.request.retries)
    raise self.retry(countdown=0.1)


@task(bind=True, max_retries=2)
def bound_retry(self, log: str, until: int) -> dict:
    """`self.retry()` until `self.request.retries == until`; returns the request it saw."""
    _log(log, self.request.retries)
    if self.request.retries < until:
        self.retry(countdown=0.1, exc=RuntimeError(f"attempt {self.request.attempt} not yet"))
    return {
        "id": self.request.id,
        "task": self.request.task,
        "retries": self.request.retries,
        "attempt": self.request.attempt,
    }


@task(bind=True, autoretry_for=(ConnectionError,), max_retries=2, retry_delay=3)
def slow_retry(self, log: str) -> int:
    """Fails once, then waits 3 s in state RETRY, then succeeds."""
    runs = _log(log, self.request.retries)
    if runs == 1:
        raise Flaky("first run fails")
    return runs


@task(bind=True, autoretry_for=(ConnectionError,), max_retries=3, retry_delay=0.2)
def crash_then_fail(self, log: str) -> int:
    """On its first run, SIGKILLs its own worker right as it fails; later runs fail until
    the second retry, then succeed."""
    runs = _log(log, self.request.retries)
    if runs == 1:
        threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGKILL)).start()
        raise Flaky("failing while the worker dies")
    if self.request.retries < 2:
        raise Flaky(f"run {runs} fails")
    return self.request.retries


@task
def now() -> float:
    """When the task started, by the worker's clock."""
    return time.time()


@task
def noop(n: int) -> int:
    return n
