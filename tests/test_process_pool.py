"""`--pool processes`: sync tasks run in child processes of the worker, so CPU-bound tasks use
every core, a task past its hard limit or terminated is really stopped (its process is killed
and replaced), a task that kills its process fails as dbtask.WorkerLost without taking its
neighbours down, and children are recycled after N tasks or past a memory bound."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

import dbtask
from e2e_support import wait_for_lines
from limit_tasks import sync_timed
from pool_tasks import (
    async_whoami,
    burn,
    crash_then_succeed,
    environment,
    exit_process,
    grow,
    long,
    segfault,
    soft_in_pool,
    spin,
    whoami,
)

APP = "pool_tasks"
POOL = ("--pool", "processes")


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def wait_children(pid: int, count: int, replacing: int | None = None, timeout: float = 15.0) -> set[int]:
    """Waits until the worker `pid` has exactly `count` children again, `replacing` not among
    them (it is gone, and another has taken its place)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = children(pid)
        if len(found) == count and replacing not in found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"the worker has children {children(pid)}, expected {count} of them, not {replacing}")


async def test_sync_tasks_run_in_child_processes_async_ones_in_the_worker(worker_factory, client):
    w = worker_factory(APP, concurrency=2, args=POOL)
    pool = await wait_children(w.pid, 2)
    # Two CPU-bound tasks at a time: both children work, in parallel.
    results = [await burn.delay(300) for _ in range(4)]
    pids = {await r.get(timeout=15) for r in results}
    assert pids == pool, "sync tasks run in the worker's two pool processes"
    assert await (await whoami.delay(7)).get(timeout=15) in ([7, p] for p in pool)
    # An `async def` task runs in the worker's own asyncio loop.
    assert await (await async_whoami.delay()).get(timeout=15) == w.pid
    assert children(w.pid) == pool, "no child was replaced"


async def test_a_task_past_its_hard_limit_is_killed_with_its_process(worker_factory, client, tmp_path):
    w = worker_factory(APP, concurrency=1, args=POOL)
    (first,) = await wait_children(w.pid, 1)
    marker = tmp_path / "m.txt"
    result = await spin.delay(marker=str(marker))
    with pytest.raises(dbtask.TimeLimitExceeded) as caught:
        await result.get(timeout=15)
    assert "hard time limit of 1" in caught.value.message
    # It ignored the soft limit; at the hard limit its process was killed, not abandoned.
    assert marker.read_text().splitlines() == [f"start {first}", "ignored SoftTimeLimitExceeded"]
    (second,) = await wait_children(w.pid, 1, replacing=first)
    assert not alive(first)
    assert await (await whoami.delay(1)).get(timeout=15) == [1, second]


async def test_a_task_in_a_pool_process_catches_its_soft_limit(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=1, args=POOL)
    result = await soft_in_pool.delay(marker=str(tmp_path / "m.txt"))
    assert await result.get(timeout=15) == "cleaned up after: the task ran past its soft time limit"


async def test_terminate_kills_the_running_task_s_process(worker_factory, client, tmp_path):
    w = worker_factory(APP, concurrency=1, args=POOL)
    marker = tmp_path / "m.txt"
    result = await long.delay(30, marker=str(marker))
    (line,) = await wait_for_lines(marker, 1)
    pid = int(line.split()[1])
    await result.revoke(terminate=True)
    with pytest.raises(dbtask.TaskRevoked):
        await result.get(timeout=15)
    assert (await result.info())["state"] == "REVOKED"
    await wait_children(w.pid, 1, replacing=pid)
    assert not alive(pid)
    assert "finished" not in marker.read_text()
    assert await (await whoami.delay(2)).get(timeout=15) == [2, next(iter(children(w.pid)))]


@pytest.mark.parametrize(
    ("task", "cause"),
    [(exit_process, "exited with code 1"), (segfault, "was killed by signal 11 (SIGSEGV")],
)
async def test_a_task_that_kills_its_process_fails_alone_as_worker_lost(worker_factory, client, tmp_path, task, cause):
    w = worker_factory(APP, concurrency=2, args=POOL)
    await wait_children(w.pid, 2)
    # Innocent neighbours: one running beside the crash, more queued behind it.
    beside = await long.delay(1.0)
    innocents = [await whoami.delay(n) for n in range(20)]
    crash = await task.delay(marker=str(tmp_path / "m.txt"))
    with pytest.raises(dbtask.WorkerLost) as caught:
        await crash.get(timeout=15)
    assert caught.value.exc_type == "dbtask.WorkerLost"
    assert cause in caught.value.message
    info = await crash.info()
    assert info["state"] == "FAILURE" and info["attempts"] == 1, "failed once, not redelivered"
    assert await beside.get(timeout=15) == "finished"
    assert [(await r.get(timeout=15))[0] for r in innocents] == list(range(20))
    crashed = int((tmp_path / "m.txt").read_text().split()[1])
    await wait_children(w.pid, 2, replacing=crashed)
    assert w.proc.poll() is None, "the worker itself stays up"


async def test_autoretry_for_worker_lost_retries_a_crashed_task(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=1, args=POOL)
    marker = tmp_path / "m.txt"
    result = await crash_then_succeed.delay(str(marker))
    assert await result.get(timeout=20) == 3
    assert (await result.info())["retries"] == 2


async def test_children_are_recycled_after_max_tasks_per_child(worker_factory, client):
    w = worker_factory(APP, concurrency=1, args=(*POOL, "--max-tasks-per-child", "3"))
    pids = [(await (await whoami.delay(n)).get(timeout=15))[1] for n in range(10)]
    # One child at a time, three tasks each: 3 + 3 + 3 + 1.
    assert [len(set(pids[i : i + 3])) for i in range(0, 9, 3)] == [1, 1, 1]
    assert len(set(pids)) == 4
    await wait_children(w.pid, 1)


