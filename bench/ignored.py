"""W2 with and without `ignore_result` (issue 19), for bench/run.py.

A task with `ignore_result=True` leaves no record, so its drain cannot be timed by reading
records as W2 is. Both variants here are timed the same way instead: N `add` tasks are queued,
a worker is started, and the drain ends when the task stream holds no message (the work-queue
stream drops a message once it is acked, and the worker acks after storing the outcome, if
any). The server's monitoring endpoint (`/jsz`) says how many messages the stream holds. The
two variants run one after the other in each repetition, on the same servers, so their ratio
is the speed-up of not storing results.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any, Callable

from bench_tasks import add, add_quiet
from e2e_support import free_port

POLL = 0.002


def monitor_config() -> tuple[str, str]:
    """A nats-server config that serves monitoring on a free port, and that port's URL."""
    port = free_port()
    return f'http: "127.0.0.1:{port}"\n', f"http://127.0.0.1:{port}"


def stream_messages(monitor: str) -> int:
    with urllib.request.urlopen(f"{monitor}/jsz", timeout=5) as answer:
        return int(json.load(answer).get("messages", 0))


def wait_empty(monitor: str, timeout: float) -> float:
    """Waits until the task stream holds no message; returns when it was seen empty."""
    deadline = time.perf_counter() + timeout
    while stream_messages(monitor):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the task stream still holds messages after {timeout} s")
        time.sleep(POLL)
    return time.perf_counter()


async def w2_ignore(
    n: int, monitor: str, redis: Any, start_worker: Callable[[], Any], timeout: float
) -> dict[str, float]:
    """W2 drained with results stored, then with `ignore_result=True`: tasks/s from the
    worker's start until the stream is empty, and the count of records the second left."""
    fig: dict[str, float] = {}
    for key, task in (("W2q kept", add), ("W2q ignored", add_quiet)):
        redis.call("FLUSHALL")
        await task.apply_many([(i, i) for i in range(n)])
        worker = start_worker()
        done = wait_empty(monitor, timeout)
        fig[key] = n / (done - worker.spawned)
        worker.stop()
    fig["W2q records"] = float(redis.call("DBSIZE"))
    fig["W2q speed-up"] = fig["W2q ignored"] / fig["W2q kept"]
    return fig
