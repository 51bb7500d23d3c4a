"""dbtask: a distributed task queue for Python with a Rust engine (NATS JetStream + Redis).

Async first; every coroutine method has a blocking twin with the suffix ``_sync`` for code
without an event loop (scripts, Django or Flask views)::

    import dbtask

    @dbtask.task(queue="math")
    async def add(x: int, y: int) -> int:
        return x + y

    await dbtask.init(nats_url="nats://127.0.0.1:4222", redis_url="redis://127.0.0.1:6379")
    result = await add.delay(1, 2)
    assert await result.get(timeout=10) == 3

    dbtask.init_sync()                       # the same, without asyncio
    add.delay_sync(1, 2).get_sync(timeout=10)

``import dbtask`` and ``@task`` do not load the compiled module; it is loaded by ``init``.
"""

from . import control, inspect, signals
from ._canvas import Chain, Chord, Group, GroupResult, Signature, signature
from ._client import close, close_sync, init, init_sync
from ._context import current_task
from ._errors import (
    ChordError,
    DeadLettered,
    Expired,
    InternalError,
    InvalidArguments,
    MalformedMessage,
    MaxRetriesExceeded,
    RemoteTraceback,
    ResultIgnored,
    Skipped,
    TaskError,
    TaskRevoked,
    TooLarge,
    UnknownTask,
    UnserializableResult,
    WorkerLost,
)
from ._limits import SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from ._periodic import (
    periodic,
    run_schedule,
    run_schedule_sync,
    schedule,
    schedule_sync,
    schedules,
    schedules_sync,
    unschedule,
    unschedule_sync,
)
from ._result import AsyncResult, IgnoredResult
from ._retry import Retry
from ._revoke import revoke, revoke_sync
from ._task import AsyncTask, Task, task

__all__ = [
    "task",
    "Task",
    "AsyncTask",
    "AsyncResult",
    "IgnoredResult",
    "ResultIgnored",
    "current_task",
    "signals",
    "inspect",
    "control",
    "init",
    "init_sync",
    "close",
    "close_sync",
    "TaskError",
    "UnknownTask",
    "InvalidArguments",
    "MalformedMessage",
    "UnserializableResult",
    "TooLarge",
    "TaskRevoked",
    "Expired",
    "Skipped",
    "MaxRetriesExceeded",
    "DeadLettered",
    "InternalError",
    "WorkerLost",
    "RemoteTraceback",
    "Retry",
    "revoke",
    "revoke_sync",
    "SoftTimeLimitExceeded",
    "TimeLimitExceeded",
    "Terminated",
    "Signature",
    "signature",
    "Chain",
    "Group",
    "Chord",
    "GroupResult",
    "ChordError",
    "periodic",
    "schedule",
    "schedule_sync",
    "unschedule",
    "unschedule_sync",
    "schedules",
    "schedules_sync",
    "run_schedule",
    "run_schedule_sync",
]
