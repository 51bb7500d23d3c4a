"""NATS as its users run it in production (issue 18): a list of seed servers for the worker
and the client, and streams replicated on a 3-node JetStream cluster (`--stream-replicas`).
Each test starts its own servers on loopback; none kills a server under load (that is
test_chaos.py)."""

from __future__ import annotations

import json
import time

import pytest

from e2e_support import free_port, jetstream_api, nats_request, start_nats, stream_info
from e2e_tasks import add

PASSWORD = "s3cret-seed"


def replicas(info: dict) -> int:
    """Copies the cluster keeps of a stream or consumer: its leader and the other replicas."""
    return 1 + len(info["cluster"].get("replicas", []))


def settled_consumer_replicas(port: int, want: int, timeout: float = 15.0) -> dict:
    """The consumer's info once the cluster shows `want` copies of it. While NATS moves a
    consumer from one peer set to another, its info briefly lists the old and new peers
    together (4 of 3), or none while it has no leader, so one read may catch the move half-way."""
    deadline = time.monotonic() + timeout
    while True:
        info = jetstream_api(port, "CONSUMER.INFO.DBTASK_TASKS.dbtask-default")
        settled = "leader" in info.get("cluster", {}) and replicas(info) == want
        if settled or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


async def test_worker_and_client_connect_through_a_seed_list_whose_first_seed_is_down(
    worker_factory, redis, tmp_path
):
    """`--nats-url` and `init(nats_url=...)` take several seeds, credentials with each; a seed
    that does not answer is skipped, and no log or error shows the password."""
    import dbtask

    guarded = start_nats(tmp_path / "guarded", config=f'authorization {{ user: dbt, password: "{PASSWORD}" }}')
    try:
        dead = f"nats://dbt:{PASSWORD}@127.0.0.1:{free_port()}"
        live = f"nats://dbt:{PASSWORD}@127.0.0.1:{guarded.port}"
        worker = worker_factory(nats_url=f"{dead},{live}")
        await dbtask.init(nats_url=[dead, live], redis_url=redis.url)
        try:
            assert await (await add.delay(20, 22)).get(timeout=30) == 42
            from dbtask import _client

            assert PASSWORD not in repr(_client.current())
        finally:
            await dbtask.close()
        assert PASSWORD not in worker.stderr
        assert "dbt:***@127.0.0.1" in worker.stderr

        # Every seed down: the error names them all, passwords hidden.
        with pytest.raises(ConnectionError) as refused:
            await dbtask.init(nats_url=f"{dead}, nats://dbt:{PASSWORD}@127.0.0.1:{free_port()}", redis_url=redis.url)
        assert PASSWORD not in str(refused.value)
        assert str(refused.value).count("dbt:***@127.0.0.1") == 2, refused.value
        # Two seeds that disagree on the credentials cannot both be used.
        with pytest.raises(ValueError, match="different credentials"):
            await dbtask.init(nats_url=[live, f"nats://other:pw@127.0.0.1:{guarded.port}"], redis_url=redis.url)
    finally:
        guarded.stop()


async def test_stream_replicas_3_replicate_the_streams_and_consumers_on_a_cluster(
    worker_factory, nats_cluster, redis
):
    """`--stream-replicas 3`: the task stream, each queue's consumer and the dead-letter
    stream (made on the first dead letter) are kept by all three servers."""
    worker = worker_factory(nats_url=nats_cluster.url, args=["--stream-replicas", "3"])
    tasks = nats_cluster.stream("DBTASK_TASKS")
    assert tasks["config"]["num_replicas"] == 3
    assert replicas(tasks) == 3
    consumer = jetstream_api(nats_cluster.nodes[0].port, "CONSUMER.INFO.DBTASK_TASKS.dbtask-default")
    assert replicas(consumer) == 3, consumer

    # A message that is not a task and names no id is dead-lettered: the stream it lands in
    # is made with the worker's replicas too.
    ack = json.loads(nats_request(nats_cluster.nodes[1].port, "dbtask.tasks.default", b"not json"))
    assert ack.get("stream") == "DBTASK_TASKS", ack
    for _ in range(100):
        answer = jetstream_api(nats_cluster.nodes[2].port, "STREAM.INFO.DBTASK_DEAD")
        if "error" not in answer and answer["state"]["messages"] == 1:
            break
        import asyncio

        await asyncio.sleep(0.1)
    dead = stream_info(nats_cluster.nodes[2].port, "DBTASK_DEAD")
    assert dead["state"]["messages"] == 1, worker.stderr
    assert dead["config"]["num_replicas"] == 3
    assert replicas(dead) == 3


