"""Workflows end to end with the real worker: signatures, chains, groups, chords, nesting,
link / link_error, and signatures as plain data."""

from __future__ import annotations

import asyncio
import collections
import json

import pytest

import dbtask
from dbtask import Chain, Chord, ChordError, Group, GroupResult, Signature
from e2e_support import PLAIN_AND_CLUSTER, wait_for_lines
from flow_tasks import add, big, counted_sum, pid_ident, fail, ident, mul, on_error, on_success, slow_add, tsum


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@PLAIN_AND_CLUSTER
async def test_the_issue_examples_as_written(worker_factory, client):
    worker_factory("flow_tasks")
    chain = Chain([add.s(1, 2), add.s(3)])  # 1+2=3, 3+3=6
    group = Group([add.s(1, 2), add.s(3, 4)])  # [3, 7]
    chord = Chord([add.s(1, 2), add.s(3, 4)], tsum.s())  # tsum([3, 7]) = 10
    r = await chain.delay()
    assert await r.get(timeout=30) == 6
    g = await group.delay()
    assert isinstance(g, GroupResult)
    assert await g.get(timeout=30) == [3, 7]
    c = await chord.delay()
    assert await c.get(timeout=30) == 10


@PLAIN_AND_CLUSTER
async def test_chain_of_100_steps_and_pipe_syntax(worker_factory, client):
    worker_factory("flow_tasks")
    chain = add.s(0, 1)
    for _ in range(99):
        chain = chain | add.s(1)
    assert len(chain.steps) == 100
    handle = chain.freeze()  # ids are assigned before anything is sent
    assert handle.id == chain.steps[-1].id
    result = await chain.delay()
    assert result == handle, "the chain's handle is its last step's, known up front"
    assert await result.get(timeout=60) == 100
    # Immutable steps ignore the parent's result; partial args go to the first step.
    r = await (add.s(1) | add.si(10, 20) | mul.s(2)).delay(5)
    assert await r.get(timeout=30) == 60


async def test_failing_step_stops_the_chain_and_the_chain_result_raises(worker_factory, client, tmp_path):
    worker_factory("flow_tasks")
    log = tmp_path / "after.txt"
    result = await Chain([add.s(1, 2), fail.s(), on_success.s(str(log))]).delay()
    with pytest.raises(ValueError, match="failing on purpose with \\[3\\]"):
        await result.get(timeout=30)
    assert lines(log) == [], "the step after the failure never ran"


@PLAIN_AND_CLUSTER
async def test_group_of_1000_pipelined_with_result_api_and_restore(worker_factory, client):
    worker_factory("flow_tasks", concurrency=8)
    group = Group([add.s(i, i) for i in range(1000)])
    g = await group.delay()
    assert await g.get(timeout=120) == [2 * i for i in range(1000)]
    assert await g.ready() and await g.successful() and not await g.failed()
    assert await g.completed_count() == 1000
    restored = await GroupResult.restore(g.id)
    assert restored == g and [r.id for r in restored.results] == [r.id for r in g.results]
    assert restored.get_sync(timeout=10)[:3] == [0, 2, 4]

    mixed = await Group([add.s(1, 1), fail.s(7)]).delay()
    with pytest.raises(ValueError):
        await mixed.get(timeout=30)
    assert await mixed.ready() and await mixed.failed() and not await mixed.successful()
    assert await mixed.completed_count() == 1
    with pytest.raises(LookupError):
        await GroupResult.restore("no-such-group")


@PLAIN_AND_CLUSTER
async def test_chord_of_1000_over_two_workers_20_times_fires_each_callback_once(worker_factory, client, tmp_path):
    first = worker_factory("flow_tasks", concurrency=8)
    second = worker_factory("flow_tasks", concurrency=8)
    log = tmp_path / "callbacks.txt"
    pids = tmp_path / "members.txt"
    expected = sum(range(1000))
    for run in range(20):
        chord = Chord([pid_ident.s(i, str(pids)) for i in range(1000)], counted_sum.s(str(log), f"run{run}"))
        assert await (await chord.delay()).get(timeout=120) == expected
    await asyncio.sleep(0.5)  # a second (wrong) callback would have landed by now
    runs = collections.Counter(line.split()[0] for line in lines(log))
    assert runs == {f"run{i}": 1 for i in range(20)}, runs
    assert {tuple(line.split()[1:3]) for line in lines(log)} == {("1000", str(expected))}
    assert set(lines(pids)) == {str(first.pid), str(second.pid)}, "both workers ran members"


