"""Events (issue 17, section 2): `dbtask-worker --events` publishes task and worker lifecycle
events on core NATS, and `dbtask events` prints them live. A real cluster of two workers on
the same servers; the events are read by the real command line."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import dbtask
from e2e_support import DBTASK_CLI, Server, Worker, worker_env

import inspect_tasks


class Listener:
    """`dbtask events ARGS` running in the background; its stdout lines collected."""

    def __init__(self, nats: Server, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(DBTASK_CLI), "events", *args],
            env=worker_env(DBTASK_NATS_URL=nats.url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        # Subscribed once it says so: no event published after that is missed.
        first = self.proc.stderr.readline()
        assert "listening for events" in first, first + self.proc.stderr.read()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines)]

    def wait_for(self, what, timeout: float = 20.0) -> list:
        """Waits until `what(lines or events)` is truthy; returns what it gave."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = what()
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"not seen within {timeout} s; got:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        """Ctrl-C; its exit code."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def worker_id(w: Worker) -> str:
    """The id a worker goes by: hostname:pid (from its `worker ready` line)."""
    line = next(x for x in w.stderr.splitlines() if "worker ready" in x)
    return line.split(" worker=")[1].split()[0]


@pytest.fixture
def listeners():
    started: list[Listener] = []
    yield started
    for listener in started:
        if listener.proc.poll() is None:
            listener.proc.kill()


async def test_two_workers_publish_task_and_worker_events(worker_factory, client, nats, listeners):
    everything = Listener(nats, "--json")
    failures = Listener(nats, "--task", "inspect_tasks.fail")
    listeners += [everything, failures]
    args = ["--events", "--heartbeat-interval", "0.5"]
    w1 = worker_factory("inspect_tasks", args=args)
    w2 = worker_factory("inspect_tasks", args=args)
    ids = {worker_id(w1), worker_id(w2)}
    assert len(ids) == 2 and {i.rsplit(":", 1)[1] for i in ids} == {str(w1.pid), str(w2.pid)}

    ok = await inspect_tasks.add.delay(2, 3)
    bad = await inspect_tasks.fail.delay("no good")
    assert await ok.get(timeout=20) == 5
    with pytest.raises(ValueError):
        await bad.get(timeout=20)

    def of(task_id: str) -> dict:
        return {e["event"]: e for e in everything.events() if e.get("id") == task_id}

    done = everything.wait_for(lambda: "task.succeeded" in of(ok.id) and "task.failed" in of(bad.id) and of(ok.id))
    assert done
    seen_ok, seen_bad = of(ok.id), of(bad.id)
    for seen, name in [(seen_ok, "inspect_tasks.add"), (seen_bad, "inspect_tasks.fail")]:
        assert {"task.received", "task.started"} <= set(seen), seen
        for event in seen.values():
            assert event["task"] == name and event["queue"] == "default" and event["worker"] in ids
            assert isinstance(event["timestamp"], float) and event["attempt"] == 1
        assert seen["task.received"]["timestamp"] <= seen["task.started"]["timestamp"]
    assert seen_ok["task.succeeded"]["runtime"] >= 0
    failed = seen_bad["task.failed"]
    assert failed["error_type"] == "ValueError" and failed["error"] == "no good"
    assert failed["runtime"] >= 0

    # The worker events: each worker came online and beats with its load figures.
    def beats() -> dict:
        out: dict = {}
        for e in everything.events():
            if e["event"].startswith("worker."):
                out.setdefault(e["worker"], []).append(e)
        return out if set(out) == ids and all(len(v) >= 2 for v in out.values()) else {}

    by_worker = everything.wait_for(beats)
    for wid, events in by_worker.items():
        assert events[0]["event"] == "worker.online", events
        heartbeat = next(e for e in events if e["event"] == "worker.heartbeat")
        assert heartbeat["pid"] == int(wid.rsplit(":", 1)[1]) and heartbeat["queues"] == ["default"]
        assert heartbeat["concurrency"] == 4 and heartbeat["rss_bytes"] > 0 and len(heartbeat["loadavg"]) == 3
        assert {"running", "prefetched", "processed"} <= set(heartbeat)
    # Each task ended on one worker: the processed counts add up, once the next beats say so.
    everything.wait_for(
        lambda: sum(
            max(e["processed"]["total"] for e in everything.events() if e.get("worker") == wid and "processed" in e)
            for wid in ids
        )
        == 2
    )

    # A graceful stop says so last.
    w1.send(signal.SIGTERM)
    assert w1.wait(30) == 0
    offline = everything.wait_for(
        lambda: [e for e in everything.events() if e["event"] == "worker.offline" and e["worker"] == worker_id(w1)]
    )
    assert len(offline) == 1
    later = [e for e in everything.events() if e.get("worker") == worker_id(w1)]
    assert later[-1]["event"] == "worker.offline", "nothing after offline"

    # --task NAME: only that task's events, one line each, for people.
    lines = failures.wait_for(lambda: [x for x in failures.lines if "task.failed" in x])
    assert all("inspect_tasks.fail" in x for x in failures.lines), failures.lines
    assert bad.id in lines[0] and "error=ValueError: no good" in lines[0]
    # Ctrl-C exits cleanly.
    assert everything.stop() == 0
    assert failures.stop() == 0


async def test_without_events_nothing_is_published(worker_factory, client, nats, listeners):
    listener = Listener(nats, "--json")
    listeners.append(listener)
    worker_factory("inspect_tasks")
    assert await (await inspect_tasks.add.delay(1, 1)).get(timeout=20) == 2
    # A worker with --events on the same servers is heard: the listener works.
    worker_factory("inspect_tasks", args=["--events"])
    listener.wait_for(lambda: [e for e in listener.events() if e["event"] == "worker.online"])
    assert {e["event"] for e in listener.events()} == {"worker.online"}, listener.lines
    assert listener.stop() == 0
