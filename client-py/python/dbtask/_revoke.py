"""Revocation: ``dbtask.revoke(task_id)`` and ``AsyncResult.revoke()``.

A revoked task id is kept in Redis (sorted set ``dbtask:{revoke}:ids``, for ``ttl`` seconds) and
announced to the running workers (pub/sub ``dbtask:{revoke}``); workers load the set when they
start, so a revocation survives worker restarts and reaches workers started later. A revoked
task never starts: whichever worker receives it records REVOKED and drops it, also when it was
waiting on a countdown. ``terminate=True`` also stops it if it is running: an ``async def`` task
is cancelled, a sync task gets :class:`dbtask.Terminated` raised in its thread (at its next
Python bytecode) and its thread is abandoned. Its state becomes REVOKED and ``get()`` raises
:class:`dbtask.TaskRevoked`. A task that already finished keeps its result.
"""

from __future__ import annotations

import math

from . import _client

__all__ = ["revoke", "revoke_sync", "DEFAULT_REVOKE_TTL"]

#: How long a revocation is remembered by default: 7 days. Revoke a task scheduled further
#: ahead with a larger ``ttl``.
DEFAULT_REVOKE_TTL = 7 * 24 * 3600.0


def _check(task_id: object, ttl: object) -> tuple[str, float]:
    if not isinstance(task_id, str) or not task_id:
        raise ValueError(f"task id must be a non-empty string, not {task_id!r}")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds, not {type(ttl).__name__}")
    if not (math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return task_id, float(ttl)


async def revoke(task_id: str, terminate: bool = False, *, ttl: float = DEFAULT_REVOKE_TTL) -> None:
    """Revokes the task ``task_id`` on every worker, for ``ttl`` seconds; with
    ``terminate=True`` a running task is stopped too. Returns once Redis has the revocation."""
    tid, secs = _check(task_id, ttl)
    await _client.current().revoke(tid, bool(terminate), secs)


def revoke_sync(task_id: str, terminate: bool = False, *, ttl: float = DEFAULT_REVOKE_TTL) -> None:
    """Blocking form of :func:`revoke`."""
    tid, secs = _check(task_id, ttl)
    _client.current().revoke_sync(tid, bool(terminate), secs)
