"""A task published by the client runs in a worker and its result comes back."""

from __future__ import annotations

import asyncio
import os
import sys

from e2e_tasks import add, async_greet, async_mul, async_sleep_then, async_timers, greet, sleep_then


async def test_sync_task_returns_its_result(worker, client):
    result = await add.delay(2, 3)
    assert isinstance(result.id, str) and result.id
    assert await result.get(timeout=15) == 5


async def test_async_task_returns_its_result(worker, client):
    result = await async_mul.delay(6, 7)
    assert await result.get(timeout=15) == 42


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


async def test_async_timers_fire_when_due_never_before(worker, client):
    # The worker's loop waits on epoll with nanosecond timeouts (epoll_pwait2, Linux 5.11+)
    # instead of the stdlib's whole milliseconds: a timer must still never fire early, and
    # socket readiness must still wake the loop.
    delays = [0.0005, 0.002, 0.0103, 0.02]
    result = await async_timers.delay(delays)
    report = await result.get(timeout=15)
    assert [d for d, _, _ in report["timers"]] == delays
    for delay, slept, timed_out in report["timers"]:
        # loop.time() may run up to its clock resolution (1 ns) behind a timer's due time.
        assert slept >= delay - 1e-6, report
        assert timed_out >= delay - 1e-6, report
    assert report["received"] == "x"
    if sys.platform == "linux" and _kernel_at_least(5, 11):
        assert report["selector"] == "PreciseEpollSelector", report


async def test_kwargs_reach_the_task(worker, client):
    result = await greet.delay("Ada", greeting="Bonjour", punctuation="?")
    assert await result.get(timeout=15) == "Bonjour, Ada?"
    result = await greet.delay(name="Bob")
    assert await result.get(timeout=15) == "Hello, Bob!"


async def test_json_values_round_trip(worker, client):
    result = await async_greet.delay("Zoë", greeting="Grüß dich")
    assert await result.get(timeout=15) == {"text": "Grüß dich Zoë", "parts": ["Grüß dich", "Zoë"]}
    result = await add.delay([1, None], [{"a": 1.5}, True])
    assert await result.get(timeout=15) == [1, None, {"a": 1.5}, True]


async def test_many_tasks_in_flight_at_once(worker, client):
    results = await asyncio.gather(*(add.delay(i, 1) for i in range(50)))
    assert len({r.id for r in results}) == 50
    values = await asyncio.gather(*(r.get(timeout=30) for r in results))
    assert values == [i + 1 for i in range(50)]


async def test_sync_and_async_tasks_mixed_on_few_slots_all_finish(worker_factory, client):
    # Two slots shared by sync tasks (which wait for theirs in the Python threads' queue) and
    # async ones (which wait for theirs in the worker): none is lost, none waits forever.
    worker_factory(concurrency=2)
    calls = []
    for i in range(120):
        if i % 3 == 0:
            calls.append(async_sleep_then.delay(0.01, i))
        elif i % 3 == 1:
            calls.append(sleep_then.delay(0.005, i))
        else:
            calls.append(add.delay(i, 0))
    results = await asyncio.gather(*calls)
    assert await asyncio.gather(*(r.get(timeout=60) for r in results)) == list(range(120))


async def test_calling_a_task_runs_it_locally():
    # Like Celery: no client, no worker needed.
    assert add(1, 2) == 3
    assert await async_mul(3, 4) == 12
