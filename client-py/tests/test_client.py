"""The client against real servers, with the worker's part played by hand: messages are read
back from the stream, records are written to Redis with SET + PUBLISH as the worker does."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import nats as nats_py
import pytest

import dbtask
from conftest import REPO, free_port, redis_cli

PY = str(REPO / ".venv" / "bin" / "python")


@dbtask.task(name="t.add", queue="math", max_retries=5, retry_delay=1.0)
def add(x: int, y: int) -> int:
    return x + y


@dbtask.task
async def amul(x: int, y: int) -> int:
    return x * y


@pytest.fixture
def client(nats, redis):
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    yield
    dbtask.close_sync()


async def last_message(nats_url: str, subject: str):
    nc = await nats_py.connect(nats_url)
    try:
        return await nc.jetstream().get_last_msg("DBTASK_TASKS", subject)
    finally:
        await nc.close()


def store(redis, record: dict) -> None:
    """What the worker does when a task is done: SET the record, PUBLISH it."""
    body = json.dumps(record)
    redis_cli(redis, "SET", f"dbtask:result:{record['id']}", body, "EX", "60")
    redis_cli(redis, "PUBLISH", f"dbtask:done:{record['id']}", body)


# -- without the extension -------------------------------------------------------------------


def test_import_and_task_do_not_load_the_extension():
    code = (
        "import sys, dbtask\n"
        "@dbtask.task\n"
        "def f(x): return x + 1\n"
        "@dbtask.task(name='g', queue='q1')\n"
        "async def g(x): return x\n"
        "from dbtask._registry import TASKS\n"
        "assert TASKS['__main__.f'] is f and f(1) == 2 and not f.is_async\n"
        "assert TASKS['g'].is_async and TASKS['g'].queue == 'q1' and g.options == {}\n"
        "assert 'dbtask._dbtask' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([PY, "-c", code], check=True)


def test_task_attributes_and_local_call():
    assert add.name == "t.add" and add.queue == "math" and not add.is_async
    assert add.options == {"max_retries": 5, "retry_delay": 1.0}
    assert add(1, 2) == 3
    assert amul.name == f"{__name__}.amul" and amul.queue == "default" and amul.is_async
    assert asyncio.run(amul(3, 4)) == 12
    assert isinstance(amul, dbtask.Task) and isinstance(amul, dbtask.AsyncTask)
    with pytest.raises(ValueError, match="invalid queue name"):
        dbtask.task(queue="a.b")(lambda: None)


def test_used_before_init_is_a_runtime_error():
    dbtask.close_sync()
    with pytest.raises(RuntimeError, match=r"call dbtask.init\(...\) or dbtask.init_sync\(...\) first"):
        add.delay_sync(1, 2)
    with pytest.raises(RuntimeError, match="not initialized"):
        dbtask.AsyncResult("x").state_sync()


# -- connecting ------------------------------------------------------------------------------


def test_closed_ports_fail_fast_with_the_password_hidden(nats, redis):
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        dbtask.init_sync(nats_url=f"nats://bob:s3cret@127.0.0.1:{port}", redis_url=redis.url)
    assert time.monotonic() - start < 3
    assert f"nats://bob:***@127.0.0.1:{port}" in str(info.value)
    assert "s3cret" not in str(info.value)

    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        dbtask.init_sync(nats_url=nats.url, redis_url=f"redis://:hunter2@127.0.0.1:{port}/0")
    assert time.monotonic() - start < 3
    assert f"redis://:***@127.0.0.1:{port}/0" in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_async_init_against_a_closed_port():
    port = free_port()
    with pytest.raises(ConnectionError, match="cannot reach (NATS|Redis)"):
        await dbtask.init(nats_url=f"nats://127.0.0.1:{port}", redis_url=f"redis://127.0.0.1:{port}")


def test_nats_without_jetstream_is_a_clear_error(redis, tmp_path):
    from conftest import start_nats

    plain = start_nats(tmp_path, jetstream=False)
    try:
        with pytest.raises(ConnectionError, match="has no JetStream: start nats-server with -js"):
            dbtask.init_sync(nats_url=plain.url, redis_url=redis.url)
    finally:
        plain.stop()


def test_init_creates_the_stream_and_is_idempotent(nats, redis):
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    from dbtask import _client

    first = _client.current()
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    assert _client.current() is first, "same URLs keep the connection"
    dbtask.close_sync()
    dbtask.close_sync()  # twice is fine


# -- publishing ------------------------------------------------------------------------------


def test_delay_publishes_the_protocol_message(client, nats):
    before = time.time()
    result = add.delay_sync(1, 2)
    assert isinstance(result, dbtask.AsyncResult) and uuid.UUID(result.id)
    msg = asyncio.run(last_message(nats.url, "dbtask.tasks.math"))
    assert msg.headers["Nats-Msg-Id"] == result.id
    assert msg.headers["Dbtask-Id"] == result.id
    assert msg.headers["Dbtask-Task"] == "t.add"
    body = json.loads(msg.data)
    assert body["v"] == 1 and body["id"] == result.id and body["task"] == "t.add"
    assert body["args"] == [1, 2] and body["kwargs"] == {} and body["queue"] == "math"
    assert before <= body["sent_at"] <= time.time()
    assert "eta" not in body and "expires" not in body


async def test_apply_async_both_forms_and_options(client, nats):
    now = time.time()
    r = await add.apply_async(1, 2, countdown=10)
    # A future eta waits as a NATS message schedule that targets the queue's subject.
    msg = await last_message(nats.url, f"dbtask.sched.math.{r.id}")
    assert msg.headers["Nats-Schedule"].startswith("@at 20") and msg.headers["Nats-Schedule"].endswith("Z")
    assert msg.headers["Nats-Schedule-Target"] == "dbtask.tasks.math"
    body = json.loads(msg.data)
    assert body["id"] == r.id and body["args"] == [1, 2] and abs(body["eta"] - (now + 10)) < 2

    eta = datetime(2030, 1, 2, 3, 4, 5)  # naive = UTC
    r = await add.apply_async(
        args=(3,), kwargs={"y": 4}, eta=eta, expires=60, queue="other", task_id="my-id-1"
    )
    assert r.id == "my-id-1"
    body = json.loads((await last_message(nats.url, "dbtask.sched.other.my-id-1")).data)
    assert body["args"] == [3] and body["kwargs"] == {"y": 4} and body["queue"] == "other"
    assert body["eta"] == eta.replace(tzinfo=timezone.utc).timestamp()
    assert abs(body["expires"] - (time.time() + 60)) < 2

    aware = datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    r = add.apply_async_sync(5, 6, expires=aware)
    body = json.loads((await last_message(nats.url, "dbtask.tasks.math")).data)
    assert body["expires"] == aware.timestamp()

    with pytest.raises(ValueError, match="not both"):
        await add.apply_async(1, args=(2,))
    with pytest.raises(ValueError, match="not both"):
        add.apply_async_sync(1, 2, countdown=1, eta=eta)
    with pytest.raises(ValueError, match="invalid queue name"):
        await add.apply_async(1, 2, queue="no spaces")
    with pytest.raises(ValueError, match="invalid task id"):
        await add.apply_async(1, 2, task_id="a/b")


def test_arguments_are_converted_like_json_dumps(client, nats):
    import collections
    import enum

    class Color(enum.IntEnum):
        RED = 1

    big = 2**80
    args = ({1: "a", 2.5: None, True: 1, None: 2}, (1, [2, (3,)]), Color.RED, big, -(2**63), 2**64 - 1,
            "é\u2028\"\\", 1.5e300, collections.OrderedDict(b=1, a=2))  # fmt: skip
    add.delay_sync(*args)
    body = json.loads(asyncio.run(last_message(nats.url, "dbtask.tasks.math")).data)
    assert body["args"] == json.loads(json.dumps(args))
    assert body["args"][3] == big


def test_non_serializable_arguments_are_value_errors(client):
    with pytest.raises(ValueError, match=r"args\[1\]\['when'\].*datetime.datetime is not JSON-serializable"):
        add.delay_sync(1, {"when": datetime.now()})
    with pytest.raises(ValueError, match=r"kwargs\['y'\]\[0\].*set"):
        add.delay_sync(1, y=[{1}])
    with pytest.raises(ValueError, match="NaN"):
        add.delay_sync(math.nan, 1)
    with pytest.raises(ValueError, match="dict keys must be"):
        add.delay_sync({(1, 2): 3}, 1)
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="circular"):
        add.delay_sync(loop, 1)
    with pytest.raises(ValueError, match="bytes"):
        add.delay_sync(b"raw", 1)


def test_too_large_message_is_a_value_error(client):
    with pytest.raises(ValueError, match="max_payload"):
        add.delay_sync("x" * (2 * 1024 * 1024), 1)


async def test_apply_many(client, nats):
    results = await add.apply_many([(i, i) for i in range(500)])
    assert len({r.id for r in results}) == 500
    body = json.loads((await last_message(nats.url, "dbtask.tasks.math")).data)
    assert body["id"] == results[-1].id and body["args"] == [499, 499]
    results = add.apply_many_sync([(1,), (2,)], [{"y": 1}, {"y": 2}], queue="bulk")
    body = json.loads((await last_message(nats.url, "dbtask.tasks.bulk")).data)
    assert body["id"] == results[1].id and body["kwargs"] == {"y": 2}


async def test_a_stream_deleted_after_init_is_made_again_and_messages_keep_their_headers(client, nats):
    nc = await nats_py.connect(nats.url)
    try:
        await nc.jetstream().delete_stream("DBTASK_TASKS")
    finally:
        await nc.close()
    # The first publish finds no stream, makes it again, and publishes once more: the message
    # sent the second time carries the same headers as one sent at once.
    r = await add.apply_async(2, 3, countdown=30)
    msg = await last_message(nats.url, f"dbtask.sched.math.{r.id}")
    assert msg.headers["Nats-Msg-Id"] == r.id and msg.headers["Dbtask-Id"] == r.id
    assert msg.headers["Dbtask-Task"] == "t.add"
    assert msg.headers["Nats-Schedule"].startswith("@at 20")
    assert msg.headers["Nats-Schedule-Target"] == "dbtask.tasks.math"
    assert json.loads(msg.data)["args"] == [2, 3]
    r = add.delay_sync(4, 5)
    msg = await last_message(nats.url, "dbtask.tasks.math")
    assert msg.headers["Nats-Msg-Id"] == r.id and msg.headers["Dbtask-Task"] == "t.add"


async def test_many_delays_in_flight(client):
    results = await asyncio.gather(*(add.delay(i, 1) for i in range(2000)))
    assert len({r.id for r in results}) == 2000


async def test_gather_of_delays_gives_each_call_its_own_message(client, nats):
    # No asyncio task per call: delay() returns a future straight away.
    futures = [add.delay(i, -i) for i in range(300)]
    assert all(isinstance(f, asyncio.Future) for f in futures)
    results = await asyncio.gather(*futures)
    assert all(isinstance(r, dbtask.AsyncResult) for r in results)
    assert len({r.id for r in results}) == 300
    # Every result names the message of its own call: the stream's last 300 messages.
    nc = await nats_py.connect(nats.url)
    try:
        js = nc.jetstream()
        last = (await js.stream_info("DBTASK_TASKS")).state.last_seq
        by_id = {}
        for seq in range(last - 299, last + 1):
            body = json.loads((await js.get_msg("DBTASK_TASKS", seq)).data)
            by_id[body["id"]] = body["args"]
    finally:
        await nc.close()
    for i, r in enumerate(results):
        assert by_id[r.id] == [i, -i]


async def test_delay_checks_its_arguments_at_the_call(client):
    with pytest.raises(ValueError, match=r"args\[1\]\[.when.\].*not JSON-serializable"):
        add.delay(1, {"when": datetime.now()})  # raises here, no await needed
    with pytest.raises(ValueError, match="give countdown or eta"):
        add.apply_async(1, 2, countdown=1, eta=datetime.now())


async def test_publish_error_raises_where_the_future_is_awaited(client):
    big = "x" * (2 * 1024 * 1024)
    future = add.delay(big, 1)  # encoded fine; the server's max_payload refuses it
    with pytest.raises(ValueError, match="max_payload"):
        await future
    with pytest.raises(ValueError, match="max_payload"):
        await asyncio.gather(add.delay(1, 1), add.apply_async(big, 2), add.delay(2, 2))
    ok, failed = await asyncio.gather(add.delay(3, 3), add.delay(big, 3), return_exceptions=True)
    assert isinstance(ok, dbtask.AsyncResult) and isinstance(failed, ValueError)


async def test_delay_not_awaited_is_still_sent(client, nats):
    marker = str(uuid.uuid4())
    add.delay(marker, 1)  # fire and forget
    await dbtask.close()  # waits for publishes in flight
    body = json.loads((await last_message(nats.url, "dbtask.tasks.math")).data)
    assert body["args"] == [marker, 1]


async def test_failed_publish_not_awaited_is_reported_by_asyncio(client):
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        add.delay("x" * (2 * 1024 * 1024), 1)  # never awaited
        for _ in range(500):
            gc.collect()
            if reported:
                break
            await asyncio.sleep(0.01)
    finally:
        loop.set_exception_handler(None)
    assert reported, "the lost publish error was not reported"
    assert "never retrieved" in reported[0]["message"]
    assert isinstance(reported[0]["exception"], ValueError)


def test_delay_without_a_running_loop_says_what_to_use(client):
    with pytest.raises(RuntimeError, match="no running event loop.*_sync"):
        add.delay(1, 2)
    with pytest.raises(RuntimeError, match="apply_async_sync"):
        add.apply_async(1, 2, link=add.s(1))
    assert add.delay_sync(1, 2).id  # the sync twin works there


def test_delays_from_several_event_loops_at_once(client):
    # One publisher serves the process; each loop's futures must resolve on that loop (a
    # future resolved elsewhere would hang its gather or raise "attached to a different loop").
    def run(offset: int, out: dict) -> None:
        async def main() -> list[str]:
            results = await asyncio.gather(*(add.delay(offset + i, 0) for i in range(300)))
            return [r.id for r in results]

        out[offset] = asyncio.run(main())

    out: dict = {}
    threads = [threading.Thread(target=run, args=(k * 1000, out)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out) == [0, 1000, 2000]
    assert len({i for got in out.values() for i in got}) == 900


async def test_publish_on_a_closed_client_fails_at_the_call(nats, redis):
    await dbtask.init(nats_url=nats.url, redis_url=redis.url)
    client = dbtask._client.current()
    await dbtask.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.publish("math", "t.add", (1, 2))


async def test_close_waits_for_publishes_in_flight(nats, redis):
    await dbtask.init(nats_url=nats.url, redis_url=redis.url)
    pending = [asyncio.ensure_future(add.delay(i, 0)) for i in range(300)]
    await asyncio.sleep(0)  # let them start
    await dbtask.close()
    results = await asyncio.gather(*pending)
    assert len({r.id for r in results}) == 300


# -- results ---------------------------------------------------------------------------------


async def test_get_resolves_on_the_notification(client, redis):
    r = dbtask.AsyncResult("job-1")
    assert await r.state() == "PENDING" and not await r.ready()
    assert await r.info() == {"id": "job-1", "state": "PENDING"}
    waiting = asyncio.ensure_future(r.get(timeout=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    store(redis, {"id": "job-1", "state": "SUCCESS", "result": {"sum": 3}, "task": "t.add"})
    assert await waiting == {"sum": 3}
    assert await r.state() == "SUCCESS" and await r.ready()
    assert (await r.info())["task"] == "t.add"
    # Nobody is subscribed any more.
    await asyncio.sleep(0.1)
    assert redis_cli(redis, "PUBSUB", "NUMSUB", "dbtask:done:job-1").split()[-1] == "0"


def test_get_sync_of_a_stored_result_and_none(client, redis):
    store(redis, {"id": "job-2", "state": "SUCCESS", "result": None})
    assert dbtask.AsyncResult("job-2").get_sync(timeout=0) is None
    assert dbtask.AsyncResult("job-2").state_sync() == "SUCCESS"
    assert dbtask.AsyncResult("job-2").ready_sync() is True
    assert dbtask.AsyncResult("job-2").info_sync()["result"] is None


async def test_non_ready_states_keep_waiting(client, redis):
    store(redis, {"id": "job-3", "state": "STARTED"})
    waiting = asyncio.ensure_future(dbtask.AsyncResult("job-3").get(timeout=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    store(redis, {"id": "job-3", "state": "SUCCESS", "result": 7})
    assert await waiting == 7


async def test_timeout(client):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not ready after 0.200 s"):
        await dbtask.AsyncResult("never").get(timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 1.5
    with pytest.raises(TimeoutError):
        dbtask.AsyncResult("never").get_sync(timeout=0.2)
    with pytest.raises(TimeoutError):
        dbtask.AsyncResult("never").get_sync(timeout=0)


async def test_cancelled_wait_unsubscribes(client, redis):
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(dbtask.AsyncResult("job-4").get(), 0.3)
    await asyncio.sleep(0.2)
    assert redis_cli(redis, "PUBSUB", "NUMSUB", "dbtask:done:job-4").split()[-1] == "0"


async def test_many_concurrent_waits_share_one_connection(client, redis):
    ids = [f"many-{i}" for i in range(300)]
    waits = [asyncio.ensure_future(dbtask.AsyncResult(i).get(timeout=20)) for i in ids]
    waits += [asyncio.ensure_future(dbtask.AsyncResult(ids[0]).get(timeout=20))]  # twice the same id
    await asyncio.sleep(0.3)
    clients = redis_cli(redis, "CLIENT", "LIST").count("cmd=")
    assert clients <= 4, "one command and one pub/sub connection per client process"
    pipe = "".join(
        f"SET dbtask:result:{i} '{json.dumps({'id': i, 'state': 'SUCCESS', 'result': n})}'\n"
        f"PUBLISH dbtask:done:{i} '{json.dumps({'id': i, 'state': 'SUCCESS', 'result': n})}'\n"
        for n, i in enumerate(ids)
    )
    subprocess.run(["redis-cli", "-p", str(redis.port)], input=pipe, text=True, check=True, capture_output=True)
    assert await asyncio.gather(*waits) == list(range(300)) + [0]


# -- errors ----------------------------------------------------------------------------------


def failure(task_id: str, exc_type: str, message: str, tb: str | None = "Traceback...\nboom") -> dict:
    error = {"type": exc_type, "message": message}
    if tb is not None:
        error["traceback"] = tb
    return {"id": task_id, "state": "FAILURE", "error": error, "task": "t.add"}


def test_builtin_exceptions_are_re_raised_with_the_remote_traceback(client, redis):
    store(redis, failure("err-1", "ValueError", "bad input"))
    with pytest.raises(ValueError, match="^bad input$") as info:
        dbtask.AsyncResult("err-1").get_sync(timeout=5)
    assert isinstance(info.value.__cause__, dbtask.RemoteTraceback)
    assert "boom" in str(info.value.__cause__)
    assert info.value.task_id == "err-1" and info.value.exc_type == "ValueError"

    store(redis, failure("err-2", "KeyError", "'missing'"))
    with pytest.raises(KeyError) as info:
        dbtask.AsyncResult("err-2").get_sync(timeout=5)
    assert info.value.args == ("missing",)

    store(redis, failure("err-3", "ZeroDivisionError", "division by zero", tb=None))
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        dbtask.AsyncResult("err-3").get_sync(timeout=5)


async def test_other_exceptions_are_task_errors(client, redis):
    store(redis, failure("err-4", "myapp.errors.Declined", "card declined"))
    with pytest.raises(dbtask.TaskError) as info:
        await dbtask.AsyncResult("err-4").get(timeout=5)
    err = info.value
    assert type(err) is dbtask.TaskError
    assert (err.task_id, err.exc_type, err.message) == ("err-4", "myapp.errors.Declined", "card declined")
    assert err.traceback == "Traceback...\nboom"
    assert str(err) == "myapp.errors.Declined: card declined"

    for name, cls in [("UnknownTask", dbtask.UnknownTask), ("InvalidArguments", dbtask.InvalidArguments),
                      ("MalformedMessage", dbtask.MalformedMessage), ("TooLarge", dbtask.TooLarge),
                      ("UnserializableResult", dbtask.UnserializableResult)]:  # fmt: skip
        store(redis, failure(f"err-{name}", f"dbtask.{name}", "refused", tb=None))
        with pytest.raises(cls, match=f"dbtask.{name}: refused"):
            await dbtask.AsyncResult(f"err-{name}").get(timeout=5)

    # A "builtin" name that is not an exception class, and one whose constructor differs.
    store(redis, failure("err-5", "print", "x"))
    with pytest.raises(dbtask.TaskError):
        await dbtask.AsyncResult("err-5").get(timeout=5)
    store(redis, failure("err-6", "UnicodeDecodeError", "'utf-8' codec can't decode"))
    with pytest.raises(dbtask.TaskError, match="UnicodeDecodeError"):
        await dbtask.AsyncResult("err-6").get(timeout=5)

    store(redis, {"id": "err-7", "state": "REVOKED"})
    with pytest.raises(dbtask.TaskRevoked):
        await dbtask.AsyncResult("err-7").get(timeout=5)


# -- sync and async together -----------------------------------------------------------------


def test_init_sync_then_async_use_and_sync_from_a_thread(nats, redis):
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    try:
        async def main():
            r = await add.delay(1, 1)
            # A sync call from another thread while this loop runs.
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("r", add.delay_sync(2, 2)))
            t.start()
            await asyncio.sleep(0.05)
            await asyncio.to_thread(t.join)
            store(redis, {"id": r.id, "state": "SUCCESS", "result": 2})
            got = await asyncio.to_thread(dbtask.AsyncResult(r.id).get_sync, 5)
            return got, out["r"]

        got, other = asyncio.run(main())
        assert got == 2 and isinstance(other, dbtask.AsyncResult)
        # A second, different event loop with the same client.
        assert asyncio.run(dbtask.AsyncResult(other.id).state()) == "PENDING"
    finally:
        dbtask.close_sync()


def test_async_init_then_sync_use(nats, redis):
    asyncio.run(dbtask.init(nats_url=nats.url, redis_url=redis.url))
    try:
        r = add.delay_sync(3, 3)
        store(redis, {"id": r.id, "state": "SUCCESS", "result": 6})
        assert r.get_sync(timeout=5) == 6
    finally:
        asyncio.run(dbtask.close())


def test_forked_child_must_init_again(nats, redis):
    code = (
        "import os, sys, dbtask\n"
        "@dbtask.task(name='t.add', queue='math')\n"
        "def add(x, y): return x + y\n"
        f"dbtask.init_sync({nats.url!r}, {redis.url!r})\n"
        "add.delay_sync(1, 2)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        add.delay_sync(1, 2)\n"
        "        os._exit(3)\n"
        "    except RuntimeError as e:\n"
        "        assert 'fork' in str(e), e\n"
        f"    dbtask.init_sync({nats.url!r}, {redis.url!r})\n"
        "    add.delay_sync(1, 2)\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "add.delay_sync(1, 2)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    subprocess.run([PY, "-c", code], check=True, timeout=30)


def test_workflow_ids_are_distinct_v4_uuids_before_and_after_init(nats, redis):
    # freeze() names tasks with uuid4() until init loads the compiled module, then with its
    # buffered generator: both kinds must be canonical random UUIDs, never repeated.
    code = (
        "import sys, uuid, dbtask\n"
        "@dbtask.task(name='t.add', queue='math')\n"
        "def add(x, y): return x + y\n"
        "def ids():\n"
        "    g = dbtask.Group([add.s(i, i) for i in range(500)])\n"
        "    return [g.freeze().id] + [m.options['task_id'] for m in g.members]\n"
        "before = ids()\n"
        "loaded_before = 'dbtask._dbtask' in sys.modules\n"
        f"dbtask.init_sync({nats.url!r}, {redis.url!r})\n"
        "after = ids()\n"
        "ok = all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in before + after)\n"
        "print(loaded_before, 'dbtask._dbtask' in sys.modules, ok, len(set(before + after)))\n"
    )
    out = subprocess.run([PY, "-c", code], check=True, timeout=30, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "True", "True", "1002"], out.stdout


def test_a_forked_child_does_not_repeat_the_parents_task_ids(nats, redis):
    # Ids come from a per-thread buffer of random bytes; a child inherits the forking
    # thread's buffer, and must not hand out the ids the parent hands out next (JetStream
    # would drop one of two messages with the same id as a duplicate).
    code = (
        "import os, sys, dbtask\n"
        "@dbtask.task(name='t.add', queue='math')\n"
        "def add(x, y): return x + y\n"
        f"dbtask.init_sync({nats.url!r}, {redis.url!r})\n"
        "add.delay_sync(1, 2)\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"    dbtask.init_sync({nats.url!r}, {redis.url!r})\n"
        "    ids = [add.delay_sync(1, 2).id for _ in range(3)]\n"
        "    os.write(w, ' '.join(ids).encode())\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "ids = [add.delay_sync(1, 2).id for _ in range(3)]\n"
        "child = os.read(r, 4096).decode().split()\n"
        "os.waitpid(pid, 0)\n"
        "print(len(child), len(set(ids) & set(child)))\n"
    )
    out = subprocess.run([PY, "-c", code], check=True, timeout=30, capture_output=True, text=True)
    assert out.stdout.split() == ["3", "0"], out.stdout


async def test_waits_survive_a_redis_restart(nats, tmp_path):
    from conftest import start_redis

    redis = start_redis(tmp_path)
    await dbtask.init(nats_url=nats.url, redis_url=redis.url)
    try:
        waiting = asyncio.ensure_future(dbtask.AsyncResult("restart-1").get(timeout=30))
        await asyncio.sleep(0.2)
        redis.stop()
        await asyncio.sleep(0.3)
        # While Redis is down, a new wait fails fast with ConnectionError.
        with pytest.raises(ConnectionError, match="Redis"):
            await dbtask.AsyncResult("restart-2").get(timeout=5)
        redis = start_redis(tmp_path, port=redis.port)
        await asyncio.sleep(0.5)  # reconnect backoff
        assert not waiting.done()
        store(redis, {"id": "restart-1", "state": "SUCCESS", "result": "back"})
        assert await waiting == "back"
        assert await dbtask.AsyncResult("restart-1").state() == "SUCCESS"
    finally:
        await dbtask.close()
        redis.stop()
