"""The client API as a user calls it: sync twins, handles restored from an id, scheduling
options, and what state()/ready()/info() report."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

import dbtask
from e2e_support import VENV, wait_for_lines
from e2e_tasks import add, async_mul, fail, greet, sleep_then, tracked


def test_sync_api_from_plain_code(worker, nats, redis):
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    try:
        result = add.delay_sync(2, 3)
        assert result.get_sync(timeout=15) == 5
        assert result.state_sync() == "SUCCESS"
        assert result.ready_sync() is True
        assert result.info_sync()["result"] == 5

        assert async_mul.delay_sync(6, 7).get_sync(timeout=15) == 42
        assert greet.delay_sync("Cy", greeting="Yo").get_sync(timeout=15) == "Yo, Cy!"

        failing = fail.delay_sync("sync")
        with pytest.raises(ValueError, match="bad input: sync"):
            failing.get_sync(timeout=15)
        assert failing.state_sync() == "FAILURE"

        assert dbtask.AsyncResult(result.id).get_sync(timeout=5) == 5
    finally:
        dbtask.close_sync()


async def test_async_result_restored_from_an_id(worker, client, nats, redis):
    result = await add.delay(40, 2)
    same = dbtask.AsyncResult(result.id)
    assert same.id == result.id
    assert await same.get(timeout=15) == 42

    # And in another process, which knows nothing but the id.
    script = (
        "import json, sys, dbtask\n"
        "dbtask.init_sync(nats_url=sys.argv[1], redis_url=sys.argv[2])\n"
        "r = dbtask.AsyncResult(sys.argv[3])\n"
        "print(json.dumps([r.get_sync(timeout=10), r.state_sync()]))\n"
        "dbtask.close_sync()\n"
    )
    proc = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", script, nats.url, redis.url, result.id],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [42, "SUCCESS"]


async def test_countdown_eta_and_expires_are_accepted(worker, client):
    # Only that the options are accepted and the task runs; timing is in test_schedule.py.
    assert await (await add.apply_async(1, 2, countdown=1)).get(timeout=30) == 3

    task_id = f"my-id-{uuid.uuid4()}"
    result = await add.apply_async(
        args=(3, 4), kwargs={}, countdown=1, eta=None, expires=None, queue="default", task_id=task_id
    )
    assert result.id == task_id
    assert await result.get(timeout=30) == 7

    soon = datetime.now(timezone.utc) + timedelta(seconds=1)
    assert await (await add.apply_async(5, 6, eta=soon, expires=600)).get(timeout=30) == 11
    naive_soon = datetime.utcnow() + timedelta(seconds=1)
    later = datetime.now(timezone.utc) + timedelta(minutes=10)
    result = await greet.apply_async(args=("Bo",), kwargs={"punctuation": "?"}, eta=naive_soon, expires=later)
    assert await result.get(timeout=30) == "Hello, Bo?"


async def test_gather_of_many_delays_gives_every_result(worker, client):
    # delay() returns a future (no asyncio task per call); gather keeps the order of the calls.
    sent = await asyncio.gather(*[add.delay(i, 1000 * i) for i in range(1000)])
    sent += await asyncio.gather(*[async_mul.apply_async(i, 3) for i in range(200)])
    assert len({r.id for r in sent}) == 1200
    values = await asyncio.gather(*[r.get(timeout=60) for r in sent])
    assert values == [1001 * i for i in range(1000)] + [3 * i for i in range(200)]


async def test_state_ready_and_info_of_a_finished_task(worker, client):
    before = time.time()
    result = await add.delay(2, 2)
    assert await result.get(timeout=15) == 4
    after = time.time()

    assert await result.state() == "SUCCESS"
    assert await result.ready() is True
    info = await result.info()
    assert info["id"] == result.id
    assert info["state"] == "SUCCESS"
    assert info["task"] == "e2e_tasks.add"
    assert info["result"] == 4
    assert info["attempts"] == 1
    assert info["worker"].endswith(f":{worker.pid}"), info["worker"]
    assert "error" not in info or info["error"] is None
    stamps = [info.get(k) for k in ("date_received", "date_started", "date_done")]
    assert info["date_started"] is not None and info["date_done"] is not None, info
    present = [s for s in stamps if s is not None]
    assert present == sorted(present), info
    assert before - 1 <= present[0] and present[-1] <= after + 1, info


async def test_state_ready_and_info_of_an_unknown_id(client):
    result = dbtask.AsyncResult(f"nobody-{uuid.uuid4()}")
    assert await result.state() == "PENDING"
    assert await result.ready() is False
    assert await result.info() == {"id": result.id, "state": "PENDING"}


async def test_info_of_a_failed_task(worker, client):
    result = await fail.delay("info")
    with pytest.raises(ValueError):
        await result.get(timeout=15)
    info = await result.info()
    assert info["state"] == "FAILURE"
    assert info["task"] == "e2e_tasks.fail"
    assert info["error"]["type"] == "ValueError"
    assert info["error"]["message"] == "bad input: info"
    assert "Traceback" in info["error"]["traceback"]
    assert info["date_done"] is not None


async def test_track_started_task_reports_started_while_it_runs(worker, client, tmp_path):
    marker = tmp_path / "starts.txt"
    result = await tracked.delay(2, marker=str(marker))
    await wait_for_lines(marker, 1)
    assert await result.state() == "STARTED"
    assert await result.ready() is False
    info = await result.info()
    assert info["state"] == "STARTED"
    assert info["date_started"] is not None
    assert await result.get(timeout=15) == "tracked"
    assert await result.state() == "SUCCESS"


async def test_track_started_flag_applies_to_every_task(worker_factory, client, tmp_path):
    worker_factory(args=["--track-started"])
    marker = tmp_path / "starts.txt"
    result = await sleep_then.delay(2, "v", marker=str(marker))
    await wait_for_lines(marker, 1)
    assert await result.state() == "STARTED"
    assert await result.get(timeout=15) == "v"
