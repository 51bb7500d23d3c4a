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
"""

from __future__ import annotations

from ._errors import WorkerLost
from ._limits import SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from ._periodic import PERIODIC
from ._registry import TASKS
from ._retry import Retry, bound

__all__ = ["TASKS", "Retry", "bound", "SoftTimeLimitExceeded", "TimeLimitExceeded", "Terminated", "WorkerLost", "PERIODIC"]
