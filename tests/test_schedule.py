"""countdown / eta / expires: delayed tasks wait in JetStream as message schedules, run no
earlier than asked and promptly after, survive a worker restart without growing the worker,
and a task delivered after its expiry is revoked instead of run."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import datetime, timedelta, timezone

import nats as nats_py
import pytest

import dbtask
from retry_tasks import noop, now

APP = "retry_tasks"
STREAM = "DBTASK_TASKS"


async def stream_count(url: str, subjects: str) -> int:
    """Messages of the task stream on `subjects`, as the server counts them."""
    nc = await nats_py.connect(url)
    try:
        reply = await nc.request(
            f"$JS.API.STREAM.INFO.{STREAM}", json.dumps({"subjects_filter": subjects}).encode(), timeout=10
        )
        state = json.loads(reply.data)["state"]
        return sum((state.get("subjects") or {}).values())
    finally:
        await nc.close()


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("countdown", [0.2, 0.5, 1.3, 2.0])
async def test_countdown_runs_on_time(worker_factory, client, countdown):
    worker_factory(APP)
    await (await noop.delay(0)).get(timeout=10)  # the worker is warm and idle
    asked = time.time()
    result = await now.apply_async(countdown=countdown)
    await asyncio.sleep(countdown / 2)
    assert await result.state() == "PENDING", "nothing runs before its time"
    started = await result.get(timeout=countdown + 10)
    late = started - (asked + countdown)
    assert late >= 0, f"ran {-late:.3f} s early"
    assert late < 0.1, f"ran {late:.3f} s after its countdown on an idle worker"


async def test_eta_as_a_datetime(worker_factory, client):
    worker_factory(APP)
    eta = datetime.now(timezone.utc) + timedelta(seconds=1)
    started = await (await now.apply_async(eta=eta)).get(timeout=10)
    assert eta.timestamp() <= started < eta.timestamp() + 0.1


async def test_a_past_eta_runs_at_once(worker_factory, client):
    worker_factory(APP)
    await (await noop.delay(0)).get(timeout=10)
    sent = time.time()
    started = await (await now.apply_async(eta=datetime.now(timezone.utc) - timedelta(hours=1))).get(timeout=10)
    assert started - sent < 0.5


async def test_a_task_delivered_before_its_eta_waits(worker_factory, client, nats):
    """A message published straight to the queue with a future eta (an old client, another
    tool): the worker schedules it again instead of running it early."""
    worker_factory(APP)
    eta = time.time() + 1.5
    nc = await nats_py.connect(nats.url)
    js = nc.jetstream()
    body = {"id": "early-1", "task": now.name, "eta": eta}
    await js.publish("dbtask.tasks.default", json.dumps(body).encode(), stream=STREAM)
    await nc.close()
    started = await dbtask.AsyncResult("early-1").get(timeout=15)
    assert eta <= started < eta + 0.5


@pytest.mark.timeout(300)
async def test_10000_scheduled_tasks_survive_a_restart_without_growing_the_worker(worker_factory, client, nats):
    first = worker_factory(APP)
    await asyncio.sleep(1)
    before = rss_kib(first.pid)
    results = await noop.apply_many([(n,) for n in range(10_000)], countdown=3600)
    soon = await noop.apply_async(-1, countdown=3)
    assert await stream_count(nats.url, "dbtask.sched.>") == 10_001
    await asyncio.sleep(1)
    growth = rss_kib(first.pid) - before
    assert growth < 10 * 1024, f"worker RSS grew by {growth} KiB while 10,000 tasks wait"

    first.send(signal.SIGTERM)
    assert await first.wait_async(30) == 0
    worker_factory(APP)
    assert await soon.get(timeout=30) == -1, "a countdown that came due runs after the restart"
    assert await stream_count(nats.url, "dbtask.sched.>") == 10_000, "still scheduled, none lost"
    assert await stream_count(nats.url, "dbtask.tasks.>") == 0
    states = await asyncio.gather(*(r.state() for r in results[::100]))
    assert set(states) == {"PENDING"}, "none ran early"


async def test_expired_task_is_revoked_not_run(worker_factory, client):
    worker_factory(APP)
    result = await noop.apply_async(1, countdown=1, expires=0.5)
    with pytest.raises(dbtask.TaskRevoked):
        await result.get(timeout=10)
    info = await result.info()
    assert info["state"] == "REVOKED"
    assert info["error"]["type"] == "dbtask.Expired"
    assert "expired" in info["error"]["message"]
    assert "result" not in info


async def test_expiry_while_no_worker_runs(worker_factory, client):
    result = await noop.apply_async(1, expires=0.5)
    fresh = await noop.apply_async(2, expires=60)
    await asyncio.sleep(1)
    worker_factory(APP)
    assert await fresh.get(timeout=10) == 2, "an unexpired task runs"
    with pytest.raises(dbtask.TaskRevoked):
        await result.get(timeout=10)
