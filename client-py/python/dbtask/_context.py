"""The running task: ``dbtask.current_task()`` and ``update_state``.

Inside a worker, ``current_task()`` gives the running task bound to its request (the same
object a ``bind=True`` task gets as ``self``): ``current_task().request.id``,
``current_task().update_state(state="PROGRESS", meta={...})``. Outside a task it is ``None``.

An ``async def`` task finds it in a context variable the worker sets in the task's own
asyncio context (tasks it starts with ``asyncio.create_task`` inherit it). A sync task finds
it through the worker's thread, asked only when ``current_task()`` is called, so that a task
that never asks costs nothing. The worker installs both hooks through
:func:`dbtask._worker.install`.

Pure Python, importable without the compiled module.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ._retry import BoundTask

__all__ = ["current_task", "store_state"]

#: The running ``async def`` task's bound form (set by the worker in the task's context).
CURRENT: ContextVar["BoundTask | None"] = ContextVar("dbtask.current_task", default=None)

#: The worker's lookup of the sync job running on the calling thread (None: not a worker).
lookup: Callable[[], "BoundTask | None"] | None = None

#: The worker's writer of a task's own state: (task_id, task_name, state, meta_json, ttl).
state_writer: Callable[[str, str, str, str, "int | None"], None] | None = None

#: The worker's receiver of a running task's span context, ``(task_id, traceparent,
#: tracestate)``, for what it publishes after the task (OpenTelemetry on; None in a pool
#: process or outside a worker).
span_writer: Callable[[str, str, "str | None"], None] | None = None

#: The states the worker writes itself: a task may not claim them with ``update_state``.
BUILTIN_STATES = frozenset({"PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED"})

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def current_task() -> "BoundTask | None":
    """The running task (its attributes, ``request`` and ``update_state``), or ``None``
    outside a task. Works in ``def`` and ``async def`` tasks, in the thread and the process
    pool."""
    bound = CURRENT.get()
    if bound is None and lookup is not None:
        bound = lookup()
    return bound


def store_state(task_id: str | None, task: Any, state: str, meta: Any) -> None:
    """Stores a state of the task's own with its ``meta`` (a JSON-serializable value) as the
    task's record; ``result.info()`` shows it and ``result.progress()`` hears it."""
    if not isinstance(state, str) or not state or not state.isprintable() or len(state) > 64:
        raise ValueError(f"state must be a short non-empty name such as 'PROGRESS', not {state!r}")
    if state in BUILTIN_STATES:
        raise ValueError(
            f"update_state cannot set {state}: the worker records the built-in states itself; "
            "use a state of your own such as 'PROGRESS'"
        )
    if state_writer is None:
        raise RuntimeError(
            "update_state works inside a task run by dbtask-worker; this call runs outside one"
        )
    if not isinstance(task_id, str) or not task_id:
        raise ValueError(f"task_id must be a non-empty string, not {task_id!r}")
    try:
        meta_json = _encode(meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"update_state meta must be JSON-serializable: {exc}") from exc
    ttl = task.options.get("result_ttl")
    state_writer(task_id, task.name, state, meta_json, ttl)
