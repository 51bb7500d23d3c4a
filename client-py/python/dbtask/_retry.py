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
    """What a running task knows about its delivery (``self.request``,
    ``dbtask.current_task().request``): ``id``, ``task`` (its name), ``retries`` (before this
    run), ``attempt`` (deliveries counted across retries), ``queue``, ``eta`` (Unix seconds,
    when it was delayed), and in a workflow ``parent_id`` (the task whose outcome published
    it) and ``root_id`` (the workflow's first task; its own id outside a workflow);
    ``traceparent`` / ``tracestate``: the W3C trace context the message came with, when
    OpenTelemetry is on (docs/tracing.md), else ``None``."""

    __slots__ = ("id", "task", "retries", "attempt", "queue", "eta", "parent_id", "root_id", "traceparent", "tracestate")

    def __init__(
        self,
        id: str | None = None,
        task: str | None = None,
        retries: int = 0,
        attempt: int = 1,
        queue: str | None = None,
        eta: float | None = None,
        parent_id: str | None = None,
        root_id: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> None:
        self.id = id
        self.task = task
        self.retries = retries
        self.attempt = attempt
        self.queue = queue
        self.eta = eta
        self.parent_id = parent_id
        self.root_id = root_id if root_id is not None else id
        self.traceparent = traceparent
        self.tracestate = tracestate

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

    def update_state(self, task_id: str | None = None, state: str | None = None, meta: Any = None) -> None:
        """Stores a state of the task's own with ``meta`` (JSON-serializable) as its record:
        ``self.update_state(state="PROGRESS", meta={"done": 3, "total": 10})``. ``info()``
        shows it and ``progress()`` hears it at once; the final outcome replaces it. A
        built-in state (SUCCESS...) is a ``ValueError``: the worker records those."""
        from ._context import store_state

        store_state(task_id if task_id is not None else self.request.id, self.task, state, meta)  # type: ignore[arg-type]


def bound(
    task: Any,
    task_id: str,
    retries: int,
    attempt: int,
    queue: str | None = None,
    eta: float | None = None,
    parent_id: str | None = None,
    root_id: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> BoundTask:
    """Called by the worker for the ``self`` of a ``bind=True`` task and for
    ``dbtask.current_task()``."""
    request = Request(task_id, task.name, retries, attempt, queue, eta, parent_id, root_id, traceparent, tracestate)
    return BoundTask(task, request)
