"""Inspect and control (issue 17, section 3) against a real cluster of two workers on the same
servers: `dbtask inspect ...` and `dbtask.inspect` see both workers with what they hold,
`dbtask control shutdown --worker ID` stops exactly that worker gracefully, `dbtask control
rate-limit` holds across both workers, and `dbtask purge` removes a backlog and counts it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

import dbtask
from dbtask._registry import TASKS
from e2e_support import DBTASK_CLI, Server, Worker, dbtask_cli, wait_for_lines, worker_env

import inspect_tasks

APP_TASKS = sorted(name for name in TASKS if name.startswith("inspect_tasks."))


def cli_json(nats: Server, redis: Server, *args: str) -> list[dict]:
    return json.loads(dbtask_cli(nats, redis, *args, "--json").stdout)


def by_worker(replies: list[dict]) -> dict[str, dict]:
    return {r["worker"]: r for r in replies}


def worker_id(w: Worker) -> str:
    line = next(x for x in w.stderr.splitlines() if "worker ready" in x)
    return line.split(" worker=")[1].split()[0]


def service_pings(nats: Server, wait: float = 1.0) -> list[dict]:
    """The replies to the NATS service API's `$SRV.PING.dbtask-worker` (what `nats micro ls`
    sends), over the plain NATS text protocol."""
    replies = []
    with socket.create_connection(("127.0.0.1", nats.port), timeout=wait) as sock:
        f = sock.makefile("rwb")
        f.readline()  # INFO
        f.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.pings 1\r\n')
        f.write(b"PUB $SRV.PING.dbtask-worker _INBOX.pings 0\r\n\r\n")
        f.flush()
        try:
            while True:
                line = f.readline()
                if not line:
                    break
                if line.startswith(b"MSG "):
                    size = int(line.split()[-1])
                    replies.append(json.loads(f.read(size + 2)[:size]))
                elif line.startswith(b"PING"):
                    f.write(b"PONG\r\n")
                    f.flush()
        except (socket.timeout, TimeoutError):
            pass
    return replies


def eventually(check, timeout: float = 20.0):
    """Calls `check()` until it returns something truthy without raising; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
            if found:
                return found
            error: Exception | None = None
        except AssertionError as e:
            error = e
        if time.monotonic() > deadline:
            raise AssertionError(f"still not so after {timeout} s") from error
        time.sleep(0.1)


