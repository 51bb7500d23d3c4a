"""Task options: which exist, and every check of their values, in one place.

The names a call accepts:

- :data:`TASK_OPTIONS`: ``@task(...)``: ``name``, ``queue`` and the keys of
  :class:`TaskOptions`, which are stored in ``Task.options`` for the worker;
- :data:`APPLY_OPTIONS`: ``Task.apply_async(...)`` (and ``apply_async_sync``);
- :data:`MANY_OPTIONS`: ``Task.apply_many(...)`` (and ``apply_many_sync``);
- :data:`SIGNATURE_OPTIONS`: the options a workflow signature carries: ``sig.set(...)``,
  ``Signature(..., options={...})``, ``Chain/Group/Chord(..., **options)``;
- :data:`SIGNATURE_APPLY_OPTIONS`: ``Signature.apply_async(...)`` (and ``apply_async_sync``).

A name outside its set raises ``TypeError`` naming the valid ones: a Celery option such as
``acks_late`` or ``serializer`` means nothing here, and accepting it silently would run the
task differently from what its author expects. A bad value raises ``ValueError`` (``TypeError``
for a value of the wrong type) at decoration or at the call, before anything is sent; the
compiled client and the worker check again, so a bad value never reaches a queue.

Pure Python, importable without the compiled module: the worker imports the user's modules,
whose ``@task`` runs these checks.
"""

from __future__ import annotations

import difflib
import math
import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, NoReturn, TypedDict

MAX_PRIORITY = 9
"""Highest priority: ``apply_async(priority=9)`` runs before lower levels on a backlog. The
range is 0 to 9 everywhere: the protocol crate (``MAX_PRIORITY``) refuses a message above it,
and the worker keeps one consumer per level."""

DEFAULT_PRIORITY = 5
"""The level of a task sent without a priority."""

DEFAULT_QUEUE = "default"
"""The queue of a task declared without one."""

MAX_RETRIES_LIMIT = 2**32 - 1
"""The largest ``max_retries`` the worker reads (an unsigned 32-bit count)."""


class TaskOptions(TypedDict, total=False):
    """The per-task options stored in ``Task.options`` and read by the worker. A key left
    out, or set to ``None``, means the default.

    - ``max_retries``: retries after the first attempt (default 3);
    - ``retry_delay``: seconds before a retry (default 1);
    - ``retry_backoff``: ``True``, or a factor in seconds: the delay is factor * 2**retries;
    - ``retry_backoff_max``: the longest backoff delay, in seconds (default 600);
    - ``retry_jitter``: a random delay between 0 and the backoff delay (default True);
    - ``autoretry_for``: exception types (one, a tuple or a list) retried automatically;
    - ``bind``: the function gets ``self`` (``self.request``, ``self.retry()``);
    - ``track_started``: record STARTED when a worker starts the task;
    - ``time_limit`` / ``soft_time_limit``: positive seconds (default: the worker's);
    - ``rate_limit``: ``"100/s"``, ``"10/m"``, ``"1000/h"`` or a count per second, for all
      the workers together;
    - ``priority``: the level of ``delay()`` and of ``apply_async()`` without ``priority``,
      0 to 9 (9 runs first; default 5);
    - ``ignore_result``: store no record when the task succeeds (``get()`` then raises
      :class:`dbtask.ResultIgnored` at once);
    - ``store_errors_even_if_ignored``: with ``ignore_result``, still record failures (default
      True);
    - ``result_ttl``: seconds this task's records live in Redis (default: the worker's).
    """

    max_retries: int
    retry_delay: float
    retry_backoff: bool | float
    retry_backoff_max: float
    retry_jitter: bool
    autoretry_for: type[BaseException] | tuple[type[BaseException], ...] | list[type[BaseException]]
    bind: bool
    track_started: bool
    time_limit: float
    soft_time_limit: float
    rate_limit: str | int
    priority: int
    ignore_result: bool
    store_errors_even_if_ignored: bool
    result_ttl: int


STORED_OPTIONS: frozenset[str] = frozenset(TaskOptions.__optional_keys__)
"""The keys ``Task.options`` may hold."""

TASK_OPTIONS: frozenset[str] = STORED_OPTIONS | {"name", "queue", "base"}
"""The keywords of ``@task(...)``."""

APPLY_OPTIONS: frozenset[str] = frozenset(
    {
        "args",
        "kwargs",
        "countdown",
        "eta",
        "expires",
        "queue",
        "task_id",
        "link",
        "link_error",
        "priority",
        "ignore_result",
    }
)
"""The keywords of ``Task.apply_async``."""

MANY_OPTIONS: frozenset[str] = frozenset({"countdown", "eta", "expires", "queue", "priority"})
"""The keywords of ``Task.apply_many`` (after the argument lists)."""

