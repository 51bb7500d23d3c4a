"""Failures reach the client as exceptions a user can catch, and never stall the worker."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats as nats_py
import pytest

import dbtask
from e2e_support import free_port
from e2e_tasks import add, async_fail, big, decline, fail, greet, unserializable

# Defined in the test process only: no worker registers this name.
@dbtask.task(name="e2e.never_registered_by_any_worker")
def ghost(x):
    return x


async def test_task_exception_reaches_the_client_with_type_message_and_traceback(worker, client):
    result = await fail.delay("x-17")
    with pytest.raises(ValueError) as info:
        await result.get(timeout=15)
    exc = info.value
    assert str(exc) == "bad input: x-17"
    remote = exc.__cause__
    assert isinstance(remote, dbtask.RemoteTraceback)
    text = str(remote)
    assert "Traceback (most recent call last)" in text
    assert "e2e_tasks.py" in text
    assert 'raise ValueError(f"bad input: {message}")' in text, text
    assert await result.state() == "FAILURE"
    assert await result.ready() is True
    record = await result.info()
    assert record["state"] == "FAILURE"
    assert record["error"]["type"] == "ValueError"
    assert record["error"]["message"] == "bad input: x-17"
    assert "raise ValueError" in record["error"]["traceback"]


async def test_async_task_exception_reaches_the_client(worker, client):
    result = await async_fail.delay("missing-key")
    with pytest.raises(KeyError) as info:
        await result.get(timeout=15)
    assert info.value.args == ("missing-key",)
    assert "raise KeyError(message)" in str(info.value.__cause__)


async def test_user_defined_exception_becomes_task_error(worker, client):
    result = await decline.delay(42)
    with pytest.raises(dbtask.TaskError) as info:
        await result.get(timeout=15)
    err = info.value
    assert err.exc_type == "e2e_tasks.Declined"
    assert err.message == "payment of 42 declined"
    assert err.task_id == result.id
    assert "e2e_tasks.Declined" in str(err) and "payment of 42 declined" in str(err)
    assert "raise Declined(" in err.traceback


async def test_unknown_task_name_fails_with_unknown_task(worker, client):
    result = await ghost.delay(1)
    with pytest.raises(dbtask.UnknownTask) as info:
        await result.get(timeout=15)
    assert info.value.exc_type == "dbtask.UnknownTask"
    assert "e2e.never_registered_by_any_worker" in str(info.value)
    # The worker is still serving.
    assert await (await add.delay(1, 1)).get(timeout=15) == 2


@pytest.mark.parametrize(
    "args, kwargs",
    [((1,), {}), ((1, 2, 3), {}), ((1, 2), {"z": 3})],
    ids=["missing", "too-many", "unexpected-keyword"],
)
async def test_arguments_that_do_not_fit_fail_with_invalid_arguments(worker, client, args, kwargs):
    result = await add.apply_async(args=args, kwargs=kwargs)
    with pytest.raises(dbtask.InvalidArguments) as info:
        await result.get(timeout=15)
    assert info.value.exc_type == "dbtask.InvalidArguments"
    assert info.value.message


async def test_keyword_only_argument_passed_positionally_is_invalid(worker, client):
    result = await greet.delay("Ann", "Hey")
    with pytest.raises(dbtask.InvalidArguments):
        await result.get(timeout=15)


async def test_type_error_inside_the_task_is_not_invalid_arguments(worker, client):
    # The arguments fit the signature; the body raises TypeError: that is the task's own error.
    result = await add.delay(1, "a")
    with pytest.raises(TypeError) as info:
        await result.get(timeout=15)
    assert not isinstance(info.value, dbtask.TaskError)
    assert "return x + y" in str(info.value.__cause__)


async def test_unserializable_result_fails_clearly(worker, client):
    result = await unserializable.delay()
    with pytest.raises(dbtask.UnserializableResult):
        await result.get(timeout=15)


async def test_result_over_the_size_limit_fails_with_too_large(worker_factory, client):
    worker_factory(args=["--max-result-bytes", "1000"])
    assert await (await big.delay(100)).get(timeout=15) == "x" * 100
    with pytest.raises(dbtask.TooLarge):
        await (await big.delay(5000)).get(timeout=15)


@pytest.mark.parametrize(
    "body",
    [
        b"this is not json",
        b"\xff\xfe\x00 not utf-8",
        b'{"id": "%(id)s", "task": 42}',
        b'{"id": "%(id)s", "task": "e2e_tasks.add", "args": {"x": 1}}',
        b'{"id": "%(id)s"}',
        b"[1, 2, 3]",
        # Deeper than the protocol's 100 levels: refused before Python decodes it.
        b'{"id": "%(id)s", "task": "e2e_tasks.add", "args": [' + b"[" * 5000 + b"]" * 5000 + b", 1]}",
    ],
    ids=["not-json", "not-utf8", "task-not-a-string", "args-not-an-array", "no-task", "array", "args-too-deep"],
)
async def test_undecodable_message_becomes_malformed_failure(worker, client, nats, body):
    task_id = f"raw-{uuid.uuid4()}"
    nc = await nats_py.connect(nats.url)
    try:
        js = nc.jetstream()
        await js.publish(
            "dbtask.tasks.default",
            body.replace(b"%(id)s", task_id.encode()),
            headers={"Dbtask-Id": task_id, "Nats-Msg-Id": task_id},
        )
    finally:
        await nc.close()
    with pytest.raises(dbtask.MalformedMessage) as info:
        await dbtask.AsyncResult(task_id).get(timeout=15)
    assert info.value.exc_type == "dbtask.MalformedMessage"
    assert info.value.message
    # The worker is still alive and processes the next task.
    assert worker.proc.poll() is None
    assert await (await add.delay(20, 22)).get(timeout=15) == 42


async def test_message_without_any_id_does_not_stall_the_worker(worker, client, nats):
    nc = await nats_py.connect(nats.url)
    try:
        await nc.jetstream().publish("dbtask.tasks.default", b"garbage without headers")
    finally:
        await nc.close()
    assert await (await add.delay(1, 2)).get(timeout=15) == 3
    assert worker.proc.poll() is None


async def test_get_on_a_task_that_never_runs_times_out(nats, redis, client):
    result = await add.delay(1, 2)  # no worker is running
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await result.get(timeout=0.2)
    assert time.monotonic() - started < 5
    assert await result.state() == "PENDING"
    assert await result.ready() is False


def test_get_sync_on_a_task_that_never_runs_times_out(nats, redis):
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    try:
        result = add.delay_sync(1, 2)
        with pytest.raises(TimeoutError):
            result.get_sync(timeout=0.2)
    finally:
        dbtask.close_sync()


async def test_init_against_a_closed_nats_port_raises_connection_error(redis):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        await asyncio.wait_for(
            dbtask.init(nats_url=f"nats://someone:s3cret-pw@127.0.0.1:{port}", redis_url=redis.url), 30
        )
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "s3cret-pw" not in message


async def test_init_against_a_closed_redis_port_raises_connection_error(nats):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        await asyncio.wait_for(
            dbtask.init(nats_url=nats.url, redis_url=f"redis://:s3cret-pw@127.0.0.1:{port}/0"), 30
        )
    assert time.monotonic() - started < 10
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "s3cret-pw" not in str(info.value)


def test_init_sync_against_a_closed_port_raises_connection_error(redis):
    port = free_port()
    with pytest.raises(ConnectionError):
        dbtask.init_sync(nats_url=f"nats://127.0.0.1:{port}", redis_url=redis.url)


async def test_use_before_init_raises_runtime_error():
    await dbtask.close()
    with pytest.raises(RuntimeError):
        await add.delay(1, 2)
    with pytest.raises(RuntimeError):
        add.delay_sync(1, 2)
    with pytest.raises(RuntimeError):
        await dbtask.AsyncResult("some-id").state()


async def test_arguments_that_are_not_json_raise_value_error(client):
    with pytest.raises(ValueError):
        await add.delay(object(), 1)
    with pytest.raises(ValueError):
        await add.apply_async(1, 2, queue="not a queue")
