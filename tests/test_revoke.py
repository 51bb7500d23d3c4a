"""Revocation: a revoked task never starts on any worker (also one started after the revoke,
or after a restart, and a task still waiting in the queue); terminate=True stops a running
task; the state is REVOKED and get() raises dbtask.TaskRevoked. The live revocations also run
on a Redis Cluster (`PLAIN_AND_CLUSTER`), where they stay classic pub/sub."""

from __future__ import annotations

import asyncio
import signal

import pytest

import dbtask
from e2e_support import PLAIN_AND_CLUSTER, wait_for_lines, wait_until_line
from limit_tasks import async_long, quick, sync_long

APP = "limit_tasks"


async def assert_revoked(result, marker=None):
    with pytest.raises(dbtask.TaskRevoked) as caught:
        await result.get(timeout=15)
    assert caught.value.exc_type == "dbtask.TaskRevoked"
    info = await result.info()
    assert info["state"] == "REVOKED"
    return info


async def test_revoked_before_any_worker_started_never_runs(worker_factory, client, tmp_path):
    marker = tmp_path / "m.txt"
    result = await quick.delay("x", marker=str(marker))
    await result.revoke()
    # This worker starts after the revoke: it loaded the revoked set from Redis.
    worker_factory(APP, concurrency=2)
    info = await assert_revoked(result)
    assert "before it started" in info["error"]["message"]
    assert not marker.exists(), "a revoked task must not run"
    assert await (await quick.delay("next")).get(timeout=15) == "next"


async def test_revoke_by_id_with_the_module_function(worker_factory, client, tmp_path):
    marker = tmp_path / "m.txt"
    result = await quick.delay("x", marker=str(marker))
    dbtask.revoke_sync(result.id)  # the blocking form, by id
    worker_factory(APP, concurrency=1)
    await assert_revoked(result)
    assert not marker.exists()


async def test_revoke_a_task_waiting_on_its_countdown(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=2)
    marker = tmp_path / "m.txt"
    waiting = await quick.apply_async("revoked", kwargs={"marker": str(marker)}, countdown=1.5)
    await waiting.revoke()
    # It comes due in its message schedule 1.5 s later and is refused then.
    info = await assert_revoked(waiting)
    assert "before it started" in info["error"]["message"]
    assert info["date_done"] - info["date_received"] >= 0
    assert not marker.exists(), "a revoked task must not run when its countdown ends"


@PLAIN_AND_CLUSTER
async def test_received_while_waiting_then_revoked_behind_a_busy_worker(worker_factory, client, tmp_path):
    # The worker (concurrency 1) runs one task and holds the next in its prefetch: RECEIVED.
    worker_factory(APP, concurrency=1)
    busy_marker = tmp_path / "busy.txt"
    marker = tmp_path / "m.txt"
    busy = await sync_long.delay(1.5, marker=str(busy_marker))
    await wait_for_lines(busy_marker, 1)
    waiting = await quick.delay("revoked", marker=str(marker))
    after = await quick.delay("after", marker=str(marker))
    for _ in range(100):
        if await waiting.state() == "RECEIVED":
            break
        await asyncio.sleep(0.02)
    info = await waiting.info()
    assert info["state"] == "RECEIVED", info
    assert info["task"] == quick.name and info["worker"] and info["date_received"] > 0
    assert not await waiting.ready()
    await dbtask.revoke(waiting.id)  # live: the running worker hears it on the channel
    assert await busy.get(timeout=15) == "finished"
    await assert_revoked(waiting)
    assert await after.get(timeout=15) == "after"
    assert marker.read_text().splitlines() == ["ran after"]


@PLAIN_AND_CLUSTER
async def test_terminate_a_running_sync_task(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=1)
    marker = tmp_path / "m.txt"
    result = await sync_long.delay(30, marker=str(marker))
    await wait_for_lines(marker, 1)
    await result.revoke(terminate=True)
    info = await assert_revoked(result)
    assert "terminate" in info["error"]["message"]
    await wait_until_line(marker, "terminated")  # dbtask.Terminated was raised in its thread
    assert "finished" not in marker.read_text()
    # The worker (concurrency 1) serves the next task.
    assert await (await quick.delay(1)).get(timeout=15) == 1


async def test_terminate_a_running_async_task(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=1)
    marker = tmp_path / "m.txt"
    result = await async_long.delay(30, marker=str(marker))
    await wait_for_lines(marker, 1)
    await result.revoke(terminate=True)
    await assert_revoked(result)
    await wait_until_line(marker, "cancelled")
    assert await (await quick.delay(2)).get(timeout=15) == 2


async def test_revoke_without_terminate_lets_a_running_task_finish(worker_factory, client, tmp_path):
    worker_factory(APP, concurrency=1)
    marker = tmp_path / "m.txt"
    result = await sync_long.delay(1.0, marker=str(marker))
    await wait_for_lines(marker, 1)
    await result.revoke()
    assert await result.get(timeout=15) == "finished"


async def test_revoked_set_survives_a_worker_restart(worker_factory, client, tmp_path):
    first = worker_factory(APP, concurrency=1)
    marker = tmp_path / "m.txt"
    await dbtask.revoke("revoked-before-publish")
    first.send(signal.SIGTERM)
    assert await first.wait_async(15) == 0
    # Published after the revoke, consumed by a worker that never heard the live notice.
    result = await quick.apply_async("x", kwargs={"marker": str(marker)}, task_id="revoked-before-publish")
    worker_factory(APP, concurrency=1)
    await assert_revoked(result)
    assert not marker.exists()


async def test_a_revocation_expires_after_its_ttl(worker_factory, client):
    await dbtask.revoke("short-lived", ttl=0.5)
    await asyncio.sleep(1.0)
    worker_factory(APP, concurrency=1)
    result = await quick.apply_async("ran", task_id="short-lived")
    assert await result.get(timeout=15) == "ran"


async def test_revoke_refuses_bad_input(client):
    with pytest.raises(ValueError):
        await dbtask.revoke("")
    with pytest.raises(ValueError):
        await dbtask.revoke("id", ttl=0)
    with pytest.raises(ValueError, match="invalid task id"):
        await dbtask.revoke("bad id")

