"""Connecting: ``init`` and ``close``, clear errors when a server is missing, and one client
used from sync and async code alike."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import dbtask
from conftest import add, free_port, store


def test_closed_ports_fail_fast_with_the_password_hidden(nats, redis):
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        dbtask.init_sync(nats_url=f"nats://bob:s3cret@127.0.0.1:{port}", redis_url=redis.url)
    assert time.monotonic() - start < 3
    assert f"nats://bob:***@127.0.0.1:{port}" in str(info.value)
    assert "s3cret" not in str(info.value)

    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        dbtask.init_sync(nats_url=nats.url, redis_url=f"redis://:hunter2@127.0.0.1:{port}/0")
    assert time.monotonic() - start < 3
    assert f"redis://:***@127.0.0.1:{port}/0" in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_async_init_against_a_closed_port():
    port = free_port()
    with pytest.raises(ConnectionError, match="cannot reach (NATS|Redis)"):
        await dbtask.init(nats_url=f"nats://127.0.0.1:{port}", redis_url=f"redis://127.0.0.1:{port}")


def test_nats_without_jetstream_is_a_clear_error(redis, tmp_path):
    from conftest import start_nats

    plain = start_nats(tmp_path, jetstream=False)
    try:
        with pytest.raises(ConnectionError, match="has no JetStream: start nats-server with -js"):
            dbtask.init_sync(nats_url=plain.url, redis_url=redis.url)
    finally:
        plain.stop()


def test_init_creates_the_stream_and_is_idempotent(nats, redis):
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    from dbtask import _client

    first = _client.current()
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    assert _client.current() is first, "same URLs keep the connection"
    dbtask.close_sync()
    dbtask.close_sync()  # twice is fine


def test_a_stream_made_by_a_client_has_the_worker_defaults(redis, tmp_path):
    # A client that finds no stream makes it from the worker's description: a 1 MiB message
    # limit and a 120 s duplicate window, not the server's unlimited size (-1).
    import nats as nats_py
    from conftest import start_nats

    fresh = start_nats(tmp_path)
    try:
        dbtask.init_sync(nats_url=fresh.url, redis_url=redis.url)
        dbtask.close_sync()

        async def read():
            nc = await nats_py.connect(fresh.url)
            try:
                return (await nc.jetstream().stream_info("DBTASK_TASKS")).config
            finally:
                await nc.close()

        config = asyncio.run(read())
        assert config.max_msg_size == 1024 * 1024
        assert config.duplicate_window == 120
        assert config.description == "dbtask: queued task messages"
        assert sorted(config.subjects) == ["dbtask.sched.>", "dbtask.tasks.>"]
    finally:
        fresh.stop()


def test_init_sync_then_async_use_and_sync_from_a_thread(nats, redis):
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    try:
        async def main():
            r = await add.delay(1, 1)
            # A sync call from another thread while this loop runs.
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("r", add.delay_sync(2, 2)))
            t.start()
            await asyncio.sleep(0.05)
            await asyncio.to_thread(t.join)
            store(redis, {"id": r.id, "state": "SUCCESS", "result": 2})
            got = await asyncio.to_thread(dbtask.AsyncResult(r.id).get_sync, 5)
            return got, out["r"]

        got, other = asyncio.run(main())
        assert got == 2 and isinstance(other, dbtask.AsyncResult)
        # A second, different event loop with the same client.
        assert asyncio.run(dbtask.AsyncResult(other.id).state()) == "PENDING"
    finally:
        dbtask.close_sync()


def test_async_init_then_sync_use(nats, redis):
    asyncio.run(dbtask.init(nats_url=nats.url, redis_url=redis.url))
    try:
        r = add.delay_sync(3, 3)
        store(redis, {"id": r.id, "state": "SUCCESS", "result": 6})
        assert r.get_sync(timeout=5) == 6
    finally:
        asyncio.run(dbtask.close())



def test_a_wrong_redis_password_says_so_and_names_the_setting(nats, tmp_path):
    from conftest import start_redis

    guarded = start_redis(tmp_path, "--requirepass", "right-one")
    try:
        wrong = f"redis://:wr0ng-one@127.0.0.1:{guarded.port}/0"
        with pytest.raises(ConnectionError) as info:
            dbtask.init_sync(nats_url=nats.url, redis_url=wrong)
        message = str(info.value)
        assert message.startswith(f"Redis at redis://:***@127.0.0.1:{guarded.port}/0 refused the password")
        assert "redis_url" in message and "is redis-server running?" not in message
        assert "wr0ng-one" not in message
        # No password at all: refused the same way (NOAUTH).
        with pytest.raises(ConnectionError, match="refused the password"):
            dbtask.init_sync(nats_url=nats.url, redis_url=guarded.url)
        dbtask.init_sync(nats_url=nats.url, redis_url=f"redis://:right-one@127.0.0.1:{guarded.port}/0")
        dbtask.close_sync()
    finally:
        guarded.stop()


# Run in a child process: the bug it guards against killed the whole process (SIGSEGV in the
# client's allocator when a thread that had used the client was gone and a new one called it).
_THREADS_COME_AND_GO = """
import asyncio, sys, threading
import dbtask

nats, redis = sys.argv[1], sys.argv[2]

async def use(url):
    try:
        await dbtask.init(nats_url=url, redis_url=redis, timeout=2)
        print("state", await dbtask.AsyncResult("no-such-id").state())
        await dbtask.close()
    except ConnectionError:
        print("refused")

for url in [nats, "nats://127.0.0.1:1", nats, nats]:
    t = threading.Thread(target=lambda: asyncio.run(use(url)))
    t.start()
    t.join()
print("done")
"""


def test_threads_that_come_and_go_each_use_the_client(nats, redis):
    """A web server's worker threads (or asyncio.run in short-lived threads) each init, use and
    close the client: every one works, and the process survives them all."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _THREADS_COME_AND_GO, nats.url, redis.url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert run.stdout.split() == ["state", "PENDING", "refused", "state", "PENDING", "state", "PENDING", "done"]
