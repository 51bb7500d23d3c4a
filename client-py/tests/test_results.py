"""Results: ``AsyncResult`` reads and waits for the record the worker writes to Redis (written
by hand here, with SET + PUBLISH as the worker does)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest

import dbtask
from conftest import redis_cli, store


async def test_get_resolves_on_the_notification(client, redis):
    r = dbtask.AsyncResult("job-1")
    assert await r.state() == "PENDING" and not await r.ready()
    assert await r.info() == {"id": "job-1", "state": "PENDING"}
    waiting = asyncio.ensure_future(r.get(timeout=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    store(redis, {"id": "job-1", "state": "SUCCESS", "result": {"sum": 3}, "task": "t.add"})
    assert await waiting == {"sum": 3}
    assert await r.state() == "SUCCESS" and await r.ready()
    assert (await r.info())["task"] == "t.add"
    # Nobody is subscribed any more.
    await asyncio.sleep(0.1)
    assert redis_cli(redis, "PUBSUB", "NUMSUB", "dbtask:done:{job-1}").split()[-1] == "0"


def test_get_sync_of_a_stored_result_and_none(client, redis):
    store(redis, {"id": "job-2", "state": "SUCCESS", "result": None})
    assert dbtask.AsyncResult("job-2").get_sync(timeout=0) is None
    assert dbtask.AsyncResult("job-2").state_sync() == "SUCCESS"
    assert dbtask.AsyncResult("job-2").ready_sync() is True
    assert dbtask.AsyncResult("job-2").info_sync()["result"] is None


async def test_non_ready_states_keep_waiting(client, redis):
    store(redis, {"id": "job-3", "state": "STARTED"})
    waiting = asyncio.ensure_future(dbtask.AsyncResult("job-3").get(timeout=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    store(redis, {"id": "job-3", "state": "SUCCESS", "result": 7})
    assert await waiting == 7


async def test_timeout(client):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not ready after 0.200 s"):
        await dbtask.AsyncResult("never").get(timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 1.5
    with pytest.raises(TimeoutError):
        dbtask.AsyncResult("never").get_sync(timeout=0.2)
    with pytest.raises(TimeoutError):
        dbtask.AsyncResult("never").get_sync(timeout=0)


async def test_cancelled_wait_unsubscribes(client, redis):
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(dbtask.AsyncResult("job-4").get(), 0.3)
    await asyncio.sleep(0.2)
    assert redis_cli(redis, "PUBSUB", "NUMSUB", "dbtask:done:{job-4}").split()[-1] == "0"


async def test_many_concurrent_waits_share_one_connection(client, redis):
    ids = [f"many-{i}" for i in range(300)]
    waits = [asyncio.ensure_future(dbtask.AsyncResult(i).get(timeout=20)) for i in ids]
    waits += [asyncio.ensure_future(dbtask.AsyncResult(ids[0]).get(timeout=20))]  # twice the same id
    await asyncio.sleep(0.3)
    clients = redis_cli(redis, "CLIENT", "LIST").count("cmd=")
    assert clients <= 4, "one command and one pub/sub connection per client process"
    pipe = "".join(
        f"SET dbtask:result:{{{i}}} '{json.dumps({'id': i, 'state': 'SUCCESS', 'result': n})}'\n"
        f"PUBLISH dbtask:done:{{{i}}} '{json.dumps({'id': i, 'state': 'SUCCESS', 'result': n})}'\n"
        for n, i in enumerate(ids)
    )
    subprocess.run(["redis-cli", "-p", str(redis.port)], input=pipe, text=True, check=True, capture_output=True)
    assert await asyncio.gather(*waits) == list(range(300)) + [0]


@pytest.mark.slow  # restarts Redis and waits out the reconnection backoff
async def test_waits_survive_a_redis_restart(nats, tmp_path):
    from conftest import start_redis

    redis = start_redis(tmp_path)
    await dbtask.init(nats_url=nats.url, redis_url=redis.url)
    try:
        waiting = asyncio.ensure_future(dbtask.AsyncResult("restart-1").get(timeout=30))
        await asyncio.sleep(0.2)
        redis.stop()
        await asyncio.sleep(0.3)
        # While Redis is down, a new wait fails fast with ConnectionError.
        with pytest.raises(ConnectionError, match="Redis"):
            await dbtask.AsyncResult("restart-2").get(timeout=5)
        redis = start_redis(tmp_path, port=redis.port)
        await asyncio.sleep(0.5)  # reconnect backoff
        assert not waiting.done()
        store(redis, {"id": "restart-1", "state": "SUCCESS", "result": "back"})
        assert await waiting == "back"
        assert await dbtask.AsyncResult("restart-1").state() == "SUCCESS"
    finally:
        await dbtask.close()
        redis.stop()

