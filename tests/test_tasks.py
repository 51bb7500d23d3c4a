"""A task published by the client runs in a worker and its result comes back."""

from __future__ import annotations

import asyncio

from e2e_tasks import add, async_greet, async_mul, greet


async def test_sync_task_returns_its_result(worker, client):
    result = await add.delay(2, 3)
    assert isinstance(result.id, str) and result.id
    assert await result.get(timeout=15) == 5


async def test_async_task_returns_its_result(worker, client):
    result = await async_mul.delay(6, 7)
    assert await result.get(timeout=15) == 42


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


async def test_calling_a_task_runs_it_locally():
    # Like Celery: no client, no worker needed.
    assert add(1, 2) == 3
    assert await async_mul(3, 4) == 12
