"""At-least-once delivery: every task runs, once when nothing fails, and none is lost when a
worker dies or stops."""

from __future__ import annotations

import asyncio
import collections
import signal

from e2e_support import start_nats, start_redis, wait_for_lines
from e2e_tasks import add, async_sleep_then, record, sleep_then


async def test_200_tasks_across_two_workers_each_run_exactly_once(worker_factory, client, tmp_path):
    first = worker_factory(concurrency=2)
    second = worker_factory(concurrency=2)
    log = tmp_path / "runs.txt"

    results = await asyncio.gather(*(record.delay(n, str(log)) for n in range(200)))
    pids = await asyncio.gather(*(r.get(timeout=90) for r in results))

    runs = collections.Counter(int(line.split()[0]) for line in log.read_text().splitlines())
    assert set(runs) == set(range(200))
    assert [n for n, times in runs.items() if times != 1] == []
    assert set(pids) == {first.pid, second.pid}, "both workers of the queue should get work"


async def test_sigkill_during_a_task_then_a_new_worker_completes_it(worker_factory, client, tmp_path):
    marker = tmp_path / "starts.txt"
    doomed = worker_factory(args=["--ack-wait", "2"])
    result = await sleep_then.delay(4, "survived", marker=str(marker))

    await wait_for_lines(marker, 1)  # the task sleeps inside the first worker
    doomed.kill()
    assert await result.ready() is False

    rescuer = worker_factory(args=["--ack-wait", "2"])
    assert await result.get(timeout=60) == "survived"

    starts = [line.split() for line in marker.read_text().splitlines()]
    assert [int(s[2]) for s in starts] == [doomed.pid, rescuer.pid], (
        "run once by the killed worker, then once by the new one (in-progress acks keep the "
        "4 s task from being redelivered again after the 2 s ack wait)"
    )
    info = await result.info()
    assert info["state"] == "SUCCESS"
    assert info["attempts"] >= 2
    assert info["worker"].endswith(f":{rescuer.pid}")


async def test_a_task_longer_than_ack_wait_runs_once(worker_factory, client, tmp_path):
    marker = tmp_path / "starts.txt"
    worker_factory(args=["--ack-wait", "1"])
    result = await async_sleep_then.delay(3.5, "long", marker=str(marker))
    other = await sleep_then.delay(3.5, "long-sync", marker=str(marker))
    assert await result.get(timeout=30) == "long"
    assert await other.get(timeout=30) == "long-sync"
    assert len(marker.read_text().splitlines()) == 2, "in-progress acks must prevent a redelivery"
    assert (await result.info())["attempts"] == 1


async def test_sigterm_lets_running_tasks_finish_and_exits_zero(worker_factory, client, tmp_path):
    marker = tmp_path / "starts.txt"
    w = worker_factory(concurrency=4, args=["--shutdown-timeout", "30"])
    results = [
        await sleep_then.delay(2, "sync-1", marker=str(marker)),
        await sleep_then.delay(2, "sync-2", marker=str(marker)),
        await async_sleep_then.delay(2, "async-1", marker=str(marker)),
    ]
    await wait_for_lines(marker, 3)

    w.send(signal.SIGTERM)
    assert await w.wait_async(30) == 0

    for r, expected in zip(results, ["sync-1", "sync-2", "async-1"]):
        assert await r.state() == "SUCCESS"
        assert await r.get(timeout=1) == expected


async def test_sigterm_hands_unstarted_tasks_back_to_other_workers(worker_factory, client, tmp_path):
    marker = tmp_path / "starts.txt"
    w = worker_factory(concurrency=1, args=["--shutdown-timeout", "30"])
    running = await sleep_then.delay(1.5, "running", marker=str(marker))
    waiting = [await add.delay(i, 100) for i in range(5)]
    await wait_for_lines(marker, 1)

    w.send(signal.SIGTERM)
    assert await w.wait_async(30) == 0
    assert await running.get(timeout=1) == "running"

    # An ack wait far longer than this: the tasks the stopped worker had not started must be
    # available again at once, not after an ack timeout.
    worker_factory(concurrency=1, args=["--ack-wait", "60"])
    values = await asyncio.gather(*(r.get(timeout=10) for r in waiting))
    assert values == [i + 100 for i in range(5)]
    # Run by the second worker: the first one, stopping, started none of them.
    first = (await running.info())["worker"]
    assert [(await r.info())["worker"] != first for r in waiting] == [True] * 5


