"""What ``dbtask-worker --django myproject.settings`` does in the worker's interpreter (and in
each ``--pool processes`` child), through ``dbtask._worker.setup_django``.

1. ``DJANGO_SETTINGS_MODULE`` is set to the settings given (the project's folder must be the
   worker's current directory or on ``PYTHONPATH``), and ``django.setup()`` runs: the
   installed apps are ready, ``dbtask.contrib.django`` among them connects the client on first
   use with the ``DBTASK_*`` settings (for tasks that send tasks).
2. The ``tasks`` module of every installed app that has one is imported, as Celery's
   ``autodiscover_tasks`` does: its ``@task`` functions are the tasks this worker runs, with
   the modules given with ``-A`` (imported after). An error inside a ``tasks`` module stops
   the start with its traceback; an app without one is skipped.
3. Database connections: a task that finds its thread's connection broken, or older than
   ``CONN_MAX_AGE``, gets a new one, as in a request (Celery's Django fix-up does the same):
   ``close_if_unusable_or_obsolete()`` on each connection of the thread before and after
   every ``def`` task. Connections opened while importing are closed before tasks run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

from ... import signals

__all__ = ["setup"]

TASKS_MODULE = "tasks"


def setup(settings_module: str) -> list[str]:
    """Sets Django up with ``settings_module``, imports each installed app's ``tasks`` module
    and returns their names; connects the database hygiene around tasks."""
    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    import django
    from django.apps import apps
    from django.db import connections

    django.setup()
    imported = []
    for config in apps.get_app_configs():
        name = f"{config.name}.{TASKS_MODULE}"
        # find_spec, not a caught ImportError: an ImportError raised inside an app's tasks
        # module is a bug to show, not an absent module to skip.
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name)
        imported.append(name)
    for connection in connections.all(initialized_only=True):
        connection.close()
    signals.task_prerun.connect(_close_stale_connections)
    signals.task_postrun.connect(_close_stale_connections)
    return imported


def _close_stale_connections(sender: Any = None, **kwargs: Any) -> None:
    # Django connections belong to a thread: these are the ones of the thread running the
    # task. An async def task runs on the asyncio loop, where the ORM is not used directly.
    if sender is not None and getattr(sender, "is_async", False):
        return
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        connection.close_if_unusable_or_obsolete()
