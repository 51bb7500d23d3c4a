"""Time limits: a soft limit raises dbtask.SoftTimeLimitExceeded inside the task, which can
catch it; the hard limit cancels an async task and abandons a sync one, recorded FAILURE
dbtask.TimeLimitExceeded, and the worker goes on serving."""

from __future__ import annotations

import asyncio

import pytest

import dbtask
from e2e_support import wait_for_lines, wait_until_line
from limit_tasks import (
    async_hard,
    async_long,
    async_soft,
    async_soft_nested,
    quick,
    sync_blocked_in_c,
    sync_hard_no_soft,
    sync_long,
    sync_soft,
    sync_soft_by_default,
    sync_stubborn,
    sync_timed,
)

APP = "limit_tasks"


async def test_sync_task_catches_its_soft_limit_and_returns(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=2)
    marker = tmp_path / "m.txt"
    result = await sync_soft.delay(marker=str(marker))
    assert await result.get(timeout=15) == "cleaned up after: the task ran past its soft time limit"
    assert marker.read_text().splitlines()[1:] == ["soft"]
    assert (await result.info())["state"] == "SUCCESS"


async def test_async_task_catches_its_soft_limit_at_its_await(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=2)
    marker = tmp_path / "m.txt"
    result = await async_soft.delay(marker=str(marker))
    assert await result.get(timeout=15) == "async cleaned up after: the task ran past its soft time limit"
    assert marker.read_text().splitlines() == ["start", "soft"]
    nested = await async_soft_nested.delay()
    assert await nested.get(timeout=15) == "nested cleaned up"


async def test_worker_default_soft_limit_applies_to_tasks_without_one(worker_factory, client):
    worker_factory(APP, concurrency=1, args=["--soft-time-limit", "0.3"])
    result = await sync_soft_by_default.delay()
    assert await result.get(timeout=15) == "worker default applied"


async def test_sync_task_ignoring_its_limits_is_abandoned_and_the_worker_keeps_serving(
    worker_factory, client, tmp_path
):
    # Concurrency 1: the next tasks can only run if the stuck thread was replaced.
    worker_factory(APP, concurrency=1)
    marker = tmp_path / "m.txt"
    stuck = await sync_stubborn.delay(4.0, marker=str(marker))
    with pytest.raises(dbtask.TimeLimitExceeded) as caught:
        await stuck.get(timeout=15)
    assert caught.value.exc_type == "dbtask.TimeLimitExceeded"
    assert "hard time limit of 1" in caught.value.message
    info = await stuck.info()
    assert info["state"] == "FAILURE"
    assert info["error"]["type"] == "dbtask.TimeLimitExceeded"

    # While the abandoned thread is still stuck, the worker serves other tasks.
    later = [await quick.delay(n) for n in range(5)]
    assert [await r.get(timeout=15) for r in later] == list(range(5))
    assert "returned late" not in marker.read_text()

    # The abandoned task finally returns: its outcome is discarded.
    lines = await wait_for_lines(marker, 4, timeout=15)
    assert "ignored SoftTimeLimitExceeded" in lines
    assert "ignored TimeLimitExceeded" in lines
    await wait_until_line(marker, "returned late")
    await asyncio.sleep(0.3)
    assert (await stuck.info())["state"] == "FAILURE"
    assert await (await quick.delay("after")).get(timeout=15) == "after"


async def test_stuck_threads_are_replaced_up_to_the_concurrency_then_capacity_comes_back(
    worker_factory, client, tmp_path
):
    w = worker_factory(APP, concurrency=1)
    first_marker, second_marker = tmp_path / "1.txt", tmp_path / "2.txt"
    first = await sync_stubborn.delay(3.0, marker=str(first_marker))
    await wait_for_lines(first_marker, 1)
    second = await sync_stubborn.delay(3.0, marker=str(second_marker))
    for stuck in (first, second):
        with pytest.raises(dbtask.TimeLimitExceeded):
            await stuck.get(timeout=15)
    # The first stuck thread was replaced (the second task ran on its replacement); the second
    # was not (at most `concurrency` abandoned threads): the next task waits for a thread...
    for _ in range(100):  # logged by the worker right after it recorded the FAILURE
        if "too many Python threads are stuck in abandoned tasks" in w.stderr:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the worker did not log that it stopped replacing stuck threads")
    waiting = await quick.delay("waited", marker=str(tmp_path / "q.txt"))
    assert await waiting.get(timeout=20) == "waited"
    # ...which it gets once a stuck task returns: the capacity comes back.
    assert "returned late" in second_marker.read_text()
    assert [await (await quick.delay(n)).get(timeout=15) for n in range(3)] == [0, 1, 2]
    assert (await second.info())["state"] == "FAILURE"


