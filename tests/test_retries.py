"""Retries: automatic (autoretry_for) and explicit (dbtask.Retry, self.retry()), with delays
from the task's policy, the RETRY state while waiting, FAILURE after the last attempt, and no
retry lost when the worker dies between the failure and the retry."""

from __future__ import annotations

import asyncio
import time

import pytest

import dbtask
from e2e_support import wait_for_lines
from retry_tasks import (
    always_down,
    async_flaky,
    bound_retry,
    crash_then_fail,
    explicit,
    flaky,
    jittered,
    noop,
    retry_without_exc,
    slow_retry,
    wrong_error,
)

APP = "retry_tasks"


def runs(log) -> list[tuple[int, float, int]]:
    out = []
    for line in log.read_text().splitlines():
        retries, at, pid = line.split()
        out.append((int(retries), float(at), int(pid)))
    return out


def gaps(rows) -> list[float]:
    return [b[1] - a[1] for a, b in zip(rows, rows[1:])]


@pytest.mark.parametrize("task", [flaky, async_flaky], ids=["sync", "async"])
async def test_autoretry_retries_listed_exceptions_until_success(worker_factory, client, tmp_path, task):
    worker_factory(APP)
    log = tmp_path / "runs.txt"
    result = await task.delay(str(log), 2)
    assert await result.get(timeout=30) == 2, "the task sees its retry count in self.request.retries"
    rows = runs(log)
    assert [r[0] for r in rows] == [0, 1, 2]
    assert all(0.2 <= g < 2.0 for g in gaps(rows)), f"retry_delay is 0.2 s: {gaps(rows)}"
    info = await result.info()
    assert info["state"] == "SUCCESS" and info["retries"] == 2 and info["attempts"] == 3
    assert info["task"] == task.name


async def test_backoff_delays_grow_and_the_last_error_is_the_failure(worker_factory, client, tmp_path):
    worker_factory(APP)
    log = tmp_path / "runs.txt"
    result = await always_down.delay(str(log))
    with pytest.raises(dbtask.TaskError) as caught:
        await result.get(timeout=30)
    assert caught.value.exc_type == "retry_tasks.Flaky"
    assert "still down after 3 retries" in str(caught.value), "FAILURE carries the last error"
    rows = runs(log)
    assert [r[0] for r in rows] == [0, 1, 2, 3], "max_retries=3: four runs in all"
    # retry_backoff=0.2, no jitter, capped at 0.5: 0.2, 0.4, 0.5 (bounded, not exact).
    for gap, expected in zip(gaps(rows), [0.2, 0.4, 0.5]):
        assert expected <= gap < expected + 1.0, (gaps(rows), expected)
    info = await result.info()
    assert info["state"] == "FAILURE" and info["retries"] == 3 and info["attempts"] == 4


async def test_jitter_keeps_delays_within_the_backoff(worker_factory, client, tmp_path):
    worker_factory(APP)
    log = tmp_path / "runs.txt"
    result = await jittered.delay(str(log))
    with pytest.raises(dbtask.TaskError):
        await result.get(timeout=30)
    rows = runs(log)
    assert len(rows) == 4
    for n, gap in enumerate(gaps(rows)):
        assert 0 <= gap < 0.4 * 2**n + 1.0, (n, gaps(rows))


async def test_autoretry_only_for_the_listed_exceptions(worker_factory, client, tmp_path):
    worker_factory(APP)
    log = tmp_path / "runs.txt"
    result = await wrong_error.delay(str(log))
    with pytest.raises(ValueError, match="not retriable"):
        await result.get(timeout=20)
    await asyncio.sleep(0.5)  # a wrongly scheduled retry (0.1 s) would have run by now
    assert len(runs(log)) == 1
    assert (await result.info()).get("retries", 0) == 0


