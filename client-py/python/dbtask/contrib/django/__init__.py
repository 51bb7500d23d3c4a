"""dbtask in a Django project.

Add ``"dbtask.contrib.django"`` to ``INSTALLED_APPS`` and set the connection in the settings:

    INSTALLED_APPS = [..., "dbtask.contrib.django"]
    DBTASK_NATS_URL = "nats://nats:4222"
    DBTASK_REDIS_URL = "redis://redis:6379"

Every keyword of :func:`dbtask.init` is a setting ``DBTASK_<KEYWORD>`` (``DBTASK_TIMEOUT``,
``DBTASK_MESSAGE_KEY``, ``DBTASK_NATS_TLS_CA``...); one left unset falls back to the
environment variable of the same name, as ``init`` does. The client connects on first use
(``delay_sync()``, ``get_sync()``...), in each process: management commands that send no task
never connect, and a process forked after connecting (a preloaded WSGI server's workers)
connects again on its first use. ``DBTASK_CONNECT_ON_READY = True`` connects when the app is
ready instead, so that a server that cannot be reached fails the start.

``task.delay_on_commit(...)`` and ``task.apply_async_on_commit(...)`` send a task once the
current transaction commits (nothing is sent when it rolls back). ``dbtask-worker --django
myproject.settings`` sets Django up and imports the ``tasks`` module of every installed app.
"""

from __future__ import annotations

import inspect
import os
import threading
from typing import Any, Callable

from ... import _client

__all__ = ["SETTINGS", "init_options", "connect", "on_commit"]

# The keywords of dbtask.init, each read from the Django setting DBTASK_<KEYWORD>.
_INIT_KEYWORDS = tuple(inspect.signature(_client.init_sync).parameters)
CONNECT_ON_READY = "DBTASK_CONNECT_ON_READY"
SETTINGS: tuple[str, ...] = tuple("DBTASK_" + name.upper() for name in _INIT_KEYWORDS) + (CONNECT_ON_READY,)
"""The Django settings dbtask reads; another ``DBTASK_*`` setting is refused as a typo."""

_connect_lock = threading.Lock()


def init_options() -> dict[str, Any]:
    """The keywords for :func:`dbtask.init` from the Django settings ``DBTASK_*`` that are set.
    Raises ``ImproperlyConfigured`` for a ``DBTASK_*`` setting dbtask does not know."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    unknown = sorted(name for name in dir(settings) if name.startswith("DBTASK_") and name not in SETTINGS)
    if unknown:
        raise ImproperlyConfigured(
            f"unknown dbtask setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
            f"the dbtask settings are {', '.join(SETTINGS)}"
        )
    return {
        name: getattr(settings, "DBTASK_" + name.upper())
        for name in _INIT_KEYWORDS
        if hasattr(settings, "DBTASK_" + name.upper())
    }


def connect() -> None:
    """Connects the process-wide client with the Django settings (``dbtask.init_sync``); does
    nothing when it is connected with them already. Raises ``ConnectionError`` when a server
    cannot be reached."""
    with _connect_lock:
        _client.init_sync(**init_options())


def _connect_on_demand() -> None:
    # Called by dbtask when a call finds no client: a failure is raised to that call.
    with _connect_lock:
        if _client._client is None:
            _client.init_sync(**init_options())


def install() -> None:
    """Makes the first call that needs the client connect it with the Django settings (the
    app's ``ready()`` calls this), and connects now with ``DBTASK_CONNECT_ON_READY``."""
    from django.conf import settings

    options = init_options()  # a typo in a setting fails the start, not the first task
    _client.connect_on_demand = _connect_on_demand
    if getattr(settings, CONNECT_ON_READY, False):
        with _connect_lock:
            _client.init_sync(**options)


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() would stay held in the child for ever.
    global _connect_lock
    _connect_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def on_commit(send: Callable[[], Any], using: str | None = None) -> None:
    """Calls ``send`` once the current transaction of the database ``using`` (default: the
    default database) commits; at once outside a transaction; never if it rolls back."""
    try:
        from django.db import transaction
    except ImportError:
        raise RuntimeError("delay_on_commit and apply_async_on_commit need Django (pip install django)") from None
    transaction.on_commit(send, using=using)
