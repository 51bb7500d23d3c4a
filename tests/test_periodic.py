"""Periodic tasks (issue 16, docs/periodic.md): schedules kept and fired by nats-server, each
tick run once however many workers consume the queue, under an id derived from the schedule
and the tick time; bad input refused at the call; declarations applied by each worker at
start, idempotently. Worker outages, kills and a NATS restart are in test_chaos.py."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import nats as nats_py
import pytest

import dbtask
from e2e_support import VENV, dbtask_cli, start_nats
from periodic_tasks import record

APP = "periodic_tasks"
STREAM = "DBTASK_TASKS"


def tick_id(name: str, tick: int) -> str:
    """The id the worker gives the tick of `name` at Unix second `tick`."""
    return f"{name}:tick:{datetime.fromtimestamp(tick, timezone.utc):%Y%m%dT%H%M%SZ}"


def tick_of(task_id: str) -> int:
    """The Unix second a tick id names."""
    stamp = task_id.rsplit(":tick:", 1)[1]
    return int(datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp())


def runs(path: Path) -> list[tuple[str, int, float, str]]:
    """What `record` wrote: (task id, worker pid, time, label) per run."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        task_id, pid, at, label = (line.split(" ", 3) + [""])[:4]
        out.append((task_id, int(pid), float(at), label))
    return out


