"""dbtask in a FastAPI (or Starlette) application: connect at start-up, close at shutdown.

    from fastapi import FastAPI
    from dbtask.contrib.fastapi import lifespan

    app = FastAPI(lifespan=lifespan)             # settings from DBTASK_NATS_URL, DBTASK_REDIS_URL...

    app = FastAPI(lifespan=dbtask_lifespan(nats_url="nats://nats:4222", redis_url="redis://redis:6379"))

``dbtask_lifespan(**settings, then=other)`` takes the keywords of :func:`dbtask.init` and, with
``then=``, another lifespan of the application run inside it (dbtask is connected before it starts
and closed after it ends). The client is process-wide, so endpoints just call ``delay()``,
``get()`` and ``progress()``; ``sse_progress(result)`` turns a task's progress into a
server-sent-events stream. Nothing here imports FastAPI: it works with any ASGI app that takes a
``lifespan``.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Optional

import dbtask

__all__ = ["lifespan", "dbtask_lifespan", "sse_progress"]

Lifespan = Callable[[Any], Any]


def dbtask_lifespan(*, then: Optional[Lifespan] = None, **settings: Any) -> Lifespan:
    """A lifespan that ``await dbtask.init(**settings)`` before the application serves (a server
    that cannot be reached fails the start-up, as it should) and ``await dbtask.close()`` after
    it stopped (publishes in flight are awaited). ``then``: the application's own lifespan,
    entered once dbtask is connected; what it yields (a state dict) is passed on."""

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        await dbtask.init(**settings)
        try:
            if then is None:
                yield None
            else:
                async with then(app) as state:
                    yield state
        finally:
            await dbtask.close()

    return run


lifespan = dbtask_lifespan()
"""The lifespan with the settings of the environment (``DBTASK_NATS_URL``, ``DBTASK_REDIS_URL``
and the other ``DBTASK_*`` variables :func:`dbtask.init` reads)."""


async def sse_progress(result: dbtask.AsyncResult[Any], timeout: float | None = None) -> AsyncIterator[str]:
    """Each stored state of ``result`` as a server-sent event (``data: {json}``), from the
    current one to the final one (``AsyncResult.progress()``: no polling). For a
    ``StreamingResponse(sse_progress(r), media_type="text/event-stream")``."""
    async for record in result.progress(timeout):
        yield f"event: {record.get('state', 'PENDING').lower()}\ndata: {json.dumps(record, default=str)}\n\n"
