"""Eager mode (``dbtask.init(eager=True)``): tasks run in this process, through the same
argument checks and JSON encoding as a real call, and ``get()`` gives what a real ``get()``
gives. No server is started or contacted by any test here."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any, Iterator

import pytest

import dbtask
from dbtask import Chord, Group, signals

CALLS: list[Any] = []


class PaymentDeclined(Exception):
    pass


@dbtask.task(name="eager.add")
def add(x: int, y: int) -> int:
    return x + y


@dbtask.task(name="eager.mul")
def mul(x: int, y: int) -> int:
    return x * y


@dbtask.task(name="eager.tsum")
def tsum(values: list[int]) -> int:
    return sum(values)


@dbtask.task(name="eager.amul")
async def amul(x: int, y: int) -> int:
    await asyncio.sleep(0)
    return x * y


@dbtask.task(name="eager.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@dbtask.task(name="eager.declined")
def declined() -> None:
    raise PaymentDeclined("card refused")


@dbtask.task(name="eager.flaky", bind=True, max_retries=3, retry_delay=60)
def flaky(self: Any, succeed_at: int) -> dict[str, int]:
    CALLS.append(self.request.retries)
    if self.request.retries < succeed_at:
        raise self.retry(exc=ConnectionError("not yet"), countdown=3600)
    return {"retries": self.request.retries}


@dbtask.task(name="eager.auto", autoretry_for=(KeyError,), max_retries=2)
def auto() -> None:
    CALLS.append("auto")
    raise KeyError("missing")


@dbtask.task(name="eager.returns_set")
def returns_set() -> Any:
    return {1, 2}


@dbtask.task(name="eager.tuple")
def as_tuple(x: int) -> Any:
    return (x, "a")


@dbtask.task(name="eager.record")
def record(*args: Any) -> list[Any]:
    CALLS.append(list(args))
    return list(args)


@dbtask.task(name="eager.who")
def who() -> dict[str, Any]:
    me = dbtask.current_task()
    assert me is not None
    return {"id": me.request.id, "parent": me.request.parent_id, "root": me.request.root_id}


@dbtask.task(name="eager.fan_out")
def fan_out(n: int) -> list[str]:
    # Sent from inside a task: queued, run after this one (or when waited for).
    return [add.delay_sync(i, i).id for i in range(n)]


@dbtask.task(name="eager.wait_inside")
def wait_inside() -> int:
    return add.delay_sync(20, 22).get_sync(timeout=1)


@pytest.fixture(autouse=True)
def eager() -> Iterator[None]:
    CALLS.clear()
    dbtask.init_sync(eager=True)
    yield
    dbtask.close_sync()


def test_delay_sync_runs_the_task_and_get_returns_its_json_result():
    result = add.delay_sync(2, 3)
    assert result.get_sync(timeout=1) == 5
    assert result.state_sync() == "SUCCESS"
    info = result.info_sync()
    assert info["task"] == "eager.add" and info["queue"] == "default"
    # A result comes back as JSON gives it, as from a worker: a tuple is a list.
    assert as_tuple.delay_sync(1).get_sync() == [1, "a"]
    assert dbtask.AsyncResult(result.id).get_sync() == 5


async def test_delay_and_apply_async_from_async_code():
    result = await add.delay(1, 2)
    assert await result.get(timeout=1) == 3
    assert await (await amul.delay(6, 7)).get() == 42
    mine = await add.apply_async(args=(4, 4), task_id="my-own-id", countdown=3600, priority=9)
    assert mine.id == "my-own-id"
    # countdown/eta are not waited for: the task ran already.
    assert await dbtask.AsyncResult("my-own-id").get() == 8


def test_async_task_from_sync_code():
    assert amul.delay_sync(3, 4).get_sync() == 12


def test_an_argument_that_cannot_travel_fails_at_the_call_as_for_real():
    with pytest.raises(ValueError, match=r"args\[1\].*not JSON-serializable"):
        add.delay_sync(1, object())
    with pytest.raises(ValueError, match="not valid JSON"):
        add.delay_sync(1, float("nan"))
    with pytest.raises(ValueError, match="not JSON-serializable"):
        add.delay_sync(datetime.now(timezone.utc), 1)
    with pytest.raises(TypeError, match="unknown option 'acks_late'"):
        add.apply_async_sync(1, 2, acks_late=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="priority"):
        add.apply_async_sync(1, 2, priority=10)
    assert CALLS == []


def test_bad_arguments_and_unknown_tasks_are_recorded_as_a_worker_records_them():
    with pytest.raises(dbtask.InvalidArguments, match="arguments do not fit eager.add"):
        add.delay_sync(1).get_sync()
    with pytest.raises(dbtask.UnknownTask, match="no-such-task"):
        dbtask.signature({"task": "no-such-task"}).apply_async_sync().get_sync()


def test_a_failing_task_raises_from_get_as_a_real_get_does():
    result = fail.delay_sync("boom")
    with pytest.raises(ValueError, match="^boom$") as caught:
        result.get_sync()
    assert isinstance(caught.value.__cause__, dbtask.RemoteTraceback)
    assert "in fail" in str(caught.value.__cause__)
    assert result.state_sync() == "FAILURE"
    # Not a builtin: a TaskError naming the remote type, as from a worker.
    with pytest.raises(dbtask.TaskError) as err:
        declined.delay_sync().get_sync()
    assert err.value.exc_type == f"{__name__}.PaymentDeclined"
    assert err.value.message == "card refused"


def test_an_unserializable_return_value_fails_the_task():
    with pytest.raises(dbtask.UnserializableResult, match="set"):
        returns_set.delay_sync().get_sync()


def test_retries_run_again_at_once_up_to_max_retries():
    result = flaky.delay_sync(2)
    assert result.get_sync() == {"retries": 2}
    assert CALLS == [0, 1, 2]
    assert result.info_sync()["retries"] == 2
    CALLS.clear()
    # No retry left: the error the retry carried is the failure.
    with pytest.raises(ConnectionError, match="not yet"):
        flaky.delay_sync(10).get_sync()
    assert CALLS == [0, 1, 2, 3]
    CALLS.clear()
    with pytest.raises(KeyError):
        auto.delay_sync().get_sync()
    assert CALLS == ["auto"] * 3


def test_a_chain_runs_in_order_each_result_prepended():
    handle = (add.s(1, 2) | mul.s(10) | record.s("end")).apply_async_sync()
    assert handle.get_sync() == [30, "end"]
    assert CALLS == [[30, "end"]]


async def test_a_chain_from_async_code_and_its_steps_know_their_parent():
    first = add.si(1, 1)
    first.freeze()  # its id, known before it is sent
    handle = await (first | who.si()).apply_async()
    got = await handle.get()
    assert got["parent"] == first.id and got["root"] == first.id


def test_a_failing_step_stops_the_chain_and_its_result_raises():
    handle = (add.s(1, 2) | fail.si("step two") | record.s()).apply_async_sync()
    with pytest.raises(ValueError, match="step two"):
        handle.get_sync()
    assert CALLS == []


def test_a_group_and_a_chord():
    group = Group([add.s(i, i) for i in range(4)]).apply_async_sync()
    assert group.get_sync() == [0, 2, 4, 6]
    again = dbtask.GroupResult.restore_sync(group.id)
    assert again.get_sync() == [0, 2, 4, 6]
    chord = Chord([add.s(i, 1) for i in range(3)], tsum.s()).apply_async_sync()
    assert chord.get_sync() == 1 + 2 + 3
    # In a chain, a group followed by a step is a chord.
    assert (Group([mul.s(2, 3), mul.s(4, 5)]) | tsum.s()).apply_async_sync().get_sync() == 26


def test_a_chord_whose_member_fails_raises_chord_error():
    chord = Chord([add.s(1, 1), fail.si("member down")], tsum.s()).apply_async_sync()
    with pytest.raises(dbtask.ChordError, match="member down"):
        chord.get_sync()


def test_link_and_link_error_callbacks_run():
    add.apply_async_sync(2, 2, link=record.s("ok"))
    assert CALLS == [[4, "ok"]]
    CALLS.clear()
    failed = fail.apply_async_sync("bad", link_error=record.s())
    assert CALLS[0][0] == failed.id
    assert CALLS[0][1]["type"] == "ValueError" and CALLS[0][1]["message"] == "bad"


def test_tasks_sent_from_a_task_run_after_it_or_when_waited_for():
    ids = fan_out.delay_sync(3).get_sync()
    assert [dbtask.AsyncResult(i).get_sync() for i in ids] == [0, 2, 4]
    assert wait_inside.delay_sync().get_sync() == 42


def test_get_of_a_task_that_was_never_sent_says_so_instead_of_waiting_for_ever():
    with pytest.raises(TimeoutError, match="eager mode"):
        dbtask.AsyncResult("never-sent").get_sync(timeout=1)
    assert dbtask.AsyncResult("never-sent").state_sync() == "PENDING"


def test_expired_tasks_are_revoked_and_hooks_and_signals_run():
    with pytest.raises(dbtask.Expired):
        add.apply_async_sync(1, 1, expires=-1).get_sync()
    seen: list[str] = []

    def on_success(sender: Any = None, result: Any = None, **kwargs: Any) -> None:
        seen.append(f"{sender.name}={result}")

    signals.task_success.connect(on_success)
    try:
        add.delay_sync(5, 5).get_sync()
    finally:
        signals.task_success.disconnect(on_success)
    assert seen == ["eager.add=10"]


def test_ignore_result_and_apply_many():
    with pytest.raises(dbtask.ResultIgnored):
        add.apply_async_sync(1, 1, ignore_result=True).get_sync()
    results = add.apply_many_sync([(i, 1) for i in range(3)])
    assert [r.get_sync() for r in results] == [1, 2, 3]


def test_eager_mode_replaces_the_client_and_close_ends_it():
    from dbtask import _client

    assert _client.current().eager
    dbtask.close_sync()
    with pytest.raises(RuntimeError, match="not initialized"):
        add.delay_sync(1, 1)
    dbtask.init_sync(eager=True)
    assert add.delay_sync(1, 1).get_sync() == 2