@PLAIN_AND_CLUSTER
async def test_chord_member_killed_mid_run_is_redelivered_and_the_callback_runs_once(worker_factory, client, tmp_path):
    marker = tmp_path / "starts.txt"
    log = tmp_path / "callbacks.txt"
    doomed = worker_factory("flow_tasks", concurrency=4, args=["--ack-wait", "2"])
    chord = Chord([slow_add.s(i, 0, str(marker), 1.5) for i in range(6)], counted_sum.s(str(log), "k"))
    result = await chord.delay()
    await wait_for_lines(marker, 2)
    doomed.kill()
    rescuer = worker_factory("flow_tasks", concurrency=4, args=["--ack-wait", "2"])
    assert await result.get(timeout=60) == sum(range(6))
    await asyncio.sleep(0.5)
    assert len(lines(log)) == 1, lines(log)
    assert lines(log)[0].split()[3] == str(rescuer.pid)
    starts = [line.split() for line in lines(marker)]
    assert {s[2] for s in starts} == {str(doomed.pid), str(rescuer.pid)}
    assert len(starts) > 6, "some members ran twice: once in the killed worker, once redelivered"


async def test_chord_member_failure_gives_chord_error_and_no_callback(worker_factory, client, tmp_path):
    worker_factory("flow_tasks")
    log = tmp_path / "callbacks.txt"
    chord = Chord([add.s(1, 1), fail.s("x"), add.s(2, 2)], counted_sum.s(str(log), "f"))
    result = await chord.delay()
    with pytest.raises(ChordError, match=r"member 1 \(task flow_tasks.fail") as info:
        await result.get(timeout=30)
    assert "ValueError" in str(info.value)
    await asyncio.sleep(0.5)
    assert lines(log) == []


async def test_chord_callback_too_large_to_publish_fails_clearly(worker_factory, client):
    worker_factory("flow_tasks", args=["--max-message-bytes", "20000"])
    result = await Chord([big.s(8000) for _ in range(3)], tsum.s()).delay()
    with pytest.raises(dbtask.TooLarge, match="max_message_bytes"):
        await result.get(timeout=30)


async def test_empty_chord_runs_the_callback_with_an_empty_list(worker_factory, client):
    worker_factory("flow_tasks")
    assert await (await Chord([], tsum.s(5)).delay()).get(timeout=30) == 5


@PLAIN_AND_CLUSTER
async def test_nested_workflows(worker_factory, client):
    worker_factory("flow_tasks", concurrency=8)
    # A group followed by a task in a chain becomes a chord.
    c = add.s(1, 1) | Group([add.s(10), add.s(20)]) | tsum.s()
    assert isinstance(c.steps[1], Chord)
    assert await (await c.delay()).get(timeout=30) == 34
    # A chain inside a group, a chord inside a group.
    g = Group([add.s(1, 2) | mul.s(10), Chord([add.s(1, 1), add.s(2, 2)], tsum.s()), ident.s("x")])
    assert await (await g.delay()).get(timeout=30) == [30, 6, "x"]
    # A chord as a chain step followed by more steps; a chain inside a chord header.
    c2 = Chain([ident.s(2), Chord([mul.s(3), add.s(1) | mul.s(10)], tsum.s()), add.s(100)])
    assert await (await c2.delay()).get(timeout=30) == 2 * 3 + (2 + 1) * 10 + 100
    # A group at the end of a chain: the handle is a GroupResult.
    gr = await (ident.s(5) | Group([add.s(1), mul.s(2)])).delay()
    assert isinstance(gr, GroupResult) and await gr.get(timeout=30) == [6, 10]
    # A chord inside a chord header: its failure propagates as ChordError to the outer chord.
    inner = Chord([add.s(1, 1), fail.s()], tsum.s())
    outer = await Chord([inner, add.s(0, 1)], tsum.s()).delay()
    with pytest.raises(ChordError):
        await outer.get(timeout=30)
    # map and starmap.
    assert await (await add.starmap([(1, 2), (3, 4)]).delay()).get(timeout=30) == [3, 7]
    assert await (await ident.map(["a", "b"]).delay()).get(timeout=30) == ["a", "b"]


