"""Periodic tasks, kept and fired by NATS itself (nats-server 2.14 or later): no beat process.

``await dbtask.schedule(name, sig, every=30)`` (or ``cron="0 * * * *"``) creates or replaces the
schedule ``name``; ``dbtask.periodic(name, sig, ...)`` at module level in a task module declares
one that every worker importing the module applies when it starts (unchanged schedules are left
alone, changed ones replaced; removing a declaration does not delete its schedule, the command
line does: ``dbtask schedule remove NAME``). See docs/periodic.md.

The checks made here are the ones Python can make without the compiled module (which a worker
importing a task module never loads); the values (``every``, ``cron``, ``tz``, names) are
checked in Rust by ``dbtask._dbtask`` for :func:`schedule` and by the worker for
:func:`periodic`. Both raise ``ValueError`` saying what is wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from . import _client
from ._canvas import Signature
from ._result import AsyncResult

#: The schedules declared with :func:`periodic` by the modules imported so far: name ->
#: declaration (JSON). Read once by the worker at start-up (``dbtask._worker.PERIODIC``).
PERIODIC: dict[str, str] = {}

#: How long the running mark of ``skip_if_running=True`` lasts at most (seconds): a tick that
#: runs longer lets the next one start, and a worker lost mid-tick blocks no tick beyond it.
SKIP_IF_RUNNING_TTL = 3600


def _seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds or a timedelta, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
    return float(value)


def _signature(sig: Any) -> Signature:
    if isinstance(sig, Signature):
        pass
    elif isinstance(sig, Mapping):
        sig = Signature.from_dict(sig)
    else:
        raise ValueError(f"a schedule sends a task signature such as add.s(1, 2), not {sig!r}")
    if sig.kind != "task":
        raise ValueError(f"a schedule sends one task signature, not a {sig.kind}: schedule a task that starts the {sig.kind}")
    if sig.get("link") or sig.get("link_error"):
        raise ValueError("a scheduled signature cannot have link or link_error callbacks")
    options = sig.get("options") or {}
    for option in ("task_id", "countdown"):
        if option in options:
            why = "each tick's id is derived from the schedule and the tick time" if option == "task_id" else "the schedule decides when"
            raise ValueError(f"a scheduled signature cannot set {option}: {why}")
    return sig


def declaration(
    name: str,
    sig: Any,
    *,
    every: float | timedelta | None = None,
    cron: str | None = None,
    tz: str = "UTC",
    expires: float | timedelta | None = None,
    catch_up: str = "latest",
    skip_if_running: bool | float = False,
) -> str:
    """The JSON of a schedule (what the compiled client and the worker check and store). Its
    keywords are those of :func:`schedule`, :func:`schedule_sync` and :func:`periodic`; another
    one is a ``TypeError``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a schedule name is a non-empty string, not {name!r}")
    s = _signature(sig)
    if cron is not None and not isinstance(cron, str):
        raise ValueError(f"cron must be a crontab line (a string), not {cron!r}")
    if not isinstance(tz, str):
        raise ValueError(f"tz must be an IANA time zone name such as 'Europe/Paris', not {tz!r}")
    if catch_up not in ("latest", "all"):
        raise ValueError(f"catch_up must be 'latest' or 'all', not {catch_up!r}")
    if skip_if_running is True:
        running: float | None = float(SKIP_IF_RUNNING_TTL)
    elif skip_if_running is False or skip_if_running is None:
        running = None
    else:
        running = _seconds("skip_if_running", skip_if_running)
    options = s.get("options") or {}
    try:
        args = json.dumps(s.args, allow_nan=False)
        kwargs = json.dumps(s.kwargs, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the arguments of a scheduled signature must be JSON: {e}") from None
    spec = {
        "name": name,
        "task": s.name,
        "queue": options.get("queue"),
        "priority": options.get("priority"),
        "every": _seconds("every", every),
        "cron": cron,
        "tz": tz,
        "expires": _seconds("expires", expires),
        "catch_up": catch_up,
        "skip_if_running": running,
    }
    body = json.dumps({k: v for k, v in spec.items() if v is not None})
    # The arguments as json.dumps wrote them: a worker and a client declaring the same schedule
    # write the same text, so an unchanged schedule is recognised and left alone.
    return body[:-1] + f', "args": {args}, "kwargs": {kwargs}}}'


def periodic(name: str, sig: Any, **options: Any) -> None:
    """Declares the schedule ``name`` in a task module, like Celery's ``beat_schedule``: each
    worker importing the module creates it, or replaces it if it changed, when it starts.
    Takes the keywords of :func:`schedule`. A second declaration of one name replaces the first."""
    if (options.get("every") is None) == (options.get("cron") is None):
        raise ValueError("give every= (seconds) or cron= (a crontab line), exactly one of them")
    PERIODIC[name] = declaration(name, sig, **options)


def _schedules() -> Any:
    from . import _dbtask  # loaded with the client by init()

    return _dbtask.Schedules(_client.current())


async def schedule(name: str, sig: Any, **options: Any) -> None:
    """Creates or replaces the schedule ``name``, which sends ``sig`` (``add.s(1, 2)``, with its
    queue and priority) every ``every`` seconds (a number or a ``timedelta``, whole seconds, 1
    or more) or on ``cron`` (a 5-field crontab line, or 6 fields with seconds first) in the
    IANA zone ``tz``. ``expires``: seconds after its tick that a tick is dropped as REVOKED.
    ``catch_up``: ``"latest"`` runs only the latest of the ticks missed while no worker ran,
    ``"all"`` runs them all. ``skip_if_running``: ``True`` (or a number of seconds the mark
    lasts at most; ``True`` is one hour) does not start a tick while the previous one runs.
    An unchanged schedule is left alone. Raises ``ValueError`` for bad input,
    ``RuntimeError`` for a nats-server older than 2.14."""
    await _schedules().schedule(declaration(name, sig, **options))


def schedule_sync(name: str, sig: Any, **options: Any) -> None:
    """Blocking form of :func:`schedule`."""
    _schedules().schedule_sync(declaration(name, sig, **options))


async def unschedule(name: str) -> bool:
    """Removes the schedule ``name``; ``False`` if there was none. Ticks already queued run."""
    return bool(await _schedules().unschedule(name))


def unschedule_sync(name: str) -> bool:
    """Blocking form of :func:`unschedule`."""
    return bool(_schedules().unschedule_sync(name))


def _listed(text: str) -> list[dict[str, Any]]:
    found = json.loads(text)
    for s in found:
        options = {"queue": s["queue"], "priority": s.get("priority")}
        s["signature"] = Signature(s["task"], s["args"], s["kwargs"], {k: v for k, v in options.items() if v is not None})
    return list(found)


async def schedules() -> list[dict[str, Any]]:
    """Every schedule, by name: ``name``, ``signature`` (what it sends; also as ``task``,
    ``args``, ``kwargs``, ``queue``, ``priority``), ``every`` or ``cron`` (6 fields) and ``tz``,
    ``expires``, ``catch_up``, ``skip_if_running``, ``next_run`` (Unix seconds), and the last
    tick the workers took: ``last_run_id`` (an ``AsyncResult`` id) and ``last_run_at``."""
    return _listed(await _schedules().list())


def schedules_sync() -> list[dict[str, Any]]:
    """Blocking form of :func:`schedules`."""
    return _listed(_schedules().list_sync())


async def run_schedule(name: str) -> AsyncResult:
    """Fires one tick of the schedule ``name`` now (a tick at this second; a second call within
    the same second is the same tick) and returns its result. ``ValueError`` if there is no such
    schedule."""
    return AsyncResult(await _schedules().run(name))


def run_schedule_sync(name: str) -> AsyncResult:
    """Blocking form of :func:`run_schedule`."""
    return AsyncResult(_schedules().run_sync(name))
