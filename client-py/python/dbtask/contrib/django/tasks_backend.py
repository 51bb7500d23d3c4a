"""A backend of Django's Tasks framework (Django 6.0+, ``django.tasks``) whose tasks run on
dbtask workers::

    TASKS = {"default": {"BACKEND": "dbtask.contrib.django.tasks_backend.DbtaskBackend"}}

    from django.tasks import task

    @task(priority=10, queue_name="reports")
    def build_report(day: str) -> dict: ...

    result = build_report.enqueue("2026-12-07")      # a django.tasks.TaskResult
    result.refresh(); result.status, result.return_value

Each ``@task`` of this backend is also registered as a dbtask task named by its
``module_path`` (``myapp.tasks.build_report``) when it is declared, so a worker that imports
its module (``--django`` imports every installed app's ``tasks`` module, ``-A`` others) runs
it; a message cannot name anything else. ``enqueue`` publishes it to the dbtask queue named by
``queue_name``; ``run_after`` becomes the message's eta (``supports_defer``); ``priority``
(-100 to 100, default 0) maps onto dbtask's levels 0-9 (default 5): 0 is 5, 1..100 are 6..9,
-1..-100 are 4..0; ``async def`` tasks run on the worker's asyncio loop.

``get_result(id)`` reads the dbtask record: RECEIVED and RETRY read READY, STARTED (and a
state the task stored with ``update_state``) RUNNING, SUCCESS SUCCESSFUL with the return
value, FAILURE and REVOKED FAILED with the error (type and traceback) in ``errors``.
``started_at``, ``finished_at`` and ``last_attempted_at`` come from the record;
``worker_ids`` repeats the last worker once per attempt. A task not yet taken by a worker has
no record: it reads READY in the process that enqueued it (which remembers the ids it
enqueued, the last 10,000) and raises ``TaskResultDoesNotExist`` elsewhere. ``args`` and
``kwargs`` are known where it was enqueued, or everywhere with the workers'
``--result-extended``.
"""

from __future__ import annotations

import inspect
import os
import socket
import threading
from collections import OrderedDict
from datetime import datetime, timezone as dt_timezone
from typing import Any

import django

if django.VERSION < (6, 0):
    raise ImportError(
        "dbtask.contrib.django.tasks_backend is a backend of django.tasks, which Django 6.0 "
        f"added; this is Django {django.get_version()}: upgrade Django, or use dbtask's own "
        "@dbtask.task with delay_on_commit(), which the rest of dbtask.contrib.django provides"
    )

from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import Task, TaskContext, TaskError, TaskResult, TaskResultStatus
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils import timezone
from django.utils.json import normalize_json
from django.utils.module_loading import import_string

import dbtask
from dbtask import _client, _options, _registry

__all__ = ["DbtaskBackend", "dbtask_priority"]

REMEMBERED = 10_000
# As the worker names itself in the records it writes.
_WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def dbtask_priority(priority: int) -> int:
    """Django's priority (-100 to 100, higher first, default 0) as a dbtask level (0 to 9,
    default 5): 0 is 5, 1..100 are 6..9, -1..-100 are 4..0."""
    if priority >= 0:
        return 5 + (priority * 4 + 99) // 100
    return 5 - (-priority * 5 + 99) // 100


def _status(state: str) -> TaskResultStatus:
    if state in ("PENDING", "RECEIVED", "RETRY"):
        return TaskResultStatus.READY
    if state == "SUCCESS":
        return TaskResultStatus.SUCCESSFUL
    if state in ("FAILURE", "REVOKED"):
        return TaskResultStatus.FAILED
    return TaskResultStatus.RUNNING  # STARTED, or a state of the task's own (update_state)


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=dt_timezone.utc)


def _error(error: dict[str, Any]) -> TaskError:
    kind = str(error.get("type") or "Exception")
    path = kind if "." in kind else f"builtins.{kind}"
    traceback = error.get("traceback") or f"{kind}: {error.get('message', '')}"
    return TaskError(exception_class_path=path, traceback=str(traceback))


