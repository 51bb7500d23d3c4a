"""Dead letters (issue 3, item 9): a message that exhausts its deliveries lands in the
dead-letter stream with the reason, its record becomes FAILURE, it never loops; the `dbtask`
command line lists, shows, replays and purges dead letters and shows a task's result."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

from e2e_support import DBTASK_CLI as DBTASK, dbtask_cli as cli, worker_env

import dbtask
import dead_tasks

WORKER_ARGS = ("--max-deliver", "2", "--ack-wait", "1")


async def record_of(task_id: str) -> dict | None:
    return await dbtask._client.current().get_record(task_id)


async def until(predicate, what: str, timeout: float = 60.0, on_wait=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        if on_wait is not None:
            on_wait()
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_poison_tasks_are_dead_lettered_replayed_and_purged(worker_factory, client, nats, redis, tmp_path):
    marker = tmp_path / "poison"
    marker.write_text("kill the worker")
    a = await dead_tasks.poison.delay(str(marker))
    b = await dead_tasks.poison.delay(str(marker))
    workers = [worker_factory("dead_tasks", concurrency=2, args=WORKER_ARGS)]

    def keep_one_worker() -> None:
        # The task kills its worker: start another one, as a supervisor would.
        if workers[-1].proc.poll() is not None:
            workers.append(worker_factory("dead_tasks", concurrency=2, args=WORKER_ARGS))

    async def both_dead() -> bool:
        records = [await record_of(r.id) for r in (a, b)]
        return all(r is not None and r["state"] == "FAILURE" for r in records)

    await until(both_dead, "both poison tasks to be FAILURE", on_wait=keep_one_worker)
    for r in (a, b):
        record = await record_of(r.id)
        # Running each time its worker died: recorded as such, with what the journal knew.
        assert record["error"]["type"] == "dbtask.WorkerLost", record
        assert "max_deliver=2" in record["error"]["message"], record
        assert "ended without a trace" in record["error"]["message"], record
        assert "dbtask dead replay" in record["error"]["message"], record
    # Never loops: each task ran max_deliver - 1 = 1 time (both in one worker, or one each).
    assert 1 <= sum(w.proc.poll() is not None for w in workers) <= 2

    listed = json.loads(cli(nats, redis, "dead", "list", "--json").stdout)
    assert sorted(x["task_id"] for x in listed) == sorted([a.id, b.id]), listed
    for x in listed:
        # 2, or 3 for a task that first waited in a worker the other one killed (not charged).
        assert x["task"] == "dead.poison" and x["queue"] == "default" and x["deliveries"] in (2, 3), x
        assert "max_deliver=2" in x["reason"], x
        assert x["original_subject"] == "dbtask.tasks.default", x
        assert x["body"]["args"] == [str(marker)], x
    table = cli(nats, redis, "dead", "list").stdout
    assert a.id in table and b.id in table, table
    seq_a = next(x["sequence"] for x in listed if x["task_id"] == a.id)
    seq_b = next(x["sequence"] for x in listed if x["task_id"] == b.id)

    shown = json.loads(cli(nats, redis, "dead", "show", str(seq_a)).stdout)
    assert shown["task_id"] == a.id and shown["body"]["id"] == a.id, shown
    assert cli(nats, redis, "dead", "show", "9999", check=False).returncode == 1

    result = json.loads(cli(nats, redis, "result", a.id).stdout)
    assert result["state"] == "FAILURE" and result["error"]["type"] == "dbtask.WorkerLost", result

    # The task is fixed (its poison gone): a replay runs it to SUCCESS.
    marker.unlink()
    keep_one_worker()
    replayed = cli(nats, redis, "dead", "replay", str(seq_a)).stdout
    assert f"replayed dead letter {seq_a} to dbtask.tasks.default" in replayed, replayed

    async def a_succeeded():
        record = await record_of(a.id)
        return record is not None and record["state"] == "SUCCESS" and record

    record = await until(a_succeeded, "the replayed task to succeed", timeout=30)
    assert record["result"] == "survived"
    assert json.loads(cli(nats, redis, "result", a.id).stdout)["state"] == "SUCCESS"
    listed = json.loads(cli(nats, redis, "dead", "list", "--json").stdout)
    assert [x["sequence"] for x in listed] == [seq_b], listed
    again = cli(nats, redis, "dead", "replay", str(seq_a), check=False)
    assert again.returncode == 1 and f"no dead letter {seq_a}" in again.stderr, again

    assert "purged 1 dead letter" in cli(nats, redis, "dead", "purge").stdout
    assert json.loads(cli(nats, redis, "dead", "list", "--json").stdout) == []
    assert "no dead letters" in cli(nats, redis, "dead", "list").stdout
    # The purged task keeps its FAILURE record.
    assert (await record_of(b.id))["state"] == "FAILURE"


async def test_a_task_that_crashes_its_worker_never_dead_letters_the_tasks_it_held(worker_factory, client, nats, redis, tmp_path):
    # Issue 15 item 1: with the threads pool, a segfaulting task takes its worker down with
    # every task the worker held (running or prefetched). Restarted as systemd would, only the
    # deliveries of the tasks that were running are charged: the poison task is dead-lettered as
    # WorkerLost after its own max_deliver - 1 runs; the 150 innocent tasks all succeed.
    marker = tmp_path / "poison"
    marker.write_text("segfault")
    args = ("--max-deliver", "3", "--ack-wait", "1")
    poison = await dead_tasks.segfault.delay(str(marker))
    innocent = [await dead_tasks.innocent.delay(i) for i in range(150)]
    workers = [worker_factory("dead_tasks", concurrency=4, args=args)]

    def keep_one_worker() -> None:
        if workers[-1].proc.poll() is not None:
            workers.append(worker_factory("dead_tasks", concurrency=4, args=args))

    async def all_settled() -> bool:
        records = [await record_of(r.id) for r in (poison, *innocent)]
        return all(r is not None and r["state"] in ("SUCCESS", "FAILURE") for r in records)

    await until(all_settled, "every task to finish", timeout=90, on_wait=keep_one_worker)
    record = await record_of(poison.id)
    assert record["state"] == "FAILURE" and record["error"]["type"] == "dbtask.WorkerLost", record
    assert "SIGSEGV" in record["error"]["message"], record
    assert "2 time(s) in 3 deliveries" in record["error"]["message"], record
    crashes = [w for w in workers if w.proc.poll() is not None]
    assert len(crashes) == 2, f"{len(crashes)} crashes: the poison task ran more or less than max_deliver - 1 times"
    for i, r in enumerate(innocent):
        got = await record_of(r.id)
        assert got["state"] == "SUCCESS" and got["result"] == i, got
    listed = json.loads(cli(nats, redis, "dead", "list", "--json").stdout)
    assert [x["task_id"] for x in listed] == [poison.id], listed
    assert "SIGSEGV" in listed[0]["reason"], listed[0]
    # The restarted worker said what it found.
    said = "".join(w.stderr_path.read_text() for w in workers)
    assert "a worker of these servers died holding tasks" in said, said[-3000:]


async def test_tasks_handed_back_unrun_at_shutdown_are_not_charged(worker_factory, client, tmp_path):
    # Two deploys in a row (SIGTERM while tasks wait in the prefetch) with max_deliver 2: the
    # waiting tasks go back to NATS twice without running, and still all run, none dead-lettered.
    args = ("--max-deliver", "2", "--ack-wait", "1", "--shutdown-timeout", "5")
    tasks = [await dead_tasks.innocent.delay(i) for i in range(60)]
    for _ in range(2):
        w = worker_factory("dead_tasks", concurrency=1, args=args)
        await asyncio.sleep(0.15)
        w.send(signal.SIGTERM)
        assert await w.wait_async(30) == 0
    worker_factory("dead_tasks", concurrency=4, args=args)
    for i, r in enumerate(tasks):
        assert await r.get(timeout=30) == i


async def test_result_of_an_unknown_task_is_pending(client, nats, redis):
    out = json.loads(cli(nats, redis, "result", "no-such-task").stdout)
    assert out == {"id": "no-such-task", "state": "PENDING"}


def test_the_command_line_says_when_nats_is_unreachable(tmp_path):
    proc = subprocess.run(
        [str(DBTASK), "--nats-url", "nats://127.0.0.1:1", "--timeout", "1", "dead", "list"],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "dbtask: error:" in proc.stderr and "127.0.0.1:1" in proc.stderr, proc.stderr


async def test_a_message_without_any_task_id_is_dead_lettered_not_dropped(worker, client, nats, redis):
    import nats as nats_py

    from e2e_tasks import add

    nc = await nats_py.connect(nats.url)
    try:
        await nc.jetstream().publish("dbtask.tasks.default", b"garbage without headers")
    finally:
        await nc.close()
    assert await (await add.delay(1, 2)).get(timeout=15) == 3

    async def listed():
        letters = json.loads(cli(nats, redis, "dead", "list", "--json").stdout)
        return letters or None

    letters = await until(listed, "the unreadable message in the dead-letter stream", timeout=15)
    assert len(letters) == 1, letters
    assert letters[0]["body"] == "garbage without headers"
    assert letters[0]["reason"].startswith("unreadable message without a task id:"), letters[0]
    assert worker.proc.poll() is None