async def test_a_second_signal_stops_the_worker_at_once(worker_factory, client, tmp_path):
    marker = tmp_path / "starts.txt"
    w = worker_factory(concurrency=1, args=["--shutdown-timeout", "60"])
    result = await sleep_then.delay(30, "too-long", marker=str(marker))
    await wait_for_lines(marker, 1)
    w.send(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert w.proc.poll() is None, "the first signal waits for the running task"
    w.send(signal.SIGTERM)
    await w.wait_async(10)
    # The task was not acked: it stays pending for another worker.
    assert await result.ready() is False


async def test_same_task_id_published_twice_runs_once(worker_factory, client, tmp_path):
    worker_factory(concurrency=1)
    log = tmp_path / "runs.txt"
    first = await record.apply_async(args=(1, str(log)), task_id="fixed-id-1")
    again = await record.apply_async(args=(1, str(log)), task_id="fixed-id-1")
    assert first.id == again.id == "fixed-id-1"
    await first.get(timeout=15)
    # A later task on the same queue, run by the same single-slot worker, finishes after any
    # duplicate would have run.
    await (await record.delay(2, str(log))).get(timeout=15)
    assert sorted(log.read_text().split()[0::2]) == ["1", "2"]


async def test_a_redis_outage_loses_nothing_and_the_worker_stops_taking_tasks(worker_factory, client, redis, tmp_path):
    worker_factory(concurrency=2, args=["--prefetch", "2"])
    log = tmp_path / "runs.txt"
    redis.stop()  # the worker can run tasks but not store their outcomes

    results = await asyncio.gather(*(record.delay(n, str(log)) for n in range(1000)))
    # It runs tasks until its unstored outcomes reach its bound, then takes no more messages:
    # the rest of the queue stays in NATS for healthy workers instead of piling up here.
    ran = len(await wait_for_lines(log, 20))
    while True:
        await asyncio.sleep(1.0)
        now = len(log.read_text().splitlines())
        if now == ran:
            break
        ran = now
    assert 0 < ran < 500, f"{ran} of 1000 tasks ran while Redis was down"

    back = start_redis(redis.log.parent, port=redis.port)
    try:
        # get() with a timeout rides out the client's own reconnection to Redis.
        pids = await asyncio.gather(*(r.get(timeout=90) for r in results))
    finally:
        back.stop()
    runs = collections.Counter(int(line.split()[0]) for line in log.read_text().splitlines())
    assert set(runs) == set(range(1000))
    assert [n for n, times in runs.items() if times != 1] == [], "outcomes held during the outage are stored, not rerun"
    assert len(set(pids)) == 1


async def test_sigterm_stops_a_worker_whose_nats_is_gone(worker_factory, nats):
    w = worker_factory(concurrency=2)
    nats.stop()
    # Long enough for the worker to notice and be in the middle of pulling again.
    await asyncio.sleep(2.5)
    w.send(signal.SIGTERM)
    assert await w.wait_async(15) == 0, "a worker with nothing running must stop even when NATS is unreachable"


async def test_a_nats_restart_loses_nothing_and_the_worker_goes_on(worker_factory, client, nats, tmp_path):
    worker_factory(concurrency=2)
    log = tmp_path / "runs.txt"
    before = await asyncio.gather(*(record.delay(n, str(log)) for n in range(50)))
    await asyncio.gather(*(r.get(timeout=30) for r in before))

    nats.stop()
    await asyncio.sleep(7)  # past the worker's pull timeouts: it must recover, not hang
    back = start_nats(nats.log.parent, port=nats.port)
    try:
        # The client reconnects too; a publish during its reconnection may fail once.
        after = []
        for n in range(50, 100):
            for attempt in range(30):
                try:
                    after.append(await record.delay(n, str(log)))
                    break
                except ConnectionError:
                    await asyncio.sleep(0.5)
        assert len(after) == 50
        await asyncio.gather(*(r.get(timeout=60) for r in after))
    finally:
        back.stop()
    runs = collections.Counter(int(line.split()[0]) for line in log.read_text().splitlines())
    assert set(runs) == set(range(100))
    assert [n for n, times in runs.items() if times != 1] == []
