"""The dashboard's model (dbtask.dashboard._model): what it makes of the workers' events and
replies, without servers. The page itself is tested in a real browser by tests/test_dashboard.py."""

from __future__ import annotations

from dbtask.dashboard._model import Model


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def event(kind: str, task_id: str = "t1", **fields):
    return {"event": kind, "timestamp": 1_800_000_000.0, "id": task_id, "task": "app.add",
            "queue": "default", "worker": "host:1", "attempt": 1, **fields}  # fmt: skip


def test_a_task_goes_through_its_states_and_keeps_its_error():
    m = Model(clock=Clock())
    assert m.apply(event("task.received", parent_id="p1", root_id="r1"))[1]["state"] == "RECEIVED"
    assert m.apply(event("task.started"))[1]["state"] == "STARTED"
    kind, task = m.apply(event("task.failed", runtime=0.5, error_type="ValueError", error="boom"))
    assert kind == "task" and task["state"] == "FAILURE"
    assert (task["error_type"], task["error"], task["runtime"]) == ("ValueError", "boom", 0.5)
    assert (task["parent_id"], task["root_id"]) == ("p1", "r1")  # from the received event
    assert [e["event"] for e in m.timelines["t1"]] == ["task.received", "task.started", "task.failed"]
    # A late event of the same attempt from elsewhere does not reopen it.
    assert m.apply(event("task.started"))[1]["state"] == "FAILURE"
    # A new delivery does.
    assert m.apply(event("task.received", attempt=2))[1]["state"] == "RECEIVED"


def test_only_the_most_recent_tasks_are_kept_and_search_finds_them():
    m = Model(max_tasks=3, clock=Clock())
    for i in range(5):
        m.apply(event("task.succeeded", task_id=f"id-{i}", runtime=0.002))
    m.apply(event("task.failed", task_id="id-9", task="app.charge", error_type="E", error="x"))
    assert list(m.tasks) == ["id-3", "id-4", "id-9"]
    assert set(m.timelines) == {"id-3", "id-4", "id-9"}
    assert [t["id"] for t in m.search("ID-")] == ["id-9", "id-4", "id-3"]
    assert [t["id"] for t in m.search("charge")] == ["id-9"]
    assert [t["id"] for t in m.search(state="success")] == ["id-4", "id-3"]


def test_charts_count_by_minute_over_the_last_hour():
    clock = Clock()
    m = Model(clock=clock)
    m.apply(event("task.succeeded", task_id="a", runtime=0.0005))
    m.apply(event("task.failed", task_id="b", runtime=2.0, error_type="E", error=""))
    m.apply(event("task.dead_lettered", task_id="c", reason="max_deliver=2"))
    clock.t += 61 * 60  # an hour and a minute later: the first minute has left the chart
    m.apply(event("task.succeeded", task_id="d", runtime=0.05))
    charts = m.charts()
    assert len(charts["throughput"]) == 60
    assert sum(x["succeeded"] for x in charts["throughput"]) == 1
    assert sum(x["failed"] for x in charts["throughput"]) == 0
    assert charts["throughput"][-1]["succeeded"] == 1
    # Runtimes are kept since the start: < 1 ms, 10-100 ms, 1-10 s.
    assert charts["runtime"]["counts"] == [1, 0, 1, 0, 1, 0, 0, 0]


def test_workers_are_up_while_heard_from_and_down_after_offline_or_silence():
    clock = Clock()
    m = Model(clock=clock)
    hb = {"event": "worker.heartbeat", "worker": "host:1", "heartbeat_interval": 5.0, "running": 2,
          "processed": {"total": 7}, "queues": ["default"]}  # fmt: skip
    assert m.apply(hb)[1]["up"] is True
    clock.t += 16
    assert m.overview()["workers"][0]["up"] is False
    m.apply(hb)
    assert m.apply({"event": "worker.offline", "worker": "host:1"})[1]["up"] is False
    # A worker without --events is known from its stats reply.
    assert m.stats_reply({"worker": "host:2", "processed": {"total": 3}, "events": False})["up"] is True
    assert m.stats_reply({"worker": "host:3", "error": "x"}) is None


def test_queues_merge_the_workers_replies_and_have_a_rate():
    clock = Clock(1_800_000_030.0)  # 30 s into a minute
    m = Model(clock=clock)
    level = {"priority": 5, "pending": 4, "ack_pending": 0}
    m.queues_replies([
        {"worker": "a:1", "queues": [{"queue": "default", "pending": 4, "levels": [level]}]},
        {"worker": "b:2", "queues": [{"queue": "default", "pending": 4, "levels": [level]}]},
    ])  # fmt: skip
    for i in range(30):
        m.apply(event("task.received", task_id=f"r{i}"))
    (row,) = m.queue_rows()
    assert row["queue"] == "default" and row["pending"] == 4
    assert row["levels"] == [{"priority": 5, "pending": 4}]
    assert row["workers"] == ["a:1", "b:2"]
    assert row["rate"] == 0.5


def test_unknown_or_malformed_events_are_ignored():
    m = Model(clock=Clock())
    for bad in [None, [], {}, {"event": 3}, {"event": "task.succeeded"}, {"event": "task.nope", "id": "x"},
                {"event": "worker.heartbeat"}]:  # fmt: skip
        assert m.apply(bad) is None
    assert not m.tasks and not m.workers
