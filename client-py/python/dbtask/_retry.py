"""Retries: the ``Retry`` exception, and what a bound task (``@task(bind=True)``) receives.

Pure Python, importable without the compiled extension: the worker uses it to recognise an
explicit retry and to build the ``self`` of a bound task.
"""

from __future__ import annotations

import time

from typing import Any

from . import _options

__all__ = ["Retry", "Request", "BoundTask"]


class Retry(Exception):
    """Raise inside a task to run it again later: ``raise dbtask.Retry(countdown=5, exc=err)``.

    ``countdown``: seconds until the next attempt (default: the task's retry policy);
    ``exc``: the error recorded while the task waits (state RETRY) and, when no retry is left,
    the error of the FAILURE; ``max_retries``: overrides the task's ``max_retries`` for this
    decision. The retry is a new delivery of the same task id, scheduled in JetStream.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        countdown: float | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
    ) -> None:
        if countdown is not None and _options._countdown(countdown, time.time()) < 0:
            raise ValueError(f"countdown must be a number of seconds >= 0, not {countdown!r}")
        if max_retries is not None and (isinstance(max_retries, bool) or not isinstance(max_retries, int)):
            raise TypeError(f"max_retries must be an int, not {type(max_retries).__name__}")
        if exc is not None and not isinstance(exc, BaseException):
            raise TypeError(f"exc must be an exception, not {type(exc).__name__}")
        self.countdown = None if countdown is None else float(countdown)
        self.exc = exc
        self.max_retries = max_retries
        if message is None:
            message = "retry requested" if exc is None else f"retry after {type(exc).__name__}: {exc}"
            if countdown is not None:
                message += f" (in {countdown:g} s)"
        super().__init__(message)


# Recorded errors name it `dbtask.Retry`, the name users import.
Retry.__module__ = "dbtask"


class Request:
    """What a bound task knows about the current delivery (``self.request``)."""

    __slots__ = ("id", "task", "retries", "attempt")

    def __init__(
        self,
        id: str | None = None,
        task: str | None = None,
        retries: int = 0,
        attempt: int = 1,
    ) -> None:
        self.id = id
        self.task = task
        self.retries = retries
        self.attempt = attempt

    def __repr__(self) -> str:
        return f"<Request id={self.id!r} task={self.task!r} retries={self.retries} attempt={self.attempt}>"


class BoundTask:
    """The ``self`` of a bound task: the task's attributes, plus ``request`` and ``retry()``."""

    __slots__ = ("task", "request")

    def __init__(self, task: Any, request: Request) -> None:
        self.task = task
        self.request = request

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def __repr__(self) -> str:
        return f"<BoundTask {getattr(self.task, 'name', '?')!r} {self.request!r}>"

    def retry(
        self,
        *,
        countdown: float | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
    ) -> Retry:
        """Raises :class:`Retry` (``raise self.retry(...)`` reads well too)."""
        raise Retry(countdown=countdown, exc=exc, max_retries=max_retries)


def bound(task: Any, task_id: str, retries: int, attempt: int) -> BoundTask:
    """Called by the worker for each run of a ``bind=True`` task."""
    return BoundTask(task, Request(id=task_id, task=task.name, retries=retries, attempt=attempt))
