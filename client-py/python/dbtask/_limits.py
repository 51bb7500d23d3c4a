"""Exceptions of time limits and revocation.

``SoftTimeLimitExceeded`` and ``Terminated`` are raised *inside* a running task by the worker;
``TimeLimitExceeded`` is what ``get()`` raises for a task stopped by its hard limit (and what
the worker raises in a sync task's thread when it abandons it).
"""

from __future__ import annotations

from typing import Any

from . import _errors
from ._errors import TaskError

__all__ = ["SoftTimeLimitExceeded", "TimeLimitExceeded", "Terminated"]


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task when its ``soft_time_limit`` passes: catch it to clean up and
    return early. A sync task gets it at its next Python bytecode (a thread blocked in C code,
    e.g. a long ``time.sleep`` or a socket read, gets it when that call returns); an
    ``async def`` task gets it at the ``await`` it is suspended on."""

    __module__ = "dbtask"

    def __init__(self, *args: object) -> None:
        # The worker raises the class in a thread, without arguments.
        super().__init__(*(args or ("the task ran past its soft time limit",)))


class TimeLimitExceeded(TaskError):
    """The task ran past its hard ``time_limit``: it was cancelled (``async def``) or
    abandoned (sync), and recorded as FAILURE with this type."""

    __module__ = "dbtask"

    def __init__(self, message: str = "the task ran past its hard time limit", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class Terminated(BaseException):
    """Raised inside a running sync task revoked with ``terminate=True``. A BaseException, so
    that ``except Exception`` in the task does not swallow it."""

    __module__ = "dbtask"

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("the task was revoked with terminate=True",)))


_errors._WORKER_ERRORS["dbtask.TimeLimitExceeded"] = TimeLimitExceeded