SIGNATURE_OPTIONS: frozenset[str] = frozenset({"queue", "countdown", "priority", "task_id", "immutable"})
"""The options of a workflow signature (its ``"options"`` dict)."""

SIGNATURE_APPLY_OPTIONS: frozenset[str] = (SIGNATURE_OPTIONS - {"immutable"}) | {"args", "kwargs", "link", "link_error"}
"""The keywords of ``Signature.apply_async``."""

_BOOL_OPTIONS = ("bind", "track_started", "retry_jitter", "ignore_result", "store_errors_even_if_ignored")

MAX_RESULT_TTL = 2**32 - 1
"""The longest ``result_ttl`` in seconds (the worker reads an unsigned 32-bit count)."""


# -- names -----------------------------------------------------------------------------------


def refuse_unknown(where: str, given: Iterable[str], valid: frozenset[str], kind: str = "option") -> NoReturn:
    """Raises the ``TypeError`` of unknown option names: ``task() got an unknown option
    'bogus'; valid options: ...`` (with a "did you mean" for a near miss)."""
    unknown = sorted(set(given) - valid)
    names = ", ".join(repr(n) for n in unknown)
    what = f"an unknown {kind} {names}" if len(unknown) == 1 else f"unknown {kind}s {names}"
    hint = ""
    if len(unknown) == 1:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    raise TypeError(f"{where} got {what}{hint}; valid {kind}s: {', '.join(sorted(valid))}")


def check_names(where: str, given: Mapping[str, Any], valid: frozenset[str], kind: str = "option") -> None:
    """``TypeError`` naming the valid options when ``given`` has a key outside ``valid``."""
    if not given.keys() <= valid:
        refuse_unknown(where, given, valid, kind)


# -- values ----------------------------------------------------------------------------------

# Same rules as the protocol crate (validate_queue / validate_task_name), checked at
# decoration time so that a typo fails at import, not at the first publish.
_QUEUE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_TASK_NAME_LEN = 200

#: Task names already found valid: a workflow of 1,000 ``add.s()`` checks the same name 1,000
#: times, character by character. Bounded, in case names are made up on the fly.
_VALID_NAMES: set[str] = set()


def check_queue(queue: object) -> str:
    """A queue name: 1 to 64 characters among A-Z a-z 0-9 _ -; else ValueError."""
    if not isinstance(queue, str) or not _QUEUE_RE.fullmatch(queue):
        raise ValueError(f"invalid queue name {queue!r}: use 1 to 64 characters among A-Z a-z 0-9 _ -")
    return queue


def check_task_name(name: object) -> str:
    """A task name: 1 to 200 printable characters without spaces; else ValueError."""
    if isinstance(name, str) and name in _VALID_NAMES:
        return name
    if (
        not isinstance(name, str)
        or not name
        or len(name) > _MAX_TASK_NAME_LEN
        or any(c.isspace() or not c.isprintable() for c in name)
    ):
        raise ValueError(f"invalid task name {name!r}: use 1 to 200 printable characters without spaces")
    if len(_VALID_NAMES) < 4096:
        _VALID_NAMES.add(name)
    return name


def seconds(value: object, what: str) -> float:
    """A finite number of seconds as a float: TypeError for a non-number (``bool`` included),
    ValueError for NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    secs = float(value)
    if not math.isfinite(secs):
        raise ValueError(f"{what} must be a finite number of seconds, not {value!r}")
    return secs


_RATE_RE = re.compile(r"\s*([0-9]+)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour)\s*)?")


def check_rate_limit(value: Any) -> str:
    """``"100/s"``, ``"10/m"``, ``"1000/h"`` (or a bare count: per second); else ValueError.
    The same grammar as the protocol crate's ``Rate::parse``."""
    match = _RATE_RE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return f"{value}/s"
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f'invalid rate_limit {value!r}: use "<count>/s", "<count>/m" or "<count>/h" '
            'with a whole count of at least 1, e.g. "100/s"'
        )
    return value.strip()  # type: ignore[no-any-return]


