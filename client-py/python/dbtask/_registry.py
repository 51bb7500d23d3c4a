"""The task registry: the one place the worker reads task definitions from.

This module is a contract between the Python package and the Rust worker, and must stay
importable without the compiled extension (`dbtask._dbtask`): the worker imports the user's
task modules, which run `@task`, which calls :func:`register`; the worker then reads `TASKS`.

Each value in `TASKS` is a `dbtask.Task` with at least these attributes, read by the worker:

- ``name`` (str): the registered name, unique in the process;
- ``fn`` (callable): the undecorated function, ``def`` or ``async def``;
- ``is_async`` (bool): True for ``async def`` functions;
- ``queue`` (str): the queue the client publishes it to by default;
- ``options`` (dict[str, object]): per-task options, the keys of
  :class:`dbtask._options.TaskOptions` (``max_retries``, ``retry_delay``, ``track_started``,
  ...), names and values checked at decoration: an unknown key never gets this far.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._task import Task

TASKS: dict[str, "Task[Any, Any]"] = {}


def register(task: "Task[Any, Any]") -> None:
    """Adds a task; a second, different function under the same name is an error."""
    existing = TASKS.get(task.name)
    if existing is not None and existing.fn is not task.fn:
        # Re-importing a module (reload, or imported under two names) defines a new function
        # object with the same qualified name: that is the same task, not a clash.
        same_def = (
            getattr(existing.fn, "__module__", None) == getattr(task.fn, "__module__", None)
            and getattr(existing.fn, "__qualname__", None) == getattr(task.fn, "__qualname__", None)
        )
        if not same_def:
            raise ValueError(
                f"task name {task.name!r} is already registered by "
                f"{existing.fn.__module__}.{existing.fn.__qualname__}: give one of them another name"
            )
    TASKS[task.name] = task
