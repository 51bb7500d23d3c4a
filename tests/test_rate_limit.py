"""Rate limits (issue 3, item 6): `@task(rate_limit=...)` holds across every worker of the
cluster, excess tasks wait (none is dropped), bad rates are refused clearly."""

from __future__ import annotations

import pytest

import dbtask
from e2e_support import PLAIN_AND_CLUSTER, scan_keys, wait_for_lines

import rate_tasks

LIMIT = 20.0  # rate_tasks.limited: "20/s"
TASKS = 60


@PLAIN_AND_CLUSTER
async def test_rate_limit_holds_across_two_worker_processes(worker_factory, client, redis, tmp_path):
    out = tmp_path / "starts.txt"
    # No prefetch: each worker holds at most its 4 running tasks, so the first one to pull
    # cannot take all 60 at once and both run some.
    w1 = worker_factory("rate_tasks", concurrency=4, args=["--prefetch", "0"])
    w2 = worker_factory("rate_tasks", concurrency=4, args=["--prefetch", "0"])
    results = await rate_tasks.limited.apply_many([(str(out), i) for i in range(TASKS)])
    lines = await wait_for_lines(out, TASKS, timeout=60)
    # Every task ran, exactly once, and each returned its own value: nothing dropped.
    assert sorted(int(line.split()[2]) for line in lines) == list(range(TASKS))
    assert [await r.get(timeout=30) for r in results] == list(range(TASKS))
    starts = sorted(float(line.split()[0]) for line in lines)
    pids = {int(line.split()[1]) for line in lines}
    assert pids == {w1.pid, w2.pid}, "both workers must have run some of the tasks"
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    # Per-worker limits would give about 40/s here; one cluster-wide limit gives 20/s.
    assert LIMIT * 0.8 <= rate <= LIMIT * 1.2, f"{rate:.1f} tasks/s for a limit of {LIMIT}/s"


@PLAIN_AND_CLUSTER
async def test_only_rate_limited_tasks_touch_the_limiter_in_redis(worker_factory, client, redis, tmp_path):
    def rate_keys() -> list[str]:
        return scan_keys(redis, "dbtask:rate:*")

    out = tmp_path / "starts.txt"
    worker_factory("rate_tasks")
    for r in await rate_tasks.unlimited.apply_many([(str(out), i) for i in range(5)]):
        await r.get(timeout=30)
    assert rate_keys() == []
    await (await rate_tasks.limited.delay(str(out), 99)).get(timeout=30)
    assert rate_keys() == ["dbtask:rate:rate.limited"]


def test_a_bad_rate_limit_is_refused_when_the_task_is_declared():
    for bad in ["", "0/s", "ten/s", "10/d", "1.5/s", "-3/m"]:
        with pytest.raises(ValueError, match="invalid rate_limit"):

            @dbtask.task(name="rate.never", rate_limit=bad)
            def never() -> None: ...


def test_the_worker_refuses_to_start_with_a_rate_limit_it_cannot_parse(worker_factory):
    w = worker_factory("bad_rate_app", ready=False)
    code = w.wait(timeout=60)
    assert code != 0
    assert "rate.bad" in w.stderr and 'invalid rate_limit "5/fortnight"' in w.stderr, w.stderr
