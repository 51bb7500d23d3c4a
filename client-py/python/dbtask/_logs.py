"""Python logging and ``print()`` of the tasks into the worker's log stream.

The worker installs :func:`install` before it imports the task modules: a handler on the root
logger hands every record to the worker's logs (its ``--log-format``, its ``log_level``) with
the running task's ``task_id`` and ``task_name``, and ``sys.stdout`` becomes a line writer
whose lines are logged at INFO marked ``stream=stdout`` (Celery's
``worker_redirect_stdouts``). Handlers a task module adds itself keep working.

Pure Python, importable without the compiled module.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import Callable

from . import _context

__all__ = ["install"]

#: (level, logger name, message, task_id, task_name, stream) -> None: the worker's log.
Emit = Callable[[int, str, str, "str | None", "str | None", "str | None"], None]


def _task_names() -> tuple[str | None, str | None]:
    me = _context.current_task()
    if me is None:
        return None, None
    return me.request.id, me.request.task


class WorkerHandler(logging.Handler):
    """Hands log records to the worker's log stream."""

    def __init__(self, emit: Emit) -> None:
        super().__init__()
        self._emit = emit
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            task_id, task_name = _task_names()
            self._emit(record.levelno, record.name, self.format(record), task_id, task_name, None)
        except Exception:
            self.handleError(record)


class LineWriter(io.TextIOBase):
    """``sys.stdout`` in a worker: each complete line becomes one log event (per thread, so
    that two tasks printing at once never mix their lines)."""

    def __init__(self, emit: Emit, stream: str) -> None:
        super().__init__()
        self._emit = emit
        self._stream = stream
        self._pending = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        buffered = getattr(self._pending, "text", "") + text
        *lines, rest = buffered.split("\n")
        self._pending.text = rest
        if lines:
            task_id, task_name = _task_names()
            for line in lines:
                self._emit(logging.INFO, self._stream, line, task_id, task_name, self._stream)
        return len(text)

    def flush(self) -> None:
        rest = getattr(self._pending, "text", "")
        if rest:
            self._pending.text = ""
            task_id, task_name = _task_names()
            self._emit(logging.INFO, self._stream, rest, task_id, task_name, self._stream)


def install(emit: Emit, level: int) -> None:
    """Routes the root logger (at ``level``: the worker's) and ``sys.stdout`` to ``emit``."""
    root = logging.getLogger()
    if not any(isinstance(h, WorkerHandler) for h in root.handlers):
        root.addHandler(WorkerHandler(emit))
    root.setLevel(level)
    sys.stdout = LineWriter(emit, "stdout")
