"""The contract between the ``dbtask`` package and ``dbtask-worker``: the one module the
worker imports (and it imports nothing else of the package by name). Changing a name or an
attribute below is a change of the worker's interface; keep the two in step.

What the worker reads:

- ``TASKS``: every registered task by name, filled by ``@task`` as the app modules
  (``-A``) are imported. Of each task it reads ``name`` (str), ``fn`` (the callable),
  ``is_async`` (bool: ``async def`` tasks run on the worker's asyncio loop), ``queue`` (str)
  and ``options`` (a dict whose keys are those of :class:`dbtask._options.TaskOptions`,
  already checked at decoration; options left unset are absent).
- ``Retry``: the exception a task raises to ask for a retry; the worker reads its
  ``countdown``, ``max_retries`` and ``exc`` attributes. ``bound``: the bound form of a task
  for ``bind=True`` tasks.
- ``SoftTimeLimitExceeded``, ``TimeLimitExceeded`` and ``Terminated``: the exceptions the
  worker raises inside a running task for its soft limit, its hard limit and
  ``revoke(terminate=True)``.
- ``WorkerLost``: the error of a task whose pool process died; the worker checks whether a
  task's ``autoretry_for`` names it.
- ``PERIODIC``: the periodic schedules the imported modules declared (``dbtask.periodic``),
  name -> declaration JSON; the worker checks and applies them at start-up.
- ``install``: called once per process (worker and pool child) before the task modules are
  imported, with the worker's callbacks (see its docstring).
- ``traced(task)`` and ``has_hooks(task)``: the wrapper the worker calls instead of ``fn``
  when the task's class has hooks, a task signal has a receiver or ``OTEL`` is true, and
  whether it has hooks.
- ``OTEL``: whether tasks run in an OpenTelemetry span (``dbtask._otel.enabled()``: the API
  importable and a tracer provider set), decided when the worker first reads it, after it
  imported the task modules (which may configure the SDK). The worker then reads each message's
  ``traceparent`` / ``tracestate`` headers into the request (``bound``'s last two
  arguments) and ``traced`` opens a span around each run (``dbtask._otel``).
- ``CURRENT``: the context variable an ``async def`` task's wrapper sets to its bound form
  (``bound(...)``), for ``dbtask.current_task()``.
- ``setup_django(settings)``: with ``--django``, called once per process (worker and pool
  child) before the ``-A`` modules are imported; returns the names of the installed apps'
  ``tasks`` modules it imported.
- ``send_signal(name)``: sends a worker signal (``worker_init``, ``worker_ready``,
  ``worker_shutdown``, ``worker_process_init``); ``task_revoked(...)``: that signal.
"""

from __future__ import annotations

from typing import Any, Callable

from . import _context, _logs, _trace, signals
from . import _otel as _otel_module
from ._context import CURRENT
from ._errors import WorkerLost
from ._limits import SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from ._periodic import PERIODIC
from ._registry import TASKS
from ._retry import Request, Retry, bound
from ._trace import has_hooks

_otel_on: bool | None = None


def _otel() -> bool:
    """``OTEL``, decided on first use (see the module docstring)."""
    global _otel_on
    if _otel_on is None:
        _otel_on = _otel_module.enabled() is not None
    return _otel_on


def __getattr__(name: str) -> Any:
    if name == "OTEL":
        return _otel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "TASKS",
    "Retry",
    "bound",
    "SoftTimeLimitExceeded",
    "TimeLimitExceeded",
    "Terminated",
    "WorkerLost",
    "install",
    "traced",
    "has_hooks",
    "CURRENT",
    "send_signal",
    "task_revoked",
    "PERIODIC",
    "OTEL",
    "setup_django",
]


def install(
    *,
    lookup: Callable[[], Any],
    state_writer: Callable[[str, str, str, str, "int | None"], None] | None,
    emit_log: _logs.Emit,
    log_level: int,
    signals_changed: Callable[[bool, bool], None],
    span_writer: Callable[[str, str, "str | None"], None] | None = None,
) -> None:
    """The worker's callbacks: ``lookup`` (the sync job running on the calling thread, for
    ``current_task()``), ``state_writer`` (``update_state``; None in a pool child),
    ``emit_log`` and ``log_level`` (logging and ``print()`` into the worker's logs), and
    ``signals_changed`` (told whether task signals and ``task_revoked`` have receivers),
    ``span_writer`` (told the context of each task's span, OpenTelemetry on)."""
    _context.lookup = lookup
    _context.span_writer = span_writer
    _context.state_writer = state_writer
    _logs.install(emit_log, log_level)
    signals.on_change = signals_changed
    signals._changed()


def traced(task: Any) -> Callable[..., Any]:
    """The function the worker calls instead of ``task.fn`` (see ``dbtask._trace.traced``),
    in a span when ``OTEL`` is true."""
    run = _trace.traced(task)
    return _otel_module.process_span(task, run) if _otel() else run


def setup_django(settings_module: str) -> list[str]:
    """``--django``: sets Django up with ``settings_module`` and imports every installed app's
    ``tasks`` module (``dbtask.contrib.django.worker``)."""
    from .contrib.django import worker

    return worker.setup(settings_module)


def send_signal(name: str, sender: str | None = None) -> None:
    """Sends the worker signal ``name``; a receiver that raises is logged."""
    signals.WORKER_SIGNALS[name].send(sender=sender)


def task_revoked(task_name: str, task_id: str, terminated: bool, expired: bool) -> None:
    """Sends ``task_revoked`` for a task whose REVOKED record is stored."""
    task = TASKS.get(task_name)
    request = Request(task_id, task_name)
    signals.task_revoked.send(sender=task, request=request, terminated=terminated, expired=expired, signum=None)