async def test_inspect_sees_both_workers_and_shutdown_stops_only_the_named_one(worker_factory, client, nats, redis, tmp_path):
    # One running task and one waiting for the slot in each worker, two left in the stream.
    args = ["--prefetch", "1", "--shutdown-timeout", "30"]
    w1 = worker_factory("inspect_tasks", concurrency=1, args=args)
    w2 = worker_factory("inspect_tasks", concurrency=1, args=args)
    ids = {worker_id(w1), worker_id(w2)}
    assert len(ids) == 2
    marker, release = tmp_path / "started.txt", tmp_path / "release"
    results = [await inspect_tasks.hold.delay(str(marker), str(release), i) for i in range(6)]
    sent = {r.id for r in results}
    lines = await wait_for_lines(marker, 2)
    assert {line.split()[2] for line in lines} == {str(w1.pid), str(w2.pid)}, "each worker runs one"

    # ping (command line): every worker answers with its id.
    out = dbtask_cli(nats, redis, "inspect", "ping").stdout
    assert sorted(line.split(":")[0] + ":" + line.split(":")[1] for line in out.splitlines()) == sorted(ids)
    assert set(by_worker(cli_json(nats, redis, "inspect", "ping"))) == ids

    # stats (Python, async).
    stats = by_worker(await dbtask.inspect.stats(nats_url=nats.url))
    assert set(stats) == ids
    for wid, s in stats.items():
        assert s["pid"] == int(wid.rsplit(":", 1)[1])
        assert s["concurrency"] == 1 and s["prefetch"] == 1 and s["pool"] == "threads"
        assert s["queues"] == ["default"] and s["uptime"] > 0 and s["rss_bytes"] > 0
        assert s["running"] == 1 and s["processed"]["total"] == 0

    # registered (command line, JSON): the app's tasks on each worker.
    registered = by_worker(cli_json(nats, redis, "inspect", "registered"))
    assert set(registered) == ids
    assert all(r["tasks"] == APP_TASKS for r in registered.values()), registered

    # active (Python): the running task of each worker, with its runtime so far.
    active = by_worker(dbtask.inspect.active_sync(nats_url=nats.url))
    assert set(active) == ids
    running = set()
    for r in active.values():
        assert len(r["tasks"]) == 1, r
        t = r["tasks"][0]
        assert t["task"] == "inspect_tasks.hold" and t["queue"] == "default" and t["runtime"] >= 0
        running.add(t["id"])
    assert running < sent and len(running) == 2

    # reserved (command line): the prefetched task waiting in each worker.
    def reserved_one_each() -> dict:
        reserved = by_worker(cli_json(nats, redis, "inspect", "reserved"))
        assert set(reserved) == ids and all(len(r["tasks"]) == 1 for r in reserved.values()), reserved
        return reserved

    reserved = eventually(reserved_one_each)
    waiting = {r["tasks"][0]["id"] for r in reserved.values()}
    assert waiting < sent and not waiting & running

    # queues (Python): the backlog of two, from the queue's JetStream consumer, on each worker.
    def backlog_of_two() -> list:
        queues = dbtask.inspect.queues_sync(nats_url=nats.url)
        assert {r["worker"] for r in queues} == ids
        for r in queues:
            (q,) = r["queues"]
            assert q["queue"] == "default" and q["pending"] == 2, r
            assert {"priority": 5, "pending": 2} in [{k: lv[k] for k in ("priority", "pending")} for lv in q["levels"]]
        return queues

    eventually(backlog_of_two)

    # scheduled (command line): a countdown task waiting in the stream, with its eta.
    before = time.time()
    later = await inspect_tasks.add.apply_async(1, 2, countdown=600)
    scheduled = cli_json(nats, redis, "inspect", "scheduled")
    (entry,) = [s for s in scheduled if s["id"] == later.id]
    assert entry["task"] == "inspect_tasks.add" and entry["queue"] == "default"
    assert before + 599 <= entry["eta"] <= time.time() + 601
    assert [s["id"] for s in await dbtask.inspect.scheduled(nats_url=nats.url)] == [later.id]

    # The NATS service API sees both workers too (`nats micro ls`).
    pings = service_pings(nats)
    assert sorted(p["metadata"]["worker"] for p in pings) == sorted(ids)
    assert all(p["name"] == "dbtask-worker" and p["type"] == "io.nats.micro.v1.ping_response" for p in pings)

    # --worker: only that worker answers.
    only = dbtask.inspect.ping_sync(worker=worker_id(w2), nats_url=nats.url)
    assert [r["worker"] for r in only] == [worker_id(w2)]

    # control shutdown --worker: w1 stops gracefully (its running task finishes, its waiting
    # one goes back to NATS), w2 keeps serving and runs the rest.
    out = dbtask_cli(nats, redis, "control", "shutdown", "--worker", worker_id(w1)).stdout
    assert out.strip() == f"{worker_id(w1)}: shutting down"
    eventually(lambda: "draining: waiting for running tasks" in w1.stderr)
    assert w1.proc.poll() is None, "it waits for its running task"
    assert [r["worker"] for r in dbtask.inspect.ping_sync(nats_url=nats.url)] == [worker_id(w2)]
    release.touch()
    assert await w1.wait_async(30) == 0
    assert "worker stopped" in w1.stderr
    assert sorted([await r.get(timeout=30) for r in results]) == list(range(6))
    assert w2.proc.poll() is None
    assert [r["worker"] for r in dbtask.inspect.ping_sync(nats_url=nats.url)] == [worker_id(w2)]


