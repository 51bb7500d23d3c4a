"""Publishing: the protocol message ``delay``, ``apply_async`` and ``apply_many`` write to the
stream (read back from it here), argument conversion, and where a publish error is raised."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import nats as nats_py
import pytest

import dbtask
from conftest import add, last_message


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


def test_a_str_that_does_not_encode_keeps_its_unicode_error_as_the_cause(client):
    with pytest.raises(ValueError, match=r"args\[0\] cannot be sent: str is not valid UTF-8") as caught:
        add.delay_sync("\ud800", 1)
    assert isinstance(caught.value.__cause__, UnicodeEncodeError)


def test_publish_options_are_checked_once_and_reused(client):
    compiled = dbtask._client.current()
    options = dbtask._dbtask.PublishOptions(task_id="own-id", priority=7)
    assert options.priority == 7
    assert compiled.publish_sync("math", "t.add", (1, 2), None, options) == "own-id"
    with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
        dbtask._dbtask.PublishOptions(priority=10)
    with pytest.raises(TypeError):
        dbtask._dbtask.PublishOptions(countdown=3)  # type: ignore[call-arg]
    # A plain delay() reuses its task's options, made again when the priority option changes.
    add.delay_sync(1, 2)
    first = add._plain()
    add.delay_sync(1, 2)
    assert add._plain() is first and first.priority is None
    add.options["priority"] = 3
    try:
        assert add._plain().priority == 3
    finally:
        del add.options["priority"]


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