def check_priority(value: Any) -> int | None:
    """``None`` or an int from 0 to 9 (9 runs first); else ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise ValueError(f"priority must be an integer from 0 to {MAX_PRIORITY} (highest), not {value!r}")
    return value


def check_time_limits(options: Mapping[str, Any]) -> None:
    """``time_limit`` / ``soft_time_limit``: positive seconds (None: the worker's default)."""
    for key in ("time_limit", "soft_time_limit"):
        value = options.get(key)
        if value is not None and not seconds(value, key) > 0:
            raise ValueError(f"{key} must be a positive number of seconds, not {value!r}")


def check_retry_options(options: Mapping[str, Any]) -> None:
    """``max_retries``, ``retry_delay``, ``retry_backoff``, ``retry_backoff_max`` and
    ``autoretry_for`` (None: the default)."""
    max_retries = options.get("max_retries")
    if max_retries is not None and (
        isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= MAX_RETRIES_LIMIT
    ):
        raise ValueError(f"max_retries must be an int >= 0, not {max_retries!r}")
    for key in ("retry_delay", "retry_backoff_max"):
        value = options.get(key)
        if value is not None and seconds(value, key) < 0:
            raise ValueError(f"{key} must be >= 0, not {value!r}")
    backoff = options.get("retry_backoff")
    if backoff is not None and not isinstance(backoff, bool):
        if seconds(backoff, "retry_backoff") < 0:
            raise ValueError(f"retry_backoff must be True, False or a factor in seconds >= 0, not {backoff!r}")
    autoretry = options.get("autoretry_for")
    if autoretry is not None:
        types = autoretry if isinstance(autoretry, (tuple, list)) else (autoretry,)
        for t in types:
            if not (isinstance(t, type) and issubclass(t, BaseException)):
                raise TypeError(f"autoretry_for must hold exception types, not {t!r}")


def task_options(options: Mapping[str, Any], where: str = "Task()") -> dict[str, Any]:
    """The options to store in ``Task.options``: names and values checked, ``None`` values
    left out (the default), ``rate_limit`` in its text form."""
    check_names(where, options, STORED_OPTIONS)
    out = {k: v for k, v in options.items() if v is not None}
    check_retry_options(out)
    check_time_limits(out)
    for key in _BOOL_OPTIONS:
        if key in out and not isinstance(out[key], bool):
            raise TypeError(f"{key} must be True or False, not {out[key]!r}")
    if "rate_limit" in out:
        out["rate_limit"] = check_rate_limit(out["rate_limit"])
    if "priority" in out:
        check_priority(out["priority"])
    if "result_ttl" in out:
        check_result_ttl(out["result_ttl"])
    return out


def check_result_ttl(value: Any) -> int:
    """Whole seconds from 1 to 2**32-1; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RESULT_TTL:
        raise ValueError(f"result_ttl must be a whole number of seconds >= 1, not {value!r}")
    return value


# -- when to run -----------------------------------------------------------------------------


def _timestamp(value: datetime) -> float:
    # As in Celery, a naive datetime is UTC.
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


# The latest eta NATS can schedule a task at (9999-12-31T23:59:59Z): the protocol's MAX_ETA.
MAX_ETA = 253_402_300_799.0


def _countdown(value: object, now: float) -> float:
    """A countdown in seconds whose eta NATS can schedule; ValueError otherwise."""
    secs = seconds(value, "countdown")
    if now + secs > MAX_ETA:
        raise ValueError(
            f"countdown={value!r} seconds ends after the year 9999, the last time NATS can schedule a task at"
        )
    return secs


def schedule(
    countdown: float | None, eta: datetime | None, expires: float | datetime | None
) -> tuple[float | None, float | None]:
    """``countdown`` (seconds from now) or ``eta`` (a datetime, naive means UTC), and
    ``expires`` (seconds from now or a datetime), as (eta, expires) in Unix seconds."""
    if countdown is None and eta is None and expires is None:
        return None, None
    now = time.time()
    eta_ts: float | None = None
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    if countdown is not None:
        eta_ts = now + _countdown(countdown, now)
    elif eta is not None:
        if not isinstance(eta, datetime):
            raise TypeError(f"eta must be a datetime, not {type(eta).__name__}")
        eta_ts = _timestamp(eta)
    expires_ts: float | None = None
    if expires is not None:
        if isinstance(expires, datetime):
            expires_ts = _timestamp(expires)
        else:
            expires_ts = now + seconds(expires, "expires")
    return eta_ts, expires_ts


# -- workflow signatures ---------------------------------------------------------------------


def signature_options(options: Mapping[str, Any], where: str = "Signature()") -> dict[str, Any]:
    """A signature's options checked, ``None`` values and ``immutable=False`` left out."""
    check_names(where, options, SIGNATURE_OPTIONS, kind="signature option")
    out = {k: v for k, v in options.items() if v is not None}
    if "queue" in out:
        check_queue(out["queue"])
    if "countdown" in out:
        out["countdown"] = _countdown(out["countdown"], time.time())
    if "priority" in out:
        check_priority(out["priority"])
    if "task_id" in out and (not isinstance(out["task_id"], str) or not out["task_id"]):
        raise ValueError(f"task_id must be a non-empty string, not {out['task_id']!r}")
    if not out.get("immutable", True):
        del out["immutable"]
    return out