async def wait_runs(path: Path, count: int, timeout: float = 10.0) -> list[tuple[str, int, float, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = runs(path)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} runs expected within {timeout} s, got {runs(path)}")


async def schedule_sequence(url: str, name: str) -> int:
    """The stream sequence of the message holding schedule `name` (changes when replaced)."""
    nc = await nats_py.connect(url)
    try:
        msg = await nc.jetstream().get_last_msg(STREAM, f"dbtask.sched.~periodic.{name}")
        return msg.seq
    finally:
        await nc.close()


async def test_every_second_on_two_workers_runs_each_tick_once_under_its_own_id(worker_factory, client, tmp_path):
    worker_factory(APP)
    worker_factory(APP)
    out = tmp_path / "runs.txt"
    await dbtask.schedule("each-second", record.s(str(out), "x"), every=1)
    await asyncio.sleep(5.5)
    assert await dbtask.unschedule("each-second") is True
    await asyncio.sleep(0.5)  # a tick fired just before the removal finishes its run
    done = runs(out)
    assert 4 <= len(done) <= 7, f"5 or 6 ticks in 5.5 s (one of slack at each end): {done}"
    ids = [task_id for task_id, *_ in done]
    assert len(set(ids)) == len(ids), f"a tick ran twice: {ids}"
    ticks = sorted(tick_of(task_id) for task_id in ids)
    assert ticks[-1] - ticks[0] <= 6, f"ticks of one 5.5 s window: {ticks}"
    for task_id, _pid, at, _label in done:
        assert task_id == tick_id("each-second", tick_of(task_id))
        # Promptly after its tick (a tick delivered once the next is due is skipped instead).
        assert tick_of(task_id) <= at < tick_of(task_id) + 2, f"{task_id} ran at {at}"
    # Each tick's result is found under its id.
    assert await dbtask.AsyncResult(ids[-1]).get(timeout=5) == "x"
    assert await dbtask.unschedule("each-second") is False


async def test_ticks_go_on_when_a_worker_dies_and_a_long_outage_runs_only_the_latest_tick(worker_factory, client, tmp_path):
    first = worker_factory(APP)
    second = worker_factory(APP)
    latest, every = tmp_path / "latest.txt", tmp_path / "all.txt"
    await dbtask.schedule("latest", record.s(str(latest), "l"), every=1)
    await dbtask.schedule("all", record.s(str(every), "a"), every=1, catch_up="all")
    await wait_runs(latest, 1)
    first.kill()
    killed = time.time()
    await asyncio.sleep(2.6)
    after_kill = [(pid, at) for _, pid, at, _ in runs(latest) if at > killed]
    assert len(after_kill) >= 2 and {pid for pid, _ in after_kill} == {second.pid}, "the other worker runs the ticks"

    second.send(signal.SIGTERM)
    assert await second.wait_async(15) == 0
    down = time.time()
    await asyncio.sleep(3)
    starting = time.time()  # no worker can take a tick before this
    worker_factory(APP)
    up = time.time()
    await asyncio.sleep(2)
    for name in ("latest", "all"):
        await dbtask.unschedule(name)
    # Fired while no worker ran, and overtaken by the next tick before any worker could take them.
    missed = range(int(down) + 1, int(starting))
    assert len(missed) >= 2
    ran = {tick_of(task_id) for task_id, *_ in runs(latest)}
    assert not ran & set(missed), f"catch_up='latest': no missed tick but the latest runs: {sorted(ran)}"
    for tick in missed:
        info = await dbtask.AsyncResult(tick_id("latest", tick)).info()
        assert info["state"] == "REVOKED" and info["error"]["type"] == "dbtask.Skipped", info
    resumed = sorted(t for t in ran if t > down)
    assert resumed and resumed[0] <= int(up) + 1, f"the latest tick runs as the worker starts: {resumed}, up at {up}"
    ran_all = {tick_of(task_id) for task_id, *_ in runs(every)}
    assert set(missed) <= ran_all, f"catch_up='all': every missed tick runs: {sorted(ran_all)}"


async def test_a_cron_of_five_fields_runs_at_the_next_whole_minute(client):
    before = time.time()
    await dbtask.schedule("minutely", record.s("/dev/null"), cron="* * * * *")
    await dbtask.schedule("paris-nine", record.s("/dev/null"), cron="0 9 * * *", tz="Europe/Paris")
    after = time.time()
    listed = {s["name"]: s for s in await dbtask.schedules()}
    minutely = listed["minutely"]
    assert minutely["cron"] == "0 * * * * *" and minutely["every"] is None and minutely["tz"] == "UTC"
    assert minutely["next_run"] in {(before // 60 + 1) * 60, (after // 60 + 1) * 60}
    assert minutely["signature"] == record.s("/dev/null").set(queue="default")
    assert minutely["last_run_id"] is None
    paris = ZoneInfo("Europe/Paris")
    now = datetime.now(paris)
    nine = now.replace(hour=9, minute=0, second=0, microsecond=0)
    if nine <= now:
        nine = datetime.combine(now.date().fromordinal(now.date().toordinal() + 1), nine.time(), paris)
    assert listed["paris-nine"]["next_run"] == nine.timestamp()
    assert listed["paris-nine"]["tz"] == "Europe/Paris"


async def test_replacing_a_schedule_changes_later_ticks_and_unschedule_stops_it(worker_factory, client, nats, tmp_path):
    worker_factory(APP)
    out = tmp_path / "runs.txt"
    await dbtask.schedule("swap", record.s(str(out), "old"), every=1)
    first_seq = await schedule_sequence(nats.url, "swap")
    await dbtask.schedule("swap", record.s(str(out), "old"), every=1)
    assert await schedule_sequence(nats.url, "swap") == first_seq, "an unchanged schedule is left alone"
    await wait_runs(out, 1)
    await dbtask.schedule("swap", record.s(str(out), "new"), every=1)
    assert await schedule_sequence(nats.url, "swap") > first_seq
    count = len(runs(out))
    await wait_runs(out, count + 2)
    labels = [label for *_, label in runs(out)]
    switched = labels.index("new")
    assert set(labels[switched:]) == {"new"}, f"after the first new tick, only new ones: {labels}"
    assert await dbtask.unschedule("swap") is True
    await asyncio.sleep(0.5)  # a tick already queued may still run
    stopped = len(runs(out))
    await asyncio.sleep(2.2)
    assert len(runs(out)) == stopped, "no tick after unschedule"
    assert all(s["name"] != "swap" for s in await dbtask.schedules())


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"every": 0}, "whole number of seconds"),
        ({"every": -1}, "whole number of seconds"),
        ({"every": 1.5}, "whole number of seconds"),
        ({"cron": "* * * *"}, "4 fields"),
        ({"cron": "61 * * * *"}, "invalid cron"),
        ({"cron": "* * * * *", "tz": "Mars/Base"}, "unknown time zone"),
        ({"cron": "0 9 31 2 *"}, "pattern is invalid"),  # refused by nats-server itself
        ({"every": 5, "cron": "* * * * *"}, "not both"),
        ({}, "every="),
        ({"every": 5, "tz": "Europe/Paris"}, "cron= schedules only"),
        ({"every": 5, "catch_up": "some"}, "catch_up"),
    ],
)
async def test_bad_input_raises_value_error_naming_the_reason(client, kwargs, says):
    with pytest.raises(ValueError, match=says):
        await dbtask.schedule("bad", record.s("/dev/null"), **kwargs)
    assert await dbtask.schedules() == []


