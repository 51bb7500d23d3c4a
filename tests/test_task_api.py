"""The task API of issue 19 against a real worker: `dbtask.current_task()` and its request
(thread pool, asyncio, process pool, workflows), results kept or ignored (`ignore_result`,
`store_errors_even_if_ignored`, `result_ttl`, `forget()`), progress (`update_state`,
`info()`, `progress()`), and the tasks' logging and `print()` in the worker's log stream."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

import dbtask
from e2e_support import wait_for_lines
from taskapi_tasks import (
    async_counting,
    async_request,
    bad_state,
    bound_request,
    chatty,
    counting,
    fire_and_forget,
    first_step,
    ignored_failure,
    next_step,
    plain,
    request_of,
    short_lived,
    silent_failure,
)

APP = "taskapi_tasks"


@pytest.fixture
def worker(worker_factory):
    """One worker on queue `default` with this module's tasks."""
    return worker_factory(APP)


def redis_cli(redis, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(redis.port), *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()


async def test_current_task_gives_the_request_in_sync_async_and_bound_tasks(worker_factory, client) -> None:
    w = worker_factory(APP, queues="default,other")
    assert dbtask.current_task() is None, "outside a task there is none"

    r = await request_of.apply_async(queue="other", countdown=0.5)
    req = await r.get(timeout=20)
    assert req["id"] == r.id and req["task"] == request_of.name
    assert req["queue"] == "other" and req["retries"] == 0
    assert req["eta"] is not None and req["eta"] > time.time() - 60
    assert req["parent_id"] is None and req["root_id"] == r.id
    assert req["pid"] == w.pid

    same, req = await (await bound_request.delay()).get(timeout=20)
    assert same is True, "current_task() is the self of a bound task"
    assert req["task"] == bound_request.name and req["queue"] == "default" and req["eta"] is None

    r = await async_request.delay()
    outer, inner = await r.get(timeout=20)
    assert outer["id"] == r.id and outer["task"] == async_request.name
    assert inner == outer, "a child asyncio task inherits the context"


async def test_a_workflow_step_knows_its_parent_and_root(worker, client) -> None:
    chain = await (first_step.s() | next_step.s() | next_step.s()).apply_async()
    last = await chain.get(timeout=20)
    assert last["id"] == chain.id
    # Its parent is the middle step, whose parent is the root: the first step.
    middle = await dbtask.AsyncResult(last["parent_id"]).get(timeout=5)
    assert middle["id"] == last["parent_id"] != last["root_id"]
    assert middle["parent_id"] == middle["root_id"] == last["root_id"]
    assert await dbtask.AsyncResult(last["root_id"]).get(timeout=5) == 1


async def test_current_task_in_a_pool_process(worker_factory, client) -> None:
    w = worker_factory(APP, concurrency=1, args=("--pool", "processes"))
    r = await request_of.delay()
    req = await r.get(timeout=20)
    assert req["id"] == r.id and req["task"] == request_of.name and req["queue"] == "default"
    assert req["pid"] != w.pid, "it ran in a child"


async def test_ignore_result_stores_nothing_on_success_and_get_says_so_at_once(worker, redis, client, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    r = await fire_and_forget.delay(str(ran))
    assert isinstance(r, dbtask.IgnoredResult)
    start = time.monotonic()
    with pytest.raises(dbtask.ResultIgnored, match="ignore_result"):
        await r.get(timeout=30)
    assert time.monotonic() - start < 1, "get() refuses at once instead of waiting"
    await wait_for_lines(ran, 1)
    # The worker has run it; whatever it writes is queued before the ack: give it a moment.
    await asyncio.sleep(0.3)
    assert redis_cli(redis, "EXISTS", f"dbtask:result:{{{r.id}}}") == "0"
    assert await r.state() == "PENDING"

    # apply_async(ignore_result=True) on a task that keeps its results, and the opposite.
    r = await plain.apply_async(7, ignore_result=True)
    with pytest.raises(dbtask.ResultIgnored):
        r.get_sync()
    kept = await fire_and_forget.apply_async(str(ran), ignore_result=False)
    assert await kept.get(timeout=20) == "not stored"
    await wait_for_lines(ran, 2)
    await asyncio.sleep(0.3)
    assert redis_cli(redis, "EXISTS", f"dbtask:result:{{{r.id}}}") == "0"


async def test_ignored_failures_are_recorded_unless_told_otherwise(worker, redis, client, tmp_path: Path) -> None:
    r = await ignored_failure.delay()
    with pytest.raises(dbtask.ResultIgnored):
        await r.get()
    deadline = time.monotonic() + 20
    while (info := await r.info())["state"] == "PENDING" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert info["state"] == "FAILURE" and info["error"]["type"] == "ValueError"

    ran = tmp_path / "ran"
    r = await silent_failure.delay(str(ran))
    await wait_for_lines(ran, 1)
    await asyncio.sleep(0.3)
    assert redis_cli(redis, "EXISTS", f"dbtask:result:{{{r.id}}}") == "0"


async def test_result_ttl_per_task_and_forget(worker, redis, client) -> None:
    r = await short_lived.delay()
    assert await r.get(timeout=20) == "gone soon"
    ttl = int(redis_cli(redis, "TTL", f"dbtask:result:{{{r.id}}}"))
    assert 0 < ttl <= 30, f"the task's result_ttl, not the worker's day: {ttl}"
    other = await plain.delay(1)
    await other.get(timeout=20)
    assert int(redis_cli(redis, "TTL", f"dbtask:result:{{{other.id}}}")) > 3600

    await r.forget()
    assert await r.state() == "PENDING"
    other.forget_sync()
    assert other.info_sync() == {"id": other.id, "state": "PENDING"}


async def test_progress_arrives_while_the_task_runs_in_order(worker, client, tmp_path: Path) -> None:
    go = tmp_path / "go"
    r = await counting.delay(4, str(go))
    seen = []
    async for update in r.progress(timeout=20):
        seen.append(update)
        if update["state"] == "PROGRESS" and update["meta"]["done"] == 1:
            # The task waits for this file: this update came while it was still running.
            assert (await r.info())["meta"] == {"done": 1, "total": 4}
            go.touch()
    states = [(u["state"], u.get("meta", {}).get("done")) for u in seen]
    assert states == [("PROGRESS", 1), ("PROGRESS", 2), ("PROGRESS", 3), ("PROGRESS", 4), ("SUCCESS", None)]
    assert seen[-1]["result"] == 4
    assert all(u["task"] == counting.name for u in seen)
    # Over, the record is the final one.
    assert (await r.info())["state"] == "SUCCESS"


def test_progress_sync_iterator_and_async_tasks(worker, nats, redis) -> None:
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    try:
        r = async_counting.delay_sync(3)
        states = [(u["state"], u.get("meta")) for u in r.progress_sync(timeout=20)]
        # The stream starts from the current record: updates stored before it subscribed
        # are seen as the latest one, later ones each in turn.
        assert states[-1] == ("SUCCESS", None)
        progress = [m["done"] for s, m in states if s == "PROGRESS"]
        assert progress == sorted(progress) and progress[-1] == 3
        assert r.get_sync(timeout=5) == 3
    finally:
        dbtask.close_sync()


async def test_progress_from_a_pool_process(worker_factory, client, tmp_path: Path) -> None:
    worker_factory(APP, concurrency=1, args=("--pool", "processes"))
    go = tmp_path / "go"
    r = await counting.delay(2, str(go))
    seen = []
    async for update in r.progress(timeout=20):
        seen.append((update["state"], update.get("meta", {}).get("done")))
        if seen[-1] == ("PROGRESS", 1):
            go.touch()
    assert seen == [("PROGRESS", 1), ("PROGRESS", 2), ("SUCCESS", None)]


async def test_update_state_refuses_builtin_states_and_unserializable_meta(worker, client) -> None:
    kind, message = await (await bad_state.delay("SUCCESS")).get(timeout=20)
    assert kind == "ValueError" and "built-in states" in message
    kind, message = await (await bad_state.delay("")).get(timeout=20)
    assert kind == "ValueError"
    kind, message = await (await bad_state.delay("PROGRESS", unserializable=True)).get(timeout=20)
    assert kind == "TypeError" and "JSON-serializable" in message
    r = await bad_state.apply_async(args=("PROGRESS",), kwargs={"meta": {"ok": [1, 2]}})
    assert await r.get(timeout=20) is None
    with pytest.raises(RuntimeError, match="outside"):
        counting(1)  # called here, not by a worker


async def test_task_logging_reaches_the_json_log_with_its_task_id(worker_factory, client) -> None:
    w = worker_factory(APP, args=("--log-format", "json"))
    r = await chatty.delay("hello")
    task_id = await r.get(timeout=20)
    assert task_id == r.id
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = [json.loads(line) for line in w.stderr.splitlines() if line.startswith("{")]
        said = [e for e in events if e.get("message") == "said hello"]
        printed = [e for e in events if e.get("message") == "printed hello"]
        if said and printed:
            break
        await asyncio.sleep(0.05)
    assert said and said[0]["task_id"] == r.id and said[0]["task_name"] == chatty.name
    assert said[0]["level"] == "INFO" and said[0]["logger"] == "taskapi"
    assert printed and printed[0]["stream"] == "stdout" and printed[0]["task_id"] == r.id
    assert not [e for e in events if e.get("message") == "quietly hello"], "the worker's log level applies"


async def test_task_logging_in_text_has_a_readable_prefix(worker_factory, client) -> None:
    w = worker_factory(APP, args=("--log-level", "debug"))
    r = await chatty.delay("there")
    await r.get(timeout=20)
    deadline = time.monotonic() + 10
    while f"{chatty.name}[{r.id}]: quietly there" not in w.stderr and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert f"{chatty.name}[{r.id}]: said there" in w.stderr
    assert f"{chatty.name}[{r.id}]: quietly there" in w.stderr, "debug shows at --log-level debug"


async def test_a_meta_over_max_result_bytes_is_refused_clearly(worker_factory, client) -> None:
    worker_factory(APP, args=("--max-result-bytes", "1000"))
    r = await bad_state.delay("PROGRESS", {"blob": "x" * 2000})
    kind, message = await r.get(timeout=20)
    assert kind == "RuntimeError" and "max_result_bytes (1000)" in message
    assert (await (await bad_state.delay("PROGRESS", {"small": 1})).get(timeout=20)) is None