async def test_explicit_retry_records_its_exc(worker_factory, client, tmp_path):
    worker_factory(APP)
    log = tmp_path / "runs.txt"
    result = await explicit.delay(str(log), 2)
    assert await result.get(timeout=30) == "done after 3 runs"
    rows = runs(log)
    assert all(g >= 0.2 for g in gaps(rows)), gaps(rows)

    log2 = tmp_path / "runs2.txt"
    failing = await explicit.delay(str(log2), 10)  # max_retries=4: gives up
    with pytest.raises(KeyError):
        await failing.get(timeout=30)
    assert len(runs(log2)) == 5


async def test_bound_retry_sees_its_request(worker_factory, client, tmp_path):
    worker_factory(APP)
    log = tmp_path / "runs.txt"
    result = await bound_retry.delay(str(log), 2)
    request = await result.get(timeout=30)
    assert request == {"id": result.id, "task": bound_retry.name, "retries": 2, "attempt": 3}
    assert [r[0] for r in runs(log)] == [0, 1, 2]


async def test_a_bare_retry_with_no_retry_left_fails_clearly(worker_factory, client, tmp_path):
    worker_factory(APP)
    log = tmp_path / "runs.txt"
    result = await retry_without_exc.delay(str(log))
    with pytest.raises(dbtask.TaskError) as caught:
        await result.get(timeout=20)
    assert caught.value.exc_type == "dbtask.MaxRetriesExceeded"
    assert len(runs(log)) == 2


async def test_retry_state_is_visible_while_waiting(worker_factory, client, tmp_path):
    worker_factory(APP)
    log = tmp_path / "runs.txt"
    result = await slow_retry.delay(str(log))
    await wait_for_lines(log, 1)
    deadline = time.monotonic() + 2
    while (await result.state()) != "RETRY":
        assert time.monotonic() < deadline, await result.info()
        await asyncio.sleep(0.05)
    info = await result.info()
    assert info["error"]["type"] == "retry_tasks.Flaky"
    assert info["error"]["message"] == "first run fails"
    assert info.get("retries", 0) == 0 and info["task"] == slow_retry.name
    assert info["eta"] > time.time() + 1, "the next attempt is ~3 s away"
    assert await result.ready() is False
    assert await result.get(timeout=20) == 2
    assert runs(log)[1][1] - runs(log)[0][1] >= 3.0


async def test_a_worker_killed_between_failure_and_retry_still_retries(worker_factory, client, tmp_path):
    log = tmp_path / "runs.txt"
    doomed = worker_factory(APP, args=["--ack-wait", "2"])
    result = await crash_then_fail.delay(str(log))
    assert doomed.proc.wait(20) != 0, "the task kills its worker as it fails"
    assert await result.ready() is False
    rescuer = worker_factory(APP, args=["--ack-wait", "2"])
    assert await result.get(timeout=60) == 2
    rows = runs(log)
    assert rows[0][2] == doomed.pid and rows[-1][2] == rescuer.pid
    assert sorted({r[0] for r in rows}) == [0, 1, 2]


async def test_info_returns_the_whole_record(worker_factory, client, tmp_path):
    w = worker_factory(APP, args=["--result-extended"])
    log = tmp_path / "runs.txt"
    sent = time.time()
    result = await flaky.apply_async(str(log), 1, queue="default")
    assert await result.get(timeout=20) == 1
    info = await result.info()
    assert info["id"] == result.id
    assert info["state"] == "SUCCESS" and info["result"] == 1
    assert info["task"] == flaky.name and info["queue"] == "default"
    assert info["args"] == [str(log), 1] and info["kwargs"] == {}
    assert info["attempts"] == 2 and info["retries"] == 1
    assert info["worker"].endswith(f":{w.pid}")
    assert sent <= info["date_received"] <= info["date_started"] <= info["date_done"] <= time.time()
    assert "error" not in info, "the error of the retried run is not kept once it succeeded"


async def test_arguments_are_not_kept_by_default(worker_factory, client):
    worker_factory(APP)
    result = await noop.delay(5)
    assert await result.get(timeout=20) == 5
    info = await result.info()
    assert "args" not in info and "kwargs" not in info