async def test_a_worker_brings_the_streams_replicas_to_its_own_and_says_so(worker_factory, nats_cluster, redis):
    """A stream made with one replica (here by a client, as `init` does when it finds none)
    and an existing dead-letter stream are scaled to the worker's `--stream-replicas`, keeping
    the tasks they hold, and the worker logs what it changed; a second worker finds nothing
    to change; one with fewer replicas scales them down with a warning."""
    import dbtask

    await dbtask.init(nats_url=nats_cluster.url, redis_url=redis.url, stream_replicas=1)
    try:
        assert nats_cluster.stream()["config"]["num_replicas"] == 1
        created = jetstream_api(
            nats_cluster.nodes[0].port,
            "STREAM.CREATE.DBTASK_DEAD",
            {"name": "DBTASK_DEAD", "subjects": ["dbtask.dead.>"], "storage": "file", "num_replicas": 1},
        )
        assert "error" not in created, created
        waiting = await add.delay(1, 2)
        # A worker of the old count makes the queue's consumer with one replica.
        worker_factory(nats_url=nats_cluster.url).kill()
        consumer = jetstream_api(nats_cluster.nodes[0].port, "CONSUMER.INFO.DBTASK_TASKS.dbtask-default")
        assert replicas(consumer) == 1, consumer

        first = worker_factory(nats_url=nats_cluster.url, args=["--stream-replicas", "3"])
        assert await waiting.get(timeout=30) == 3
        assert nats_cluster.stream()["config"]["num_replicas"] == 3
        assert nats_cluster.stream("DBTASK_DEAD")["config"]["num_replicas"] == 3
        consumer = settled_consumer_replicas(nats_cluster.nodes[0].port, 3)
        assert replicas(consumer) == 3, consumer
        updates = [line for line in first.stderr.splitlines() if "updated the stream" in line]
        assert any("DBTASK_TASKS" in line and "replicas 1 -> 3" in line for line in updates), first.stderr
        assert any("DBTASK_DEAD" in line and "replicas 1 -> 3" in line for line in updates), first.stderr

        second = worker_factory(nats_url=nats_cluster.url, args=["--stream-replicas", "3"])
        assert "updated the stream" not in second.stderr

        # A worker left at the default takes the copies away again: it says so loudly.
        third = worker_factory(nats_url=nats_cluster.url)
        assert nats_cluster.stream()["config"]["num_replicas"] == 1
        assert "FEWER replicas" in third.stderr and "replicas 3 -> 1" in third.stderr, third.stderr
    finally:
        await dbtask.close()


async def test_a_stream_that_cannot_be_brought_in_line_stops_the_worker_with_what_to_do(worker_factory, nats):
    """Storage cannot change on a stream: a task stream kept in memory stops the worker at
    start with an error naming the stream, what differs and what to do, and the stream and
    its messages are left as they were. `--stream-replicas 3` on a single server says it
    needs a cluster."""
    answer = jetstream_api(
        nats.port,
        "STREAM.CREATE.DBTASK_TASKS",
        {"name": "DBTASK_TASKS", "subjects": ["dbtask.tasks.>"], "retention": "workqueue", "storage": "memory"},
    )
    assert "error" not in answer, answer
    nats_request(nats.port, "dbtask.tasks.default", b'{"id": "kept", "task": "e2e_tasks.add", "args": [1, 2]}')

    worker = worker_factory(ready=False)
    assert worker.wait(30) != 0
    assert "stream DBTASK_TASKS" in worker.stderr
    assert "Memory storage" in worker.stderr and "File storage" in worker.stderr, worker.stderr
    assert "storage cannot change" in worker.stderr
    assert "nats stream rm" in worker.stderr
    kept = stream_info(nats.port)
    assert kept["config"]["storage"] == "memory"
    assert kept["state"]["messages"] == 1

    jetstream_api(nats.port, "STREAM.DELETE.DBTASK_TASKS")
    alone = worker_factory(ready=False, args=["--stream-replicas", "3"])
    assert alone.wait(30) != 0
    assert "needs a NATS cluster of at least 3 servers" in alone.stderr, alone.stderr


async def test_the_client_creates_a_missing_stream_with_its_stream_replicas(nats, nats_cluster, redis, monkeypatch):
    """With no task stream, `init` makes one so that tasks can wait for the first worker: with
    `stream_replicas` (else `$DBTASK_STREAM_REPLICAS`) copies on a cluster; on a single server
    a count above 1 is refused with what to do, and nothing is made."""
    import dbtask

    monkeypatch.setenv("DBTASK_STREAM_REPLICAS", "3")
    await dbtask.init(nats_url=nats_cluster.url, redis_url=redis.url)
    try:
        assert await add.delay(2, 3)
        stream = nats_cluster.stream()
        assert stream["config"]["num_replicas"] == 3
        assert stream["state"]["messages"] == 1
    finally:
        await dbtask.close()

    with pytest.raises(ValueError, match="needs a NATS cluster of at least 3 servers") as refused:
        await dbtask.init(nats_url=nats.url, redis_url=redis.url)
    assert "stream_replicas=3" in str(refused.value)
    assert "error" in jetstream_api(nats.port, "STREAM.INFO.DBTASK_TASKS")
    with pytest.raises(ValueError, match="between 1 and 5"):
        await dbtask.init(nats_url=nats.url, redis_url=redis.url, stream_replicas=0)


async def test_the_client_and_the_worker_move_to_another_server_when_theirs_dies(worker_factory, nats_cluster, redis):
    """The node serving the client is killed (and with it the worker's connection, when the
    worker was on the same node): tasks published afterwards through the same client are run
    and their results stored, with no new `init` and no restart."""
    import dbtask

    worker = worker_factory(nats_url=nats_cluster.url, args=["--stream-replicas", "3"])
    await dbtask.init(nats_url=nats_cluster.url, redis_url=redis.url, stream_replicas=3)
    try:
        assert await (await add.delay(1, 1)).get(timeout=30) == 2
        doomed = next(n for n in nats_cluster.nodes if n.clients("dbtask-client"))
        worker_was_there = bool(doomed.clients("dbtask-worker"))
        doomed.kill()
        results = [await add.delay(n, n) for n in range(20)]
        assert [await r.get(timeout=60) for r in results] == [2 * n for n in range(20)]
        assert any(n.clients("dbtask-client") for n in nats_cluster.alive()), "the client reconnected"
    finally:
        await dbtask.close()
    if worker_was_there:
        assert "lost the connection to NATS" in worker.stderr