async def test_a_child_past_max_memory_per_child_is_replaced_after_its_task(worker_factory, client):
    w = worker_factory(APP, concurrency=1, args=(*POOL, "--max-memory-per-child", "100"))
    small = await (await grow.delay(1)).get(timeout=15)
    assert await (await grow.delay(1)).get(timeout=15) == small, "under the bound: kept"
    big = await grow.delay(150)
    assert await big.get(timeout=15) == small, "the task that passed the bound keeps its result"
    (fresh,) = await wait_children(w.pid, 1, replacing=small)
    assert (await (await whoami.delay(3)).get(timeout=15)) == [3, fresh]


async def test_sigterm_lets_running_tasks_finish_and_leaves_no_child(worker_factory, client, tmp_path):
    w = worker_factory(APP, concurrency=2, args=POOL)
    pool = await wait_children(w.pid, 2)
    marker = tmp_path / "m.txt"
    running = [await long.delay(1.0, marker=str(marker)) for _ in range(2)]
    await wait_for_lines(marker, 2)
    w.send(signal.SIGTERM)
    assert await w.wait_async(30) == 0
    assert [await r.get(timeout=5) for r in running] == ["finished", "finished"]
    assert not any(alive(pid) for pid in pool), "pool processes outlived the worker"


async def test_children_die_with_a_killed_worker(worker_factory, client):
    w = worker_factory(APP, concurrency=2, args=POOL)
    pool = await wait_children(w.pid, 2)
    w.kill()
    for _ in range(100):
        if not any(alive(pid) for pid in pool):
            break
        await asyncio.sleep(0.05)
    assert not any(alive(pid) for pid in pool), "pool processes outlived a SIGKILLed worker"


async def test_pool_settings_are_checked_at_start(worker_factory, client):
    w = worker_factory(APP, concurrency=1, args=("--max-memory-per-child", "100"), ready=False)
    assert w.wait(60) == 2
    assert "max_memory_per_child" in w.stderr and "--pool processes" in w.stderr
    w = worker_factory("broken_app", concurrency=1, args=POOL, ready=False)
    assert w.wait(60) != 0
    assert "broken_app" in w.stderr


async def test_sync_tasks_see_the_worker_s_environment(worker_factory, client):
    """A child is the worker started again: same working directory and environment, but not
    the variable that made it a child (what the task starts is not a pool process)."""
    w = worker_factory(APP, concurrency=1, args=POOL, env={"DBTASK_TEST_MARK": "seen"})
    seen = await (await environment.delay()).get(timeout=15)
    assert seen == {"cwd": os.readlink(f"/proc/{w.pid}/cwd"), "mark": "seen", "child_var": None}


async def test_limits_count_from_the_start_in_a_child_not_from_the_queue(worker_factory, client):
    # Concurrency 1: the tasks wait for the one child. Each runs 0.5 s, within its soft limit
    # of 0.8 s and hard limit of 1 s; the last one waits 1 s before it starts.
    worker_factory(APP, "limit_tasks", concurrency=1, args=POOL)
    results = [await sync_timed.delay(0.5) for _ in range(3)]
    assert [await r.get(timeout=15) for r in results] == [0.5, 0.5, 0.5]
    infos = [await r.info() for r in results]
    assert infos[-1]["date_started"] - infos[-1]["date_received"] >= 0.9, "the last one waited"


async def test_a_second_signal_stops_the_worker_and_its_children_at_once(worker_factory, client, tmp_path):
    w = worker_factory(APP, concurrency=1, args=(*POOL, "--shutdown-timeout", "60"))
    marker = tmp_path / "m.txt"
    result = await long.delay(30, marker=str(marker))
    (line,) = await wait_for_lines(marker, 1)
    pid = int(line.split()[1])
    w.send(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert w.proc.poll() is None and alive(pid), "the first signal waits for the running task"
    w.send(signal.SIGTERM)
    await w.wait_async(10)
    for _ in range(100):
        if not alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not alive(pid), "the child running the task outlived its worker"
    assert await result.ready() is False, "not acked: it stays pending for another worker"


async def test_a_task_that_crashes_over_and_over_is_logged_once_and_backed_off(worker_factory, client):
    w = worker_factory(APP, concurrency=1, args=POOL)
    crashes = [await exit_process.delay(7) for _ in range(8)]
    for result in crashes:
        with pytest.raises(dbtask.WorkerLost):
            await result.get(timeout=30)
    # Each death was recorded, but logged once for the burst (the rest counted for the next
    # report), and the worker still serves once a child is back.
    assert await (await whoami.delay(1)).get(timeout=30) == [1, next(iter(children(w.pid)))]
    reports = [line for line in w.stderr.splitlines() if "recorded as dbtask.WorkerLost" in line]
    assert len(reports) == 1, reports
    assert "exited with code 7" in reports[0]


async def test_an_idle_child_killed_from_outside_is_replaced_without_charging_a_task(worker_factory, client):
    w = worker_factory(APP, concurrency=1, args=POOL)
    (victim,) = await wait_children(w.pid, 1)
    os.kill(victim, signal.SIGKILL)  # the OOM killer, or an operator
    (fresh,) = await wait_children(w.pid, 1, replacing=victim)
    result = await whoami.delay(5)
    assert await result.get(timeout=15) == [5, fresh]
    assert (await result.info())["attempts"] == 1
    assert "an idle pool process was killed by signal 9" in w.stderr
