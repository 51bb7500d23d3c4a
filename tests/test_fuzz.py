"""10,000 hostile messages interleaved with valid tasks, published straight to a queue as
anyone with publish permission could: the worker stays up, every valid task succeeds, every bad
message whose id the worker can read (its `Dbtask-Id` header, or a body that decodes that far)
gets a record (most FAILURE `MalformedMessage` or `UnknownTask`), every other one is
dead-lettered, no raw control character reaches the text log, and the
worker's memory goes back near idle afterwards. About 10 s."""

from __future__ import annotations

import asyncio
import json
import random

import nats as nats_py
import pytest

import dbtask
from e2e_support import rss_mib, wait_rss_at_most
from e2e_tasks import add

pytestmark = pytest.mark.timeout(300)

HOSTILE = 10_000
VALID_EVERY = 10  # one valid task after every 10 hostile messages
SUBJECT = "dbtask.tasks.default"
CALLABLES = ["os.system", "builtins.eval", "subprocess.run", "e2e_tasks.__import__", "", "e2e_tasks.add.__call__"]


def hostile_body(rng: random.Random, task_id: str) -> tuple[bytes, bool]:
    """A hostile body, and whether it names `task_id` (then a record must exist for it)."""
    kind = rng.randrange(12)
    add_task = "e2e_tasks.add"
    if kind == 0:  # random bytes, no id anywhere
        return rng.randbytes(rng.randrange(1, 300)), False
    if kind == 1:  # invalid UTF-8 around an id
        return b'{"id": "' + task_id.encode() + b'", "task": "\xff\xfe\x80", "args": []}', True
    if kind == 2:  # truncated JSON
        body = json.dumps({"id": task_id, "task": add_task, "args": [1, 2], "kwargs": {}}).encode()
        return body[: rng.randrange(len(body) // 2, len(body) - 1)], True
    if kind == 3:  # nested far deeper than the protocol allows
        depth = rng.randrange(101, 5000)
        return (f'{{"id": "{task_id}", "task": "{add_task}", "args": [' + "[" * depth + "]" * depth + ", 1]}").encode(), True
    if kind == 4:  # wrong types
        field, value = rng.choice([("task", 42), ("args", {"x": 1}), ("kwargs", [1]), ("retries", "many"), ("eta", "soon")])
        msg = {"id": task_id, "task": add_task, "args": [1, 2], "kwargs": {}}
        msg[field] = value
        return json.dumps(msg).encode(), True
    if kind == 5:  # numbers JSON cannot hold, or Python must take as they are
        number = rng.choice(["1e400", "-1e400", "123456789012345678901234567890", "NaN", "Infinity", "-0"])
        return f'{{"id": "{task_id}", "task": "{add_task}", "args": [{number}, 1]}}'.encode(), True
    if kind == 6:  # fields missing
        return json.dumps(rng.choice([{"id": task_id}, {"id": task_id, "args": [1]}])).encode(), True
    if kind == 7:  # callables nobody registered
        return json.dumps({"id": task_id, "task": rng.choice(CALLABLES), "args": ["echo pwned"]}).encode(), True
    if kind == 8:  # control characters and terminal escapes in every string
        return json.dumps({"id": task_id, "task": "x\n\x1b[31mERROR\x07\r", "args": ["\x1b]0;title\x07"]}).encode(), True
    if kind == 9:  # valid JSON, not an object
        return rng.choice([b"[1, 2, 3]", b"null", b'"a string"', b"42"]), False
    if kind == 10:  # right task, wrong arguments for it
        return json.dumps({"id": task_id, "task": add_task, "args": rng.choice([[], [1], [1, 2, 3]])}).encode(), True
    # an unknown protocol version
    return json.dumps({"v": 99, "id": task_id, "task": add_task, "args": [1, 2]}).encode(), True


async def test_ten_thousand_hostile_messages_among_valid_tasks(worker_factory, client, nats):
    worker = worker_factory(concurrency=None, args=["--log-format", "text"])
    await (await add.delay(0, 0)).get(timeout=15)
    await asyncio.sleep(2.5)  # idle: the heap is trimmed
    idle = rss_mib(worker.pid)

    rng = random.Random(20261207)
    headed: list[str] = []  # the id is in the header: a record must exist
    maybe: list[str] = []  # the id is only in the body: a record, or a dead letter
    without_id = 0
    valid = []
    nc = await nats_py.connect(nats.url)
    try:
        js = nc.jetstream()
        for n in range(HOSTILE):
            task_id = f"fuzz-{n}"
            body, named = hostile_body(rng, task_id)
            # Half of them carry the id in a header too, as the client's messages do.
            headers = {"Dbtask-Id": task_id} if named and rng.random() < 0.5 else None
            await js.publish(SUBJECT, body, headers=headers)
            if headers:
                headed.append(task_id)
            elif named:
                maybe.append(task_id)
            else:
                without_id += 1
            if n % VALID_EVERY == 0:
                valid.append((n, await add.delay(n, n)))
    finally:
        await nc.close()

    assert [await r.get(timeout=120) for _, r in valid] == [2 * n for n, _ in valid]
    assert worker.proc.poll() is None, "the worker died"

    # Every message with its id in the header has a record. Poll: the last ones may be in hand.
    missing = list(headed)
    for _ in range(120):
        missing = [i for i in missing if await dbtask.AsyncResult(i).state() == "PENDING"]
        if not missing:
            break
        await asyncio.sleep(0.5)
    assert missing == [], f"{len(missing)} bad messages with a Dbtask-Id header have no record, e.g. {missing[:5]}"
    states = {await dbtask.AsyncResult(i).state() for i in headed[:500]}
    assert states <= {"FAILURE", "SUCCESS"}, states
    # The others without a record could not be read far enough to find their id.
    unrecorded = [i for i in maybe if await dbtask.AsyncResult(i).state() == "PENDING"]
    dead_before = without_id + len(unrecorded)

    # Every message that got no record is in the dead-letter stream.
    nc = await nats_py.connect(nats.url)
    try:
        dead = 0
        for _ in range(60):
            dead = (await nc.jetstream().stream_info("DBTASK_DEAD")).state.messages
            if dead >= dead_before:
                break
            await asyncio.sleep(0.5)
    finally:
        await nc.close()
    assert dead >= dead_before, f"{dead} dead letters for {dead_before} messages without a record"

    text = worker.stderr
    for control in ("\x1b", "\x07", "\r"):
        assert control not in text, f"raw {control!r} in the worker's log"

    settled = await wait_rss_at_most(worker.pid, idle + 5)
    assert settled <= idle + 5, f"idle {idle:.1f} MiB, still {settled:.1f} MiB 10 s after the flood"