async def test_limits_count_from_the_start_not_from_the_wait_for_a_thread(worker_factory, client):
    # Concurrency 1: the tasks queue up for the one thread. Each runs 0.5 s, within its soft
    # limit of 0.8 s and hard limit of 1 s; the last one waits 1 s before it starts.
    worker_factory(APP, concurrency=1)
    results = [await sync_timed.delay(0.5) for _ in range(3)]
    assert [await r.get(timeout=15) for r in results] == [0.5, 0.5, 0.5]
    infos = [await r.info() for r in results]
    for before, after in zip(infos, infos[1:]):
        assert after["date_started"] >= before["date_done"] - 0.05, "one at a time"
    assert infos[-1]["date_started"] - infos[-1]["date_received"] >= 0.9, "the last one waited"


async def test_sync_and_async_tasks_share_the_concurrency(worker_factory, client, tmp_path):
    # Concurrency 1: a sync task queued while an async one runs starts only after it.
    worker_factory(APP, concurrency=1)
    marker = tmp_path / "m.txt"
    running = await async_long.delay(0.6, marker=str(marker))
    await wait_for_lines(marker, 1)
    waiting = await quick.delay("after", marker=str(marker))
    assert await waiting.get(timeout=15) == "after"
    assert marker.read_text().splitlines()[1:] == ["finished", "ran after"]
    assert (await waiting.info())["date_started"] >= (await running.info())["date_done"] - 0.05


async def test_sync_hard_limit_without_soft_raises_in_the_thread(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=1)
    marker = tmp_path / "m.txt"
    result = await sync_hard_no_soft.delay(marker=str(marker))
    with pytest.raises(dbtask.TimeLimitExceeded):
        await result.get(timeout=15)
    await wait_until_line(marker, "hard limit raised in thread")
    assert await (await quick.delay(1)).get(timeout=15) == 1


async def test_async_task_past_its_hard_limit_is_cancelled(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=2)
    marker = tmp_path / "m.txt"
    result = await async_hard.delay(marker=str(marker))
    with pytest.raises(dbtask.TimeLimitExceeded):
        await result.get(timeout=15)
    await wait_until_line(marker, "cancelled")
    info = await result.info()
    assert info["state"] == "FAILURE"
    assert info["error"]["type"] == "dbtask.TimeLimitExceeded"
    assert await (await quick.delay(2)).get(timeout=15) == 2


async def test_a_thread_blocked_in_c_gets_the_soft_limit_when_the_call_returns(worker_factory, client):
    worker_factory(APP, concurrency=1)
    result = await sync_blocked_in_c.delay(1.5)
    caught_after = await result.get(timeout=15)
    assert caught_after is not None, "the soft limit must still be delivered"
    assert caught_after >= 1.5, "not before the C call (time.sleep) returned"


async def test_worker_default_hard_limit_applies_to_tasks_without_one(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=1, args=["--time-limit", "0.5"])
    marker = tmp_path / "m.txt"
    result = await sync_long.delay(30, marker=str(marker))
    with pytest.raises(dbtask.TimeLimitExceeded, match="0.5 s"):
        await result.get(timeout=15)
    assert await (await quick.delay(3)).get(timeout=15) == 3
    assert "finished" not in marker.read_text()


def test_limits_must_be_positive_seconds():
    with pytest.raises(ValueError, match="time_limit"):
        dbtask.task(time_limit=0)(lambda: None)
    with pytest.raises(TypeError, match="soft_time_limit"):
        dbtask.task(soft_time_limit="5")(lambda: None)

