"""The application's own tests: real nats-server, redis-server and dbtask-worker, started by
the `dbtask_worker` fixture of dbtask's pytest plugin, nothing else to set up."""

import pytest

from myapp.tasks import add, checkout, double_then_add, slow_double


def test_a_task_runs_on_a_real_worker(dbtask_worker):
    dbtask_worker()  # app from the ini option dbtask_app
    assert add.delay_sync(2, 3).get_sync(timeout=10) == 5


async def test_async_code_awaits_results(dbtask_worker):
    dbtask_worker(app="myapp.tasks", concurrency=4)
    results = [await slow_double.delay(i) for i in range(10)]
    assert [await r.get(timeout=10) for r in results] == [2 * i for i in range(10)]


def test_a_failing_task_raises_its_error_in_the_caller(dbtask_worker):
    dbtask_worker()
    with pytest.raises(ValueError, match="the cart is empty"):
        checkout.delay_sync([]).get_sync(timeout=10)
    assert checkout.delay_sync([["tea", 3], ["cake", 4]]).get_sync(timeout=10) == {"items": 2, "total": 7}


def test_a_workflow_runs_across_two_workers(dbtask_worker):
    first = dbtask_worker()
    second = dbtask_worker()
    assert first.pid != second.pid
    assert double_then_add(5, 1).apply_async_sync().get_sync(timeout=10) == 11


SEEN: list[str] = []


@pytest.mark.parametrize("round", [1, 2])
def test_each_test_gets_fresh_servers(round, dbtask_servers, dbtask_worker):
    worker = dbtask_worker(queues=["default"])
    assert dbtask_servers.nats_url in worker.logs()  # the worker uses this test's servers
    result = add.apply_async_sync(1, 1, task_id="same-id-in-every-test")
    if round == 2:
        # Round 1 stored a result under this id on its own servers; these are new ones.
        assert dbtask_servers.nats_url not in SEEN
    assert result.get_sync(timeout=10) == 2
    SEEN.append(dbtask_servers.nats_url)
