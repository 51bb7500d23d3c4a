"""``dbtask.inspect``: ask every worker what it is doing, as ``dbtask inspect`` does.

Each function sends one request to every worker (or only to ``worker``, a worker id such as
``"host:1234"``) and returns the replies that came within ``timeout`` seconds, one dict per
worker with its id under ``"worker"``, sorted by it. A worker that does not answer in time is
simply missing. Each comes as a coroutine and as a blocking ``_sync`` twin::

    for reply in dbtask.inspect.active_sync():
        print(reply["worker"], [t["task"] for t in reply["tasks"]])

``scheduled`` reads the task stream instead: tasks waiting for their eta, from the server.

The server is ``nats_url``, else ``$DBTASK_NATS_URL``, else ``nats://127.0.0.1:4222``; TLS and
credentials as for ``dbtask.init`` (``nats_tls_ca=``... keywords, else ``$DBTASK_NATS_*``).
See docs/operations.md.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

from ._client import PathArg
from ._control import DEFAULT_TIMEOUT, admin, gather

__all__ = [
    "ping",
    "ping_sync",
    "stats",
    "stats_sync",
    "active",
    "active_sync",
    "reserved",
    "reserved_sync",
    "registered",
    "registered_sync",
    "queues",
    "queues_sync",
    "scheduled",
    "scheduled_sync",
]

Reply = dict[str, Any]


def _ask(command: str, timeout: float, worker: Optional[str], nats_url: Optional[str], security: dict[str, PathArg]) -> list[Reply]:
    return gather(command, {}, timeout=timeout, worker=worker, nats_url=nats_url, security=security)


def ping_sync(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """The workers that answer: ``{"worker": id, "ok": "pong"}`` each."""
    return _ask("ping", timeout, worker, nats_url, security)


def stats_sync(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """Each worker's figures: ``uptime``, ``processed`` (by state, and ``total``), ``pool``,
    ``concurrency``, ``prefetch``, ``queues``, ``running``, ``prefetched``, ``rss_bytes``,
    ``loadavg``, ``events``, ``rate_limit_overrides``, ``hostname``, ``pid``, ``version``."""
    return _ask("stats", timeout, worker, nats_url, security)


def active_sync(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """Each worker's running tasks under ``"tasks"``: ``id``, ``task``, ``queue``, ``attempt``,
    ``received``, ``started`` (Unix seconds) and ``runtime`` (seconds so far)."""
    return _ask("active", timeout, worker, nats_url, security)


def reserved_sync(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """Each worker's tasks received and waiting for a free slot (prefetched) under ``"tasks"``."""
    return _ask("reserved", timeout, worker, nats_url, security)


def registered_sync(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """Each worker's task names under ``"tasks"``, sorted."""
    return _ask("registered", timeout, worker, nats_url, security)


def queues_sync(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """Each worker's queues under ``"queues"``: ``queue``, ``pending`` (messages not yet
    delivered, all priority levels) and ``levels`` (``priority``, ``pending``, ``ack_pending``
    of each level's JetStream consumer)."""
    return _ask("queues", timeout, worker, nats_url, security)


def scheduled_sync(*, limit: int = 100, start: int = 1, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """Tasks waiting in the task stream for their eta (countdown, eta, retry delays), oldest
    published first, at most ``limit`` from stream sequence ``start`` on (page on with the last
    ``sequence`` + 1): ``sequence``, ``id``, ``task``, ``queue``, ``eta`` (Unix seconds),
    ``priority``. Read from the server, nothing consumed. Periodic schedules are left out
    (``dbtask schedule list`` shows them)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a whole number >= 1, not {limit!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ValueError(f"start must be a stream sequence >= 1, not {start!r}")
    out: list[Reply] = []
    for seq, subject, headers, body in admin(nats_url, **security).scheduled(start, limit):
        if subject.startswith("dbtask.sched.~"):
            continue
        try:
            message = json.loads(body)
        except ValueError:
            message = {}
        if not isinstance(message, dict):
            message = {}
        parts = subject.split(".")
        out.append(
            {
                "sequence": seq,
                "id": message.get("id") or headers.get("Dbtask-Id"),
                "task": message.get("task") or headers.get("Dbtask-Task"),
                "queue": message.get("queue") or (parts[2] if len(parts) > 3 else None),
                "eta": message.get("eta"),
                "priority": message.get("priority"),
                "schedule": headers.get("Nats-Schedule"),
            }
        )
    return out


async def ping(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """``ping_sync``, awaitable."""
    return await asyncio.to_thread(ping_sync, timeout=timeout, worker=worker, nats_url=nats_url, **security)


async def stats(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """``stats_sync``, awaitable."""
    return await asyncio.to_thread(stats_sync, timeout=timeout, worker=worker, nats_url=nats_url, **security)


async def active(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """``active_sync``, awaitable."""
    return await asyncio.to_thread(active_sync, timeout=timeout, worker=worker, nats_url=nats_url, **security)


async def reserved(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """``reserved_sync``, awaitable."""
    return await asyncio.to_thread(reserved_sync, timeout=timeout, worker=worker, nats_url=nats_url, **security)


async def registered(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """``registered_sync``, awaitable."""
    return await asyncio.to_thread(registered_sync, timeout=timeout, worker=worker, nats_url=nats_url, **security)


async def queues(*, timeout: float = DEFAULT_TIMEOUT, worker: Optional[str] = None, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """``queues_sync``, awaitable."""
    return await asyncio.to_thread(queues_sync, timeout=timeout, worker=worker, nats_url=nats_url, **security)


async def scheduled(*, limit: int = 100, start: int = 1, nats_url: Optional[str] = None, **security: PathArg) -> list[Reply]:
    """``scheduled_sync``, awaitable."""
    return await asyncio.to_thread(scheduled_sync, limit=limit, start=start, nats_url=nats_url, **security)
