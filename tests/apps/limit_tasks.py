"""Tasks for the time-limit and revocation tests (`-A limit_tasks`).

Each task appends lines to a `marker` file (start, what it caught, how it ended) so that the
tests can see what happened inside the worker without sleeping blindly.
"""

from __future__ import annotations

import asyncio
import os
import time

import dbtask
from dbtask import task


def _mark(path: str | None, text: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def _busy(seconds: float) -> None:
    """Python code for `seconds`, in short C calls: an async exception lands within 10 ms."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


@task(soft_time_limit=0.5, time_limit=20)
def sync_soft(marker=None):
    _mark(marker, f"start {os.getpid()}")
    try:
        _busy(15)
    except dbtask.SoftTimeLimitExceeded as exc:
        _mark(marker, "soft")
        return f"cleaned up after: {exc}"
    return "not interrupted"


@task
def sync_soft_by_default(marker=None):
    """No limit of its own: the worker's --soft-time-limit applies."""
    _mark(marker, "start")
    try:
        _busy(15)
    except dbtask.SoftTimeLimitExceeded:
        return "worker default applied"
    return "not interrupted"


@task(soft_time_limit=0.3, time_limit=1.0)
def sync_stubborn(seconds, marker=None):
    """Swallows every exception for `seconds`, then returns: its outcome comes too late."""
    _mark(marker, f"start {os.getpid()}")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - ignoring the limits is the point
            _mark(marker, f"ignored {type(exc).__name__}")
    _mark(marker, "returned late")
    return "late"


@task(soft_time_limit=0.8, time_limit=1.0)
def sync_timed(seconds):
    """Runs `seconds` (under its limits): queued behind others, it must still finish."""
    _busy(seconds)
    return seconds


@task(time_limit=1.0)
def sync_hard_no_soft(marker=None):
    """No soft limit: the hard one raises TimeLimitExceeded in the thread."""
    _mark(marker, "start")
    try:
        _busy(30)
    except dbtask.TimeLimitExceeded:
        _mark(marker, "hard limit raised in thread")
        raise
    return "not interrupted"


@task(soft_time_limit=0.5, time_limit=20)
async def async_soft(marker=None):
    _mark(marker, "start")
    try:
        await asyncio.sleep(15)
    except dbtask.SoftTimeLimitExceeded as exc:
        _mark(marker, "soft")
        await asyncio.sleep(0.01)  # the task goes on normally after catching it
        return f"async cleaned up after: {exc}"
    return "not interrupted"


@task(soft_time_limit=0.5, time_limit=20)
async def async_soft_nested(marker=None):
    """Suspended inside another asyncio Task: the exception reaches the innermost await."""

    async def inner():
        await asyncio.sleep(15)
        return "inner finished"

    _mark(marker, "start")
    try:
        return await asyncio.ensure_future(inner())
    except dbtask.SoftTimeLimitExceeded:
        return "nested cleaned up"


@task(time_limit=0.5)
async def async_hard(marker=None):
    _mark(marker, "start")
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        _mark(marker, "cancelled")
        raise
    return "not interrupted"


@task(soft_time_limit=0.3, time_limit=20)
def sync_blocked_in_c(seconds, marker=None):
    """One long C call: the soft limit is delivered when it returns."""
    start = time.monotonic()
    try:
        time.sleep(seconds)
        _busy(10)
    except dbtask.SoftTimeLimitExceeded:
        return time.monotonic() - start
    return None


@task
def sync_long(seconds, marker=None):
    _mark(marker, f"start {os.getpid()}")
    try:
        _busy(seconds)
    except dbtask.Terminated:
        _mark(marker, "terminated")
        raise
    _mark(marker, "finished")
    return "finished"


@task
async def async_long(seconds, marker=None):
    _mark(marker, f"start {os.getpid()}")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _mark(marker, "cancelled")
        raise
    _mark(marker, "finished")
    return "finished"


@task
def quick(value, marker=None):
    _mark(marker, f"ran {value}")
    return value