async def test_bad_names_and_signatures_raise_value_error(client):
    with pytest.raises(ValueError, match="invalid queue"):
        await dbtask.schedule("bad", {"task": record.name, "options": {"queue": "no such queue"}}, every=1)
    with pytest.raises(ValueError, match="invalid schedule name"):
        await dbtask.schedule("a b", record.s("/dev/null"), every=1)
    with pytest.raises(ValueError, match="task_id"):
        await dbtask.schedule("bad", record.s("/dev/null").set(task_id="mine"), every=1)
    with pytest.raises(ValueError, match="one task signature"):
        await dbtask.schedule("bad", record.s("/dev/null") | record.s(), every=1)
    with pytest.raises(ValueError, match="JSON"):
        dbtask.schedule_sync("bad", record.s(object()), every=1)
    with pytest.raises(ValueError, match="every= .seconds. or cron="):
        dbtask.periodic("bad", record.s("/dev/null"))
    assert await dbtask.schedules() == []


async def test_ticks_of_an_unknown_task_fail_as_unknown_task_and_never_loop(worker_factory, client, nats, redis):
    worker_factory(APP)
    await dbtask.schedule("ghost", dbtask.Signature("no.such.task"), every=1)
    await asyncio.sleep(2.6)
    [ghost] = await dbtask.schedules()
    last = ghost["last_run_id"]
    assert last is not None and last.startswith("ghost:tick:")
    assert await dbtask.unschedule("ghost")
    shown = json.loads(dbtask_cli(nats, redis, "result", last).stdout)
    assert shown["state"] == "FAILURE" and shown["error"]["type"] == "dbtask.UnknownTask"
    with pytest.raises(dbtask.UnknownTask):
        await dbtask.AsyncResult(last).get(timeout=5)
    earlier = tick_id("ghost", tick_of(last) - 1)
    assert (await dbtask.AsyncResult(earlier).state()) == "FAILURE"
    await asyncio.sleep(1.0)
    nc = await nats_py.connect(nats.url)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        assert info.state.messages == 0, "every tick was acked: nothing is delivered again"
    finally:
        await nc.close()


async def test_declared_schedules_are_applied_by_each_worker_once(worker_factory, client, nats, tmp_path):
    out = tmp_path / "declared.txt"
    env = {"PERIODIC_TEST_FILE": str(out), "PERIODIC_TEST_EVERY": "1"}
    worker_factory(APP, env=env)
    first = await schedule_sequence(nats.url, "declared")
    await wait_runs(out, 2)
    worker_factory(APP, env=env)
    assert await schedule_sequence(nats.url, "declared") == first, "an unchanged declaration is left alone"
    worker_factory(APP, env={**env, "PERIODIC_TEST_EVERY": "3"})
    assert await schedule_sequence(nats.url, "declared") > first, "a changed declaration replaces it"
    [declared] = await dbtask.schedules()
    assert declared["every"] == 3 and declared["args"] == [str(out), "declared"]


