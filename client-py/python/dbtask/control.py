"""``dbtask.control``: tell workers what to do, as ``dbtask control`` and ``dbtask purge`` do.

``shutdown`` and ``rate_limit`` send one request to every worker (or only to ``worker``) and
return the replies that came within ``timeout`` seconds, one dict per worker (``"ok": True``,
or an ``"error"``). ``purge`` removes a queue's waiting tasks from the task stream and returns
how many. Each comes as a coroutine and as a blocking ``_sync`` twin. Servers and credentials
as in ``dbtask.inspect``. See docs/operations.md.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from ._client import PathArg
from ._control import DEFAULT_TIMEOUT, admin, gather

__all__ = ["shutdown", "shutdown_sync", "rate_limit", "rate_limit_sync", "purge", "purge_sync"]

Reply = dict[str, Any]


def shutdown_sync(*, worker: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """Stops the workers (only ``worker``, a worker id, if given) gracefully, as SIGTERM does:
    no more fetching, running tasks finish within the shutdown timeout, the rest go back to
    NATS. Returns the replies of the workers that were told."""
    return gather("shutdown", {}, timeout=timeout, worker=worker, nats_url=nats_url, security=security)


def rate_limit_sync(task: str, rate: str, *, worker: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """Sets task ``task``'s rate limit on every worker: ``"10/s"``, ``"100/m"``, ``"1000/h"``,
    or ``"0"`` for none. The budget stays one for the whole cluster; each worker that hears it
    keeps it in Redis, so workers started later apply it too, and it wins over
    ``@task(rate_limit=...)`` until set again."""
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a task name, not {task!r}")
    if not isinstance(rate, str) or not rate.strip():
        raise ValueError(f"rate must be a rate such as '10/s' (or '0' for none), not {rate!r}")
    return gather("rate_limit", {"task": task, "rate": rate}, timeout=timeout, worker=worker, nats_url=nats_url, security=security)


def purge_sync(queue: str, *, nats_url: Optional[str] = None, **security: PathArg) -> int:
    """Deletes every task waiting in ``queue`` (all priority levels) from the task stream and
    returns how many. Tasks already delivered to a worker, and tasks waiting for their eta, are
    not touched."""
    return admin(nats_url, **security).purge_queue(queue)


async def shutdown(*, worker: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """``shutdown_sync``, awaitable."""
    return await asyncio.to_thread(shutdown_sync, worker=worker, timeout=timeout, nats_url=nats_url, **security)


async def rate_limit(task: str, rate: str, *, worker: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """``rate_limit_sync``, awaitable."""
    return await asyncio.to_thread(rate_limit_sync, task, rate, worker=worker, timeout=timeout, nats_url=nats_url, **security)


async def purge(queue: str, *, nats_url: Optional[str] = None, **security: PathArg) -> int:
    """``purge_sync``, awaitable."""
    return await asyncio.to_thread(purge_sync, queue, nats_url=nats_url, **security)
