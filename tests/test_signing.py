"""Message signing (issue 15 item 4, docs/security.md): a worker started with --message-key
runs only task messages signed with that key. The client signs with `init(message_key=...)`;
the worker signs what it publishes itself (retries, workflow steps, countdowns); a message
without a valid signature is dead-lettered unrun and no record is written under the task id
it claims, so publishing to NATS is not enough to run a task or overwrite a result."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess

import pytest

import dbtask
import retry_tasks
from e2e_support import VENV, worker_env
from e2e_tasks import add

DBTASK = VENV / "bin" / "dbtask"


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "message.key"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def dead_letters(nats, redis, key_file=None) -> list[dict]:
    env = dict(DBTASK_NATS_URL=nats.url, DBTASK_REDIS_URL=redis.url)
    proc = subprocess.run(
        [str(DBTASK), "dead", "list", "--json"], env=worker_env(**env), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


async def until(predicate, what: str, timeout: float = 20.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_signed_tasks_run_and_unsigned_or_forged_ones_never_do(nats, redis, worker_factory, key_file, tmp_path):
    worker = worker_factory("e2e_tasks", "retry_tasks", args=["--message-key", str(key_file)])
    await dbtask.init(nats_url=nats.url, redis_url=redis.url, message_key=key_file)
    try:
        # Signed by the client: a task, a countdown (a message schedule), a chain (the next
        # step published by the worker), a retry (published again by the worker).
        assert await (await add.delay(2, 3)).get(timeout=15) == 5
        assert await (await add.apply_async(args=(1, 1), countdown=0.4)).get(timeout=15) == 2
        assert await (await (add.s(1, 2) | add.s(3)).delay()).get(timeout=15) == 6
        log = tmp_path / "flaky.log"
        assert await (await retry_tasks.flaky.delay(str(log), 2)).get(timeout=15) == 2
        done = await add.delay(20, 22)
        assert await done.get(timeout=15) == 42
    finally:
        await dbtask.close()

    # A client without the key publishes fine, but its task never runs and leaves no record.
    await dbtask.init(nats_url=nats.url, redis_url=redis.url)
    try:
        unsigned = await add.delay(1, 2)
        # A forged message for a finished task (the trust boundary of docs/security.md),
        # signed with another key: it must not overwrite the stored result.
        import nats as nats_py

        nc = await nats_py.connect(nats.url)
        try:
            body = json.dumps({"id": done.id, "task": "e2e_tasks.add", "args": [0, 0], "kwargs": {}}).encode()
            forged = {"Dbtask-Id": done.id, "Dbtask-Task": "e2e_tasks.add", "Dbtask-Signature": "v1=" + "0" * 64}
            await nc.jetstream().publish("dbtask.tasks.default", body, headers=forged)
        finally:
            await nc.close()

        async def both_dead():
            letters = dead_letters(nats, redis)
            return letters if len(letters) == 2 else None

        letters = await until(both_dead, "two dead letters")
        by_id = {x["task_id"]: x for x in letters}
        assert by_id[unsigned.id]["reason"].startswith("unsigned"), by_id
        assert by_id[done.id]["reason"].startswith("wrong signature"), by_id
        assert await dbtask._client.current().get_record(unsigned.id) is None
        assert (await dbtask._client.current().get_record(done.id))["result"] == 42
    finally:
        await dbtask.close()
    assert worker.proc.poll() is None
    assert "a message without a valid signature" in worker.stderr


def test_a_worker_refuses_a_short_or_missing_key_naming_the_flag(worker_factory, tmp_path):
    short = tmp_path / "short.key"
    short.write_text("hunter2\n")
    w = worker_factory(args=["--message-key", str(short)], ready=False)
    assert w.wait(30) == 2
    assert f"--message-key {short}: the key is 7 bytes: use at least 32" in w.stderr
    assert "hunter2" not in w.stderr
    missing = tmp_path / "missing.key"
    w = worker_factory(args=["--message-key", str(missing)], ready=False)
    assert w.wait(30) == 2
    assert f"--message-key {missing}: file not found" in w.stderr


async def test_the_client_refuses_a_short_key_naming_the_keyword(nats, redis, tmp_path):
    short = tmp_path / "short.key"
    short.write_text("hunter2")
    with pytest.raises(ValueError, match="message_key=.*the key is 7 bytes") as e:
        await dbtask.init(nats_url=nats.url, redis_url=redis.url, message_key=short)
    assert "hunter2" not in str(e.value)


async def test_periodic_ticks_are_signed_and_a_schedule_signed_otherwise_is_replaced(nats, redis, worker_factory, key_file, tmp_path):
    # The server copies the schedule message's headers and body to every tick: signed once when
    # the schedule is stored, each tick carries a valid signature. A schedule stored unsigned
    # is replaced (not left alone as unchanged) once a client with the key applies it again.
    worker_factory("e2e_tasks", args=["--message-key", str(key_file)])
    await dbtask.init(nats_url=nats.url, redis_url=redis.url)
    await dbtask.schedule("unsigned-then-signed", add.s(2, 2), every=3600)
    await dbtask.close()
    await dbtask.init(nats_url=nats.url, redis_url=redis.url, message_key=key_file)
    try:
        await dbtask.schedule("unsigned-then-signed", add.s(2, 2), every=3600)
        import nats as nats_py

        nc = await nats_py.connect(nats.url)
        try:
            stored = await nc.jetstream().get_last_msg("DBTASK_TASKS", "dbtask.sched.~periodic.unsigned-then-signed")
        finally:
            await nc.close()
        assert stored.headers["Dbtask-Signature"].startswith("v1="), stored.headers
        tick = await dbtask.run_schedule("unsigned-then-signed")
        assert await tick.get(timeout=15) == 4
        await dbtask.schedule("every-second", add.s(3, 4), every=1)

        async def ticked():
            [s] = [s for s in await dbtask.schedules() if s["name"] == "every-second"]
            return s["last_run_id"]

        last = await until(ticked, "a tick of the signed schedule", timeout=15)
        assert await dbtask.AsyncResult(last).get(timeout=15) == 7
        await dbtask.unschedule("every-second")
        await dbtask.unschedule("unsigned-then-signed")
    finally:
        await dbtask.close()
    assert dead_letters(nats, redis) == []