async def test_skip_if_running_never_overlaps_ticks(worker_factory, client, tmp_path):
    worker_factory(APP)
    worker_factory(APP)
    out = tmp_path / "runs.txt"
    await dbtask.schedule("slow", record.s(str(out), "slow", 1.6), every=1, skip_if_running=True)
    await asyncio.sleep(4.6)
    await dbtask.unschedule("slow")
    await asyncio.sleep(1.8)
    done = sorted(runs(out), key=lambda r: r[2])
    assert 2 <= len(done) <= 3, done
    for (_, _, earlier, _), (_, _, later, _) in zip(done, done[1:]):
        assert later - earlier >= 1.6, f"a tick started while the previous one ran: {done}"
    ran = {task_id for task_id, *_ in done}
    first, last = min(tick_of(t) for t in ran), max(tick_of(t) for t in ran)
    skipped = [tick_id("slow", t) for t in range(first, last) if tick_id("slow", t) not in ran]
    assert skipped, "some ticks found the previous one running"
    for task_id in skipped:
        info = await dbtask.AsyncResult(task_id).info()
        assert info["state"] == "REVOKED" and info["error"]["type"] == "dbtask.Skipped", info
    with pytest.raises(dbtask.Skipped, match="still running"):
        await dbtask.AsyncResult(skipped[0]).get(timeout=5)


async def test_the_command_line_adds_lists_runs_and_removes(worker_factory, client, nats, redis, tmp_path):
    worker_factory(APP)
    out = tmp_path / "runs.txt"
    args = json.dumps([str(out), "cli"])
    dbtask_cli(nats, redis, "schedule", "add", "nightly", record.name, "--cron", "0 3 * * *", "--args", args, "--tz", "Asia/Tokyo")
    listed = json.loads(dbtask_cli(nats, redis, "schedule", "list", "--json").stdout)
    assert [(s["name"], s["cron"], s["tz"], s["args"]) for s in listed] == [("nightly", "0 0 3 * * *", "Asia/Tokyo", [str(out), "cli"])]
    table = dbtask_cli(nats, redis, "schedule", "list").stdout
    assert "nightly" in table and "Asia/Tokyo" in table
    fired = dbtask_cli(nats, redis, "schedule", "run", "nightly").stdout.strip()
    assert fired.startswith("nightly:tick:")
    assert await dbtask.AsyncResult(fired).get(timeout=10) == "cli"
    [(task_id, *_)] = runs(out)
    assert task_id == fired
    bad = dbtask_cli(nats, redis, "schedule", "add", "x", record.name, "--every", "0", check=False)
    assert bad.returncode == 1 and "whole number of seconds" in bad.stderr
    dbtask_cli(nats, redis, "schedule", "remove", "nightly")
    gone = dbtask_cli(nats, redis, "schedule", "remove", "nightly", check=False)
    assert gone.returncode == 1 and "no schedule named" in gone.stderr
    missing = dbtask_cli(nats, redis, "schedule", "run", "nightly", check=False)
    assert missing.returncode == 1 and "no schedule named" in missing.stderr


async def test_periodic_tasks_on_a_server_older_than_2_14_say_what_to_do(redis, worker_factory, tmp_path):
    # nats-server 2.12 (installed apart by scripts/setup.sh) runs countdowns but not repeating
    # schedules: the client and a worker with declarations say so, naming the version.
    old_nats = VENV / "nats-2.12.8" / "bin" / "nats-server"
    assert old_nats.exists(), f"{old_nats} is missing: run `make setup`"
    old = start_nats(tmp_path / "old-nats", binary=old_nats)
    try:
        await dbtask.init(nats_url=old.url, redis_url=redis.url)
        try:
            with pytest.raises(RuntimeError, match=r"periodic tasks need nats-server 2\.14 or later.*this server is 2\.12\.8"):
                await dbtask.schedule("too-early", record.s("/dev/null"), every=1)
            # Countdowns keep working there.
            worker_factory(APP, nats_url=old.url)
            done = await record.apply_async(args=(str(tmp_path / "runs.txt"), "later"), countdown=0.3)
            assert await done.get(timeout=15) == "later"
        finally:
            await dbtask.close()
        declaring = worker_factory(APP, nats_url=old.url, ready=False, env={"PERIODIC_TEST_FILE": str(tmp_path / "declared.txt")})
        assert declaring.wait(30) != 0, "a worker whose modules declare schedules cannot serve them here"
        assert "periodic tasks need nats-server 2.14 or later" in declaring.stderr, declaring.stderr[-2000:]
        assert "upgrade nats-server" in declaring.stderr
    finally:
        old.stop()
