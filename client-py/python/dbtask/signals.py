"""Worker and task signals, with Celery's names: connect a receiver with a decorator.

::

    from dbtask import signals

    @signals.worker_init.connect
    def open_pool(sender=None, **kwargs):
        db.connect()

    @signals.task_failure.connect
    def report(sender=None, task_id=None, exception=None, **kwargs):
        sentry.capture(exception)

Receivers are called with keyword arguments (take ``**kwargs``: more may come), in the
order they were connected; ``sender`` is the task for task signals, the worker's name for
worker signals. ``connect(sender=task)`` restricts a receiver to one task. A receiver that
raises is logged with its traceback and the others still run: a receiver never changes a
task's outcome. With no receiver connected, the worker skips them at no cost.

Worker signals (once per process): ``worker_init`` (after the task modules are imported; the
place to open a database pool), ``worker_ready``, ``worker_shutdown``, and
``worker_process_init`` in each ``--pool processes`` child (after its imports).

Task signals (once per run, on the thread or loop that runs the task): ``task_prerun``,
``task_postrun`` (``retval``, ``state``), ``task_success`` (``result``), ``task_failure``
(``task_id``, ``exception``, ``args``, ``kwargs``, ``traceback``, ``einfo``),
``task_retry`` (``request``, ``reason``, ``einfo``), and ``task_revoked`` (``request``,
``terminated``, ``expired``; called in the worker process once the REVOKED record is stored).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

__all__ = [
    "Signal",
    "worker_init",
    "worker_ready",
    "worker_shutdown",
    "worker_process_init",
    "task_prerun",
    "task_postrun",
    "task_success",
    "task_failure",
    "task_retry",
    "task_revoked",
]

F = TypeVar("F", bound=Callable[..., Any])

_log = logging.getLogger("dbtask.signals")

#: Called with (task_signals_connected, revoked_connected) whenever a receiver comes or goes:
#: the worker keeps both as flags, so that an unconnected signal costs it nothing.
on_change: Callable[[bool, bool], None] | None = None


class Signal:
    """A named signal: ``connect`` receivers, ``send`` calls them."""

    def __init__(self, name: str, doc: str = "") -> None:
        self.name = name
        self.__doc__ = doc
        self.receivers: list[tuple[Callable[..., Any], Any]] = []

    def __repr__(self) -> str:
        return f"<Signal {self.name} ({len(self.receivers)} receivers)>"

    def connect(self, receiver: F | None = None, *, sender: Any = None) -> Any:
        """Connects ``receiver`` (also as a decorator: ``@sig.connect`` or
        ``@sig.connect(sender=my_task)``); connecting the same receiver twice keeps one."""
        if receiver is None:
            return lambda fn: self.connect(fn, sender=sender)
        if not callable(receiver):
            raise TypeError(f"a signal receiver must be callable, not {type(receiver).__name__}")
        if (receiver, sender) not in self.receivers:
            self.receivers.append((receiver, sender))
            _changed()
        return receiver

    def disconnect(self, receiver: Callable[..., Any], *, sender: Any = None) -> bool:
        """Disconnects ``receiver``; True if it was connected."""
        try:
            self.receivers.remove((receiver, sender))
        except ValueError:
            return False
        _changed()
        return True

    def send(self, sender: Any = None, **named: Any) -> list[tuple[Callable[..., Any], Any]]:
        """Calls every receiver for ``sender``; returns ``(receiver, its return value)`` pairs.
        A receiver that raises is logged with its traceback; the exception is its value."""
        answers = []
        for receiver, only in list(self.receivers):
            if only is not None and only is not sender:
                continue
            try:
                answers.append((receiver, receiver(sender=sender, signal=self, **named)))
            except Exception as exc:
                _log.error("signal %s: receiver %r raised", self.name, receiver, exc_info=True)
                answers.append((receiver, exc))
        return answers


worker_init = Signal("worker_init", "After the task modules are imported, once per worker process.")
worker_ready = Signal("worker_ready", "The worker is consuming its queues.")
worker_shutdown = Signal("worker_shutdown", "The worker is stopping, after its running tasks ended.")
worker_process_init = Signal("worker_process_init", "In each --pool processes child, after its imports.")
task_prerun = Signal("task_prerun", "Before a task runs: task_id, task, args, kwargs.")
task_postrun = Signal("task_postrun", "After a task ran: task_id, task, args, kwargs, retval, state.")
task_success = Signal("task_success", "A task succeeded: result.")
task_failure = Signal("task_failure", "A task failed: task_id, exception, args, kwargs, traceback, einfo.")
task_retry = Signal("task_retry", "A task will be retried: request, reason, einfo.")
task_revoked = Signal("task_revoked", "A task was revoked: request, terminated, expired.")

TASK_SIGNALS = (task_prerun, task_postrun, task_success, task_failure, task_retry)
WORKER_SIGNALS = {s.name: s for s in (worker_init, worker_ready, worker_shutdown, worker_process_init)}


def task_signals_connected() -> bool:
    """Whether any signal sent around a task's run has a receiver."""
    return any(s.receivers for s in TASK_SIGNALS)


def _changed() -> None:
    if on_change is not None:
        on_change(task_signals_connected(), bool(task_revoked.receivers))