async def test_rate_limit_set_at_run_time_holds_across_both_workers(worker_factory, client, nats, redis, tmp_path):
    w1 = worker_factory("inspect_tasks", args=["--prefetch", "0"])
    w2 = worker_factory("inspect_tasks", args=["--prefetch", "0"])
    ids = {worker_id(w1), worker_id(w2)}
    out = dbtask_cli(nats, redis, "control", "rate-limit", "inspect_tasks.stamp", "10/s").stdout
    assert sorted(out.splitlines()) == sorted(f"{w}: rate limit of inspect_tasks.stamp set to 10/s" for w in ids)
    stats = await dbtask.inspect.stats(nats_url=nats.url)
    assert all(s["rate_limit_overrides"] == {"inspect_tasks.stamp": "10/s"} for s in stats) and len(stats) == 2

    path = tmp_path / "stamps.txt"
    count = 21
    results = await inspect_tasks.stamp.apply_many([(str(path), i) for i in range(count)])
    assert sorted([await r.get(timeout=30) for r in results]) == list(range(count))
    lines = (await wait_for_lines(path, count))[:count]
    starts = sorted(float(x.split()[0]) for x in lines)
    assert {int(x.split()[1]) for x in lines} == {w1.pid, w2.pid}, "both workers ran some"
    # One budget of 10/s for the cluster: 21 starts take 2 s at least (two per-worker budgets
    # would take 1 s, no limit a few ms).
    assert starts[-1] - starts[0] >= 1.8, starts

    # Kept in Redis for workers started later.
    held = subprocess.run(["redis-cli", "-p", str(redis.port), "HGET", "dbtask:rate_limits", "inspect_tasks.stamp"], capture_output=True, text=True, check=True)
    assert held.stdout.strip() == "10/s"
    w3 = worker_factory("inspect_tasks")
    (s3,) = dbtask.inspect.stats_sync(worker=worker_id(w3), nats_url=nats.url)
    assert s3["rate_limit_overrides"] == {"inspect_tasks.stamp": "10/s"}

    # A bad rate or an unknown task is refused by every worker, and nothing changes.
    bad = dbtask_cli(nats, redis, "control", "rate-limit", "inspect_tasks.stamp", "ten/s", check=False)
    assert bad.returncode == 1 and "invalid rate_limit" in bad.stdout
    unknown = await dbtask.control.rate_limit("nope.never", "5/s", nats_url=nats.url)
    assert len(unknown) == 3 and all("not registered" in r["error"] for r in unknown)


async def test_purge_removes_a_queue_backlog_and_counts_it(client, nats, redis, tmp_path):
    # No worker: the backlog stays in the stream, on two priority levels.
    await inspect_tasks.add.apply_many([(i, i) for i in range(7)])
    for i in range(3):
        await inspect_tasks.add.apply_async(i, i, priority=9)
    later = await inspect_tasks.add.apply_async(1, 1, countdown=600)

    no = subprocess.run([str(DBTASK_CLI), "purge", "default"], input="n\n", capture_output=True, text=True, env=worker_env(DBTASK_NATS_URL=nats.url), timeout=60)
    assert no.returncode == 1 and "nothing purged" in no.stderr
    yes = subprocess.run([str(DBTASK_CLI), "purge", "default"], input="y\n", capture_output=True, text=True, env=worker_env(DBTASK_NATS_URL=nats.url), timeout=60)
    assert yes.returncode == 0, yes.stderr
    assert "purged 10 tasks from queue default" in yes.stdout
    assert "purged 0 tasks" in dbtask_cli(nats, redis, "purge", "-f", "default").stdout
    assert await dbtask.control.purge("default", nats_url=nats.url) == 0
    # The scheduled task is not part of the backlog: it is still there.
    assert [s["id"] for s in dbtask.inspect.scheduled_sync(nats_url=nats.url)] == [later.id]
    with pytest.raises(ValueError, match="queue"):
        dbtask.control.purge_sync("no such queue", nats_url=nats.url)
