"""Exceptions raised by the client, and the mapping from a stored task error to one."""

from __future__ import annotations

import ast
import builtins
from typing import Any, Mapping

__all__ = [
    "ResultIgnored",
    "TaskError",
    "UnknownTask",
    "InvalidArguments",
    "MalformedMessage",
    "UnserializableResult",
    "TooLarge",
    "TaskRevoked",
    "ChordError",
    "RemoteTraceback",
]


class TaskError(Exception):
    """A task failed with an exception that is not a Python builtin, or the worker refused it.

    Attributes: ``task_id``, ``exc_type`` (the remote exception's qualified type name, e.g.
    ``myapp.errors.PaymentDeclined``), ``message`` (``str()`` of the remote exception) and
    ``traceback`` (the remote formatted traceback, or ``None``).
    """

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        exc_type: str | None = None,
        traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.task_id = task_id
        self.exc_type = exc_type if exc_type is not None else _qualified_name(type(self))
        self.traceback = traceback

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.message}" if self.message else self.exc_type

    def __reduce__(self) -> Any:
        return (
            _rebuild_task_error,
            (type(self), self.message, self.task_id, self.exc_type, self.traceback),
        )


def _rebuild_task_error(
    cls: type[TaskError], message: str, task_id: str | None, exc_type: str, traceback: str | None
) -> TaskError:
    return cls(message, task_id=task_id, exc_type=exc_type, traceback=traceback)


class UnknownTask(TaskError):
    """No module imported by the worker registered the task's name."""


class InvalidArguments(TaskError):
    """The message's arguments do not fit the task function's signature."""


class MalformedMessage(TaskError):
    """The task message could not be decoded by the worker."""


class UnserializableResult(TaskError):
    """The task returned a value that is not JSON-serializable."""


class TooLarge(TaskError):
    """The task message or its result exceeds the configured size limit."""


class TaskRevoked(TaskError):
    """The task was revoked (for example it arrived after its ``expires`` time)."""


class Expired(TaskRevoked):
    """The task was delivered after its ``expires`` time and did not run (state REVOKED)."""


class Skipped(TaskRevoked):
    """A periodic tick that did not run (state REVOKED): the next tick was already due when it
    was delivered (``catch_up="latest"``), or the previous tick was still running
    (``skip_if_running``). See docs/periodic.md."""


class MaxRetriesExceeded(TaskError):
    """A task raised ``Retry`` without an exception of its own and had no retry left."""


class DeadLettered(TaskError):
    """The message reached its last allowed delivery (``--max-deliver``) without an outcome,
    typically because the worker running it died each time; it was moved to the dead-letter
    stream."""


class WorkerLost(TaskError):
    """The process running the task died before it finished: a crash (a segmentation fault in
    a C extension), ``os._exit``, or the kernel's OOM killer (with ``--pool processes``; the
    message says which signal or exit code). Celery's ``WorkerLostError``. Name it in a
    task's ``autoretry_for`` to run such a task again instead of recording the failure."""


class InternalError(TaskError):
    """The worker could not run the task (its Python runtime was shutting down, or a fault in
    the worker itself while handling it)."""


class ChordError(TaskError):
    """A member of a chord failed, so its callback did not run; the message names the member."""


class ResultIgnored(RuntimeError):
    """``get()`` on a task sent with ``ignore_result``: no record is stored on success, so
    there is nothing to wait for (``info()`` still shows a recorded failure)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, set as ``__cause__`` of the re-raised
    exception so that it prints below the local traceback (as in ``concurrent.futures``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _qualified_name(cls: type) -> str:
    module = cls.__module__
    if module == "dbtask._errors":
        module = "dbtask"
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


# Error type names the worker records itself (protocol::error_types and the few beside it);
# client-py/tests/test_error_table.py checks that every such name in the Rust code is here.
_WORKER_ERRORS: dict[str, type[TaskError]] = {
    "dbtask.MalformedMessage": MalformedMessage,
    "dbtask.UnknownTask": UnknownTask,
    "dbtask.InvalidArguments": InvalidArguments,
    "dbtask.UnserializableResult": UnserializableResult,
    "dbtask.TooLarge": TooLarge,
    "dbtask.TaskRevoked": TaskRevoked,
    "dbtask.Expired": Expired,
    "dbtask.Skipped": Skipped,
    "dbtask.MaxRetriesExceeded": MaxRetriesExceeded,
    "dbtask.DeadLettered": DeadLettered,
    "dbtask.InternalError": InternalError,
    "dbtask.WorkerLost": WorkerLost,
    "dbtask.ChordError": ChordError,
}


def _builtin_exception(exc_type: str) -> type[Exception] | None:
    name = exc_type[len("builtins.") :] if exc_type.startswith("builtins.") else exc_type
    if not name.isidentifier():
        return None
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return None


def error_from_record(record: Mapping[str, Any]) -> Exception:
    """The exception `get()` raises for a FAILURE or REVOKED record.

    A builtin exception type (``ValueError``, ``KeyError``...) is re-raised as itself, with
    ``__cause__`` set to a :class:`RemoteTraceback`; anything else becomes a :class:`TaskError`
    (or one of its subclasses for the worker's own refusals). Only builtins are ever
    instantiated: a type name read from Redis never causes an import.
    """
    task_id = record.get("id")
    error = record.get("error") or {}
    state = record.get("state")
    exc_type = str(error.get("type") or ("dbtask.TaskRevoked" if state == "REVOKED" else "dbtask.TaskError"))
    message = str(error.get("message") or ("task was revoked" if state == "REVOKED" else ""))
    tb = error.get("traceback")
    tb = str(tb) if tb is not None else None

    cls = _builtin_exception(exc_type)
    if cls is not None:
        exc: Exception | None
        try:
            exc = cls(*_builtin_args(cls, message))
        except Exception:  # a builtin whose constructor wants other arguments
            exc = None
        if exc is not None:
            for attr, value in (("task_id", task_id), ("exc_type", exc_type), ("traceback", tb)):
                try:
                    setattr(exc, attr, value)
                except (AttributeError, TypeError):
                    pass
            if tb:
                exc.__cause__ = RemoteTraceback(tb)
            return exc

    err_cls = _WORKER_ERRORS.get(exc_type, TaskError)
    if err_cls is TaskError and state == "REVOKED":
        err_cls = TaskRevoked
    err = err_cls(message, task_id=task_id, exc_type=exc_type, traceback=tb)
    if tb:
        err.__cause__ = RemoteTraceback(tb)
    return err


def _builtin_args(cls: type[Exception], message: str) -> tuple[Any, ...]:
    if not message:
        return ()
    if issubclass(cls, KeyError):
        # str(KeyError("k")) is "'k'": recover the key so that the message does not gain quotes.
        try:
            return (ast.literal_eval(message),)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return (message,)
    return (message,)
