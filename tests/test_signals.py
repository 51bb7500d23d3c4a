"""Task-class hooks and `dbtask.signals` against a real worker (`-A hook_tasks`): each hook
and signal fires once per event, in Celery's order, for sync and async tasks and in pool
processes; a raising receiver or hook is logged with its traceback and the task's outcome is
unchanged."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

import dbtask
from hook_tasks import (
    async_hooked_add,
    async_hooked_fail,
    hooked_add,
    hooked_fail,
    hooked_retry,
    plain_add,
    plain_retry,
)

APP = "hook_tasks"


def events(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def wait_events(path: Path, done, timeout: float = 15.0) -> list[list]:
    """The events once `done(events)` holds (the last hooks run after the record is stored)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = events(path)
        if done(seen) or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.02)


def of(seen: list[list], task_id: str) -> list[str]:
    return [e[0] for e in seen if len(e) > 1 and e[1] == task_id]


@pytest.fixture
def events_path(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


@pytest.fixture
def hooked_worker(worker_factory, events_path: Path):
    return worker_factory(APP, env={"DBTASK_TEST_EVENTS": str(events_path)})


SUCCESS = ["task_prerun", "before_start", "on_success", "task_success", "after_return", "task_postrun"]
FAILURE = ["task_prerun", "before_start", "on_failure", "task_failure", "after_return", "task_postrun"]


async def test_hooks_and_signals_fire_once_in_order_for_sync_tasks(hooked_worker, events_path: Path, client) -> None:
    ok = await hooked_add.delay(2, 3)
    assert await ok.get(timeout=20) == 5
    bad = await hooked_fail.delay()
    with pytest.raises(ValueError, match="boom"):
        await bad.get(timeout=20)
    plain = await plain_add.delay(1, 1)
    assert await plain.get(timeout=20) == 2
    seen = await wait_events(events_path, lambda s: of(s, plain.id)[-1:] == ["task_postrun"])

    assert of(seen, ok.id) == SUCCESS
    assert ["on_success", ok.id, 5] in seen and ["after_return", ok.id, "SUCCESS"] in seen
    assert ["before_start", ok.id, [2, 3]] in seen and ["task_postrun", ok.id, "SUCCESS"] in seen
    assert of(seen, bad.id) == FAILURE
    assert ["on_failure", bad.id, "ValueError", True] in seen, "einfo carries the traceback"
    assert ["task_failure", bad.id, "ValueError"] in seen
    # A task without hooks still sends the task signals (they have receivers here).
    assert of(seen, plain.id) == ["task_prerun", "task_success", "task_postrun"]
    # Worker signals: init after the imports, then ready.
    names = [e[0] for e in seen]
    assert names.count("worker_init") == 1 and names.count("worker_ready") == 1
    assert names.index("worker_init") < names.index("worker_ready")

    hooked_worker.send(signal.SIGTERM)
    await hooked_worker.wait_async(20)
    assert [e[0] for e in events(events_path)].count("worker_shutdown") == 1


async def test_async_hooks_are_awaited_for_async_tasks(hooked_worker, events_path: Path, client) -> None:
    ok = await async_hooked_add.delay(4, 5)
    assert await ok.get(timeout=20) == 9
    bad = await async_hooked_fail.delay()
    with pytest.raises(KeyError):
        await bad.get(timeout=20)
    seen = await wait_events(events_path, lambda s: of(s, bad.id)[-1:] == ["task_postrun"])
    assert of(seen, ok.id) == SUCCESS
    assert of(seen, bad.id) == FAILURE
    assert ["on_success", ok.id, 9] in seen


async def test_retry_hooks_then_success(hooked_worker, events_path: Path, client) -> None:
    r = await hooked_retry.delay()
    assert await r.get(timeout=20) == "second run"
    exhausted = await plain_retry.delay()
    with pytest.raises(dbtask.MaxRetriesExceeded):
        await exhausted.get(timeout=20)
    seen = await wait_events(events_path, lambda s: of(s, exhausted.id)[-1:] == ["task_postrun"])
    first_run = ["task_prerun", "before_start", "on_retry", "task_retry", "after_return", "task_postrun"]
    assert of(seen, r.id) == first_run + SUCCESS
    assert ["task_retry", r.id, "Retry"] in seen
    # No retry left: the run is a failure for the hooks too, as for the worker.
    assert of(seen, exhausted.id) == ["task_prerun", "task_failure", "task_postrun"]


async def test_raising_receivers_and_hooks_are_logged_and_change_nothing(worker_factory, events_path: Path, client) -> None:
    w = worker_factory(
        APP,
        env={
            "DBTASK_TEST_EVENTS": str(events_path),
            "DBTASK_TEST_RAISE": "task_prerun,on_success,task_success,after_return,worker_init,on_failure",
        },
    )
    ok = await hooked_add.delay(1, 2)
    assert await ok.get(timeout=20) == 3
    bad = await hooked_fail.delay()
    with pytest.raises(ValueError, match="boom"):
        await bad.get(timeout=20)
    seen = await wait_events(events_path, lambda s: of(s, bad.id)[-1:] == ["task_postrun"])
    assert of(seen, ok.id) == SUCCESS, "every hook and receiver still ran once"
    assert of(seen, bad.id) == FAILURE
    assert (await ok.info())["state"] == "SUCCESS"
    logs = w.stderr
    assert "signal task_prerun: receiver" in logs and "RuntimeError: task_prerun raises on purpose" in logs
    assert f"{hooked_add.name}.on_success raised; the task's outcome is unchanged" in logs
    assert "RuntimeError: on_success raises on purpose" in logs
    assert "signal worker_init: receiver" in logs
    assert "Traceback (most recent call last)" in logs


async def test_worker_process_init_runs_in_each_pool_process(worker_factory, events_path: Path, client) -> None:
    w = worker_factory(APP, concurrency=2, args=("--pool", "processes"), env={"DBTASK_TEST_EVENTS": str(events_path)})
    r = await hooked_add.delay(20, 22)
    assert await r.get(timeout=20) == 42
    seen = await wait_events(events_path, lambda s: of(s, r.id)[-1:] == ["task_postrun"])
    children = {e[1] for e in seen if e[0] == "worker_process_init"}
    assert len(children) == 2 and w.pid not in children
    assert [e for e in seen if e[0] == "worker_init"] == [["worker_init", w.pid]]
    assert of(seen, r.id) == SUCCESS


async def test_task_revoked_signal(hooked_worker, events_path: Path, client) -> None:
    task_id = "revoked-before-it-ran"
    await dbtask.revoke(task_id)
    await asyncio.sleep(0.2)  # the worker hears the revocation on its channel
    r = await plain_add.apply_async(1, 2, task_id=task_id)
    with pytest.raises(dbtask.TaskRevoked):
        await r.get(timeout=20)
    seen = await wait_events(events_path, lambda s: of(s, task_id))
    assert of(seen, task_id) == ["task_revoked"]
    assert ["task_revoked", task_id, False, False] in seen