async def test_link_and_link_error(worker_factory, client, tmp_path):
    worker_factory("flow_tasks")
    log = tmp_path / "callbacks.txt"
    ok = await add.apply_async(2, 3, link=on_success.s(str(log)))
    assert await ok.get(timeout=30) == 5
    await wait_for_lines(log, 1)
    bad = await fail.apply_async(args=(9,), link_error=on_error.s(str(log)), link=on_success.s(str(log)))
    with pytest.raises(ValueError):
        await bad.get(timeout=30)
    await wait_for_lines(log, 2)
    assert lines(log) == ["ok 5", f"{bad.id} ValueError failing on purpose with [9]"]
    # The same from a signature, blocking.
    r = await asyncio.to_thread(add.s(1, 1).apply_async_sync, link=[on_success.s(str(log))])
    assert await r.get(timeout=30) == 2
    await wait_for_lines(log, 3)
    # On a chain: link goes to the last step, link_error to whichever step fails.
    failing = Chain([add.s(1, 1), fail.s(), add.s(5)])
    failing.freeze()
    handle = await failing.apply_async(link_error=on_error.s(str(log)), link=on_success.s(str(log)))
    with pytest.raises(ValueError):
        await handle.get(timeout=30)
    await wait_for_lines(log, 4)
    await asyncio.sleep(0.3)
    assert lines(log)[3:] == [f"{failing.steps[1].id} ValueError failing on purpose with [2]"]


async def test_signatures_are_plain_data_and_restore(worker_factory, client):
    worker_factory("flow_tasks")
    sig = add.s(1, y=2).set(countdown=0.1, priority=3, queue="default")
    data = json.loads(json.dumps(sig))
    assert data == {"task": "flow_tasks.add", "args": [1], "kwargs": {"y": 2},
                    "options": {"queue": "default", "countdown": 0.1, "priority": 3}}
    assert Signature.from_dict(data) == sig
    chord = Chord([add.s(1), add.si(3, 4)], tsum.s())
    wire = json.dumps(Chain([ident.s(0), chord]))
    back = dbtask.signature(json.loads(wire))
    assert isinstance(back, Chain) and isinstance(back.steps[1], Chord)
    assert back.steps[1].members[1].immutable
    assert await (await back.delay()).get(timeout=30) == (0 + 1) + 7
    assert await (await Signature.from_dict(data).delay()).get(timeout=30) == 3
    with pytest.raises(ValueError, match="JSON"):
        await add.s(object()).delay()
    with pytest.raises(TypeError, match="unknown signature option"):
        Signature.from_dict({"task": "flow_tasks.add", "options": {"bogus": 1}})


def test_sync_twins(worker_factory, nats, redis):
    worker_factory("flow_tasks")
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    try:
        assert Chain([add.s(1, 2), add.s(3)]).delay_sync().get_sync(timeout=30) == 6
        g = Group([add.s(1, 2), add.s(3, 4)]).delay_sync()
        assert g.get_sync(timeout=30) == [3, 7]
        assert g.ready_sync() and g.successful_sync() and g.completed_count_sync() == 2
        assert GroupResult.restore_sync(g.id).get_sync(timeout=5) == [3, 7]
        assert Chord([add.s(1, 2), add.s(3, 4)], tsum.s()).delay_sync().get_sync(timeout=30) == 10
    finally:
        dbtask.close_sync()


async def test_a_workflow_sent_twice_runs_twice_and_is_left_as_it_was(worker_factory, client):
    worker_factory("flow_tasks")
    chain = Chain([add.s(1, 2), add.s(3)])
    chord = Chord([add.s(i, i) for i in range(5)], tsum.s(), queue="default")
    partial = add.s(5).on_success(add.s(100))
    before = [json.dumps(s, sort_keys=True) for s in (chain, chord, partial)]

    runs = [await chain.delay(), await chain.delay(), await chord.delay(), await chord.delay(), await partial.delay(1)]
    assert [await r.get(timeout=30) for r in runs] == [6, 6, 20, 20, 6]
    assert len({r.id for r in runs}) == len(runs), "each send gets its own ids"
    # Sending copies what it changes (ids, prepended arguments, options): the signatures the
    # caller holds are unchanged and can be sent again.
    assert [json.dumps(s, sort_keys=True) for s in (chain, chord, partial)] == before
    assert "task_id" not in partial.options and partial.args == [5]
