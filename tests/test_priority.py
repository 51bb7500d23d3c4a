"""Priorities (issue 3, item 7): on a backlog, higher priority tasks of a queue start first,
and lower ones still run."""

from __future__ import annotations

import asyncio

import pytest

from e2e_support import wait_for_lines

import priority_tasks

PER_LEVEL = 10


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs)


async def test_higher_priorities_start_first_on_a_backlog(worker_factory, client, tmp_path):
    out = tmp_path / "starts.txt"
    path = str(out)
    # The backlog is published before any worker runs, interleaved so that publish order
    # does not explain the start order. Priority 9 comes from the task's own default.
    results = []
    for i in range(PER_LEVEL):
        results.append(await priority_tasks.record.apply_async(path, f"p0-{i}", priority=0))
        results.append(await priority_tasks.record.apply_async(path, f"default-{i}"))
        results.append(await priority_tasks.record.apply_async(path, f"p7-{i}", priority=7))
        results.append(await priority_tasks.urgent.delay(path, f"p9-{i}"))
    worker_factory("priority_tasks", concurrency=1)
    total = 4 * PER_LEVEL
    lines = await wait_for_lines(out, total, timeout=60)
    for r in results:
        await r.get(timeout=30)
    order = [line.split()[1].split("-")[0] for line in lines]
    # Every task ran once: lower levels are not starved.
    assert sorted(order) == sorted(["p0", "default", "p7", "p9"] * PER_LEVEL), order
    # The highest level leads, and levels start in priority order on average (a fair share
    # of rounds goes to lower levels, so the order is not strict all the way).
    assert order[:5] == ["p9"] * 5, order
    pos = {label: _mean([i for i, x in enumerate(order) if x == label]) for label in ("p9", "p7", "default", "p0")}
    assert pos["p9"] < pos["p7"] < pos["default"] < pos["p0"], (pos, order)


async def test_a_priority_task_on_an_idle_worker_runs_at_once(worker_factory, client, tmp_path):
    out = tmp_path / "starts.txt"
    worker_factory("priority_tasks", concurrency=2)
    for level in (0, 9, 3):
        r = await priority_tasks.record.apply_async(str(out), f"p{level}-x", priority=level)
        assert await r.get(timeout=10) == f"p{level}-x"


async def test_invalid_priorities_are_refused(client, tmp_path):
    for bad in (-1, 10, 2.5, "9", True):
        with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
            await priority_tasks.record.apply_async(str(tmp_path / "x"), "never", priority=bad)


async def test_delayed_and_workflow_tasks_keep_their_priority(worker_factory, client, tmp_path):
    out = tmp_path / "starts.txt"
    path = str(out)
    backlog = [await priority_tasks.record.apply_async(path, f"default-{i}") for i in range(PER_LEVEL)]
    # A countdown task waits in a message schedule whose target is its level's subject, and a
    # signature's priority decides its message's level: both land on p9, ahead of the backlog.
    delayed = await priority_tasks.record.apply_async(path, "p9-countdown", countdown=0.3, priority=9)
    signed = await priority_tasks.record.s(path, "p9-signature").set(priority=9).delay()
    await asyncio.sleep(1.0)  # the schedule has fired: the message waits on its level
    worker_factory("priority_tasks", concurrency=1)
    lines = await wait_for_lines(out, PER_LEVEL + 2, timeout=60)
    for r in [*backlog, delayed, signed]:
        await r.get(timeout=30)
    order = [line.split()[1] for line in lines]
    assert sorted(order[:2]) == ["p9-countdown", "p9-signature"], order


async def test_a_worker_without_priorities_consumes_the_default_level_only(worker_factory, client, tmp_path):
    out = tmp_path / "starts.txt"
    # Waiting before the worker starts: a worker with priorities would take it in its first round.
    await priority_tasks.record.apply_async(str(out), "p9-x", priority=9)
    worker_factory("priority_tasks", concurrency=2, args=("--priorities", "false"))
    started = asyncio.get_running_loop().time()
    plain = await priority_tasks.record.apply_async(str(out), "plain-x")
    assert await plain.get(timeout=10) == "plain-x"
    await asyncio.sleep(max(0.0, 2.0 - (asyncio.get_running_loop().time() - started)))
    labels = [line.split()[1] for line in out.read_text().splitlines()]
    assert labels == ["plain-x"], "a worker without priorities ran a priority 9 task"