class DbtaskBackend(BaseTaskBackend):
    """Runs ``django.tasks`` tasks on dbtask workers (see the module's docstring). ``QUEUES``
    lists the queue names tasks may use (Django's default: ``["default"]``); there is no
    ``OPTIONS``: the connection is the project's ``DBTASK_*`` settings."""

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self._enqueued: OrderedDict[str, TaskResult] = OrderedDict()
        self._lock = threading.Lock()

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        try:
            _options.check_queue(task.queue_name)
        except (TypeError, ValueError) as e:
            raise InvalidTask(f"queue_name {task.queue_name!r} cannot be a dbtask queue: {e}") from None
        _register(task)

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        eta = task.run_after
        if eta is not None and timezone.is_naive(eta):
            eta = timezone.make_aware(eta)  # USE_TZ = False: the project's time zone
        sent = _registered(task).apply_async_sync(
            args=list(args),
            kwargs=dict(kwargs),
            queue=task.queue_name,
            eta=eta,
            priority=dbtask_priority(task.priority),
        )
        result = TaskResult(
            task=task,
            id=sent.id,
            status=TaskResultStatus.READY,
            enqueued_at=timezone.now(),
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=list(args),
            kwargs=dict(kwargs),
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        with self._lock:
            self._enqueued[sent.id] = result
            while len(self._enqueued) > REMEMBERED:
                self._enqueued.popitem(last=False)
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> TaskResult:
        record = dbtask.AsyncResult(result_id).info_sync()
        with self._lock:
            known = self._enqueued.get(result_id)
        if record["state"] == "PENDING":
            if known is None:
                raise TaskResultDoesNotExist(
                    f"no task {result_id!r}: unknown, not yet taken by a worker, or its record "
                    "expired (the workers' --result-ttl)"
                )
            task = known.task
        else:
            task = _django_task(result_id, record.get("task"))
        status = _status(record["state"])
        final = status in (TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED)
        attempts = int(record.get("attempts") or 0)
        worker = record.get("worker")
        error = record.get("error")
        result = TaskResult(
            task=task,
            id=result_id,
            status=status,
            enqueued_at=known.enqueued_at if known is not None else None,
            started_at=_when(record.get("date_started")),
            finished_at=_when(record.get("date_done")) if final else None,
            last_attempted_at=_when(record.get("date_started") or record.get("date_received")),
            args=record.get("args", known.args if known is not None else []),
            kwargs=record.get("kwargs", known.kwargs if known is not None else {}),
            backend=self.alias,
            errors=[_error(error)] if error and status is TaskResultStatus.FAILED else [],
            worker_ids=[worker] * attempts if worker else [],
        )
        if status is TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", record.get("result"))
        return result


def _django_task(result_id: str, name: Any) -> Task:
    try:
        task = import_string(name) if isinstance(name, str) else None
    except ImportError:
        task = None
    if not isinstance(task, Task):
        raise TaskResultDoesNotExist(f"task {result_id!r} ({name}) is not a django.tasks task")
    return task


# -- the dbtask task that runs a Django task on the worker --------------------------------


def _registered(task: Task) -> dbtask.Task[Any, Any]:
    registered = _registry.TASKS.get(task.module_path)
    if registered is None or getattr(registered, "django_task", None) is None:
        _register(task)
        registered = _registry.TASKS[task.module_path]
    return registered


def _register(task: Task) -> None:
    """Registers the dbtask task that runs ``task`` (once per function)."""
    existing = _registry.TASKS.get(task.module_path)
    known = getattr(existing, "django_task", None)
    if known is not None and known.func is task.func:
        return
    run = _async_runner(task) if inspect.iscoroutinefunction(task.func) else _runner(task)
    registered = dbtask.task(name=task.module_path, queue=task.queue_name, track_started=True)(run)
    registered.django_task = task  # type: ignore[attr-defined]


def _running(task: Task, args: Any, kwargs: Any) -> TaskResult:
    """The TaskResult a running task's context and the Django signals see."""
    current = dbtask.current_task()
    request = current.request if current is not None else None
    now = timezone.now()
    attempt = int(getattr(request, "attempt", 1) or 1)
    return TaskResult(
        task=task,
        id=str(getattr(request, "id", "") or ""),
        status=TaskResultStatus.RUNNING,
        enqueued_at=None,
        started_at=now,
        finished_at=None,
        last_attempted_at=now,
        args=list(args),
        kwargs=dict(kwargs),
        backend=task.backend,
        errors=[],
        worker_ids=[_WORKER_ID] * attempt,
    )


def _finish(result: TaskResult, status: TaskResultStatus, value: Any = None) -> None:
    object.__setattr__(result, "status", status)
    object.__setattr__(result, "finished_at", timezone.now())
    object.__setattr__(result, "_return_value", value)
    task_finished.send(DbtaskBackend, task_result=result)


def _named(run: Any, task: Task) -> Any:
    # The function's names (a re-import registers the same task again, not a clash), but not
    # its signature: a takes_context function's first parameter is not the caller's.
    for name in ("__module__", "__qualname__", "__name__", "__doc__"):
        setattr(run, name, getattr(task.func, name, None))
    return run


def _runner(task: Task) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        result = _running(task, args, kwargs)
        task_started.send(DbtaskBackend, task_result=result)
        try:
            if task.takes_context:
                value = task.call(TaskContext(task_result=result), *args, **kwargs)
            else:
                value = task.call(*args, **kwargs)
            value = normalize_json(value)
        except BaseException:
            _finish(result, TaskResultStatus.FAILED)
            raise
        _finish(result, TaskResultStatus.SUCCESSFUL, value)
        return value

    return _named(run, task)


def _async_runner(task: Task) -> Any:
    async def run(*args: Any, **kwargs: Any) -> Any:
        result = _running(task, args, kwargs)
        task_started.send(DbtaskBackend, task_result=result)
        try:
            if task.takes_context:
                value = await task.func(TaskContext(task_result=result), *args, **kwargs)
            else:
                value = await task.func(*args, **kwargs)
            value = normalize_json(value)
        except BaseException:
            _finish(result, TaskResultStatus.FAILED)
            raise
        _finish(result, TaskResultStatus.SUCCESSFUL, value)
        return value

    return _named(run, task)
