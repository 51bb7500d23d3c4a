"""What the dashboard knows, made from the workers' events and replies; no I/O here.

``Model.apply(event)`` takes one event as the worker publishes it (docs/operations.md,
"Events") and returns what changed, for the browsers: the task's or the worker's new summary.
Tasks are kept in memory, the most recent ``max_tasks`` of them (older ones are still found by
id: the task page reads the record in Redis). Counts by minute over the last hour and a runtime
histogram feed the charts; they start when the dashboard starts (events are not stored).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Optional

# The state a task is in after each task event (Celery's states).
STATE_OF_EVENT = {
    "task.received": "RECEIVED",
    "task.started": "STARTED",
    "task.succeeded": "SUCCESS",
    "task.failed": "FAILURE",
    "task.retried": "RETRY",
    "task.revoked": "REVOKED",
    "task.rejected": "FAILURE",
    "task.dead_lettered": "FAILURE",
}
FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
# Events that end a run badly: the failures chart.
FAILED_EVENTS = frozenset({"task.failed", "task.rejected", "task.dead_lettered"})

# Upper bounds (seconds) of the runtime histogram's buckets; the last one is open.
RUNTIME_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0)
MINUTES = 60
# A worker not heard from for this many heartbeat intervals is shown down.
MISSED_HEARTBEATS = 3
# Events kept per task for its page.
TIMELINE_LIMIT = 50


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class Model:
    def __init__(self, max_tasks: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self.max_tasks = max_tasks
        self.clock = clock
        self.tasks: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.timelines: dict[str, deque[dict[str, Any]]] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        # minute (Unix seconds // 60) -> {"succeeded": n, "failed": n, "received": {queue: n}}
        self.minutes: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.runtimes = [0] * (len(RUNTIME_BUCKETS) + 1)
        self.queues: dict[str, dict[str, Any]] = {}
        self.queues_at: Optional[float] = None
        self.started = clock()

    # --- events ------------------------------------------------------------------------------

    def apply(self, event: Any) -> Optional[tuple[str, dict[str, Any]]]:
        """Takes in one event; returns ("task", summary) or ("worker", summary), or None for
        an event it does not know (it is ignored)."""
        if not isinstance(event, dict):
            return None
        kind = event.get("event")
        if not isinstance(kind, str):
            return None
        if kind.startswith("worker."):
            return self._worker_event(kind, event)
        if kind in STATE_OF_EVENT and isinstance(event.get("id"), str) and event["id"]:
            return self._task_event(kind, event)
        return None

    def _task_event(self, kind: str, event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        task_id = event["id"]
        now = self.clock()
        task = self.tasks.get(task_id)
        if task is None:
            task = {"id": task_id, "state": None, "attempt": 0}
            self.tasks[task_id] = task
            while len(self.tasks) > self.max_tasks:
                old, _ = self.tasks.popitem(last=False)
                self.timelines.pop(old, None)
        else:
            self.tasks.move_to_end(task_id)
        attempt = int(_number(event.get("attempt")) or 1)
        state = STATE_OF_EVENT[kind]
        # NATS keeps one publisher's order, but a redelivery may be handled by another worker:
        # a late received/started of an earlier attempt must not reopen a finished task.
        stale = task["state"] in FINAL_STATES and state not in FINAL_STATES and attempt <= task["attempt"]
        if not stale:
            task["state"] = state
            task["attempt"] = max(task["attempt"], attempt)
        for field in ("task", "queue", "worker", "parent_id", "root_id"):
            if isinstance(event.get(field), str):
                task[field] = event[field]
        stamp = _number(event.get("timestamp")) or now
        if kind == "task.received":
            task.setdefault("received", stamp)
        elif kind == "task.started":
            task["started"] = stamp
        runtime = _number(event.get("runtime"))
        if runtime is not None:
            task["runtime"] = runtime
        if kind in ("task.failed", "task.retried", "task.revoked", "task.rejected"):
            task["error_type"] = event.get("error_type")
            task["error"] = event.get("error")
        elif kind == "task.dead_lettered":
            task["error_type"] = "dbtask.DeadLettered"
            task["error"] = event.get("reason")
        elif kind == "task.succeeded":
            task.pop("error_type", None)
            task.pop("error", None)
        if kind == "task.dead_lettered":
            task["dead_lettered"] = True
        if state in FINAL_STATES or kind == "task.retried":
            task["done"] = stamp
        task["updated"] = now
        line = {"event": kind, "timestamp": stamp, "worker": event.get("worker"), "attempt": attempt}
        for field in ("runtime", "error_type", "error", "retry_in", "reason"):
            if event.get(field) is not None:
                line[field] = event[field]
        self.timelines.setdefault(task_id, deque(maxlen=TIMELINE_LIMIT)).append(line)
        self._count(kind, event, runtime, now)
        return "task", dict(task)

    def _count(self, kind: str, event: dict[str, Any], runtime: Optional[float], now: float) -> None:
        minute = int(now // 60)
        bucket = self.minutes.get(minute)
        if bucket is None:
            bucket = self.minutes[minute] = {"succeeded": 0, "failed": 0, "received": {}}
            while self.minutes and next(iter(self.minutes)) <= minute - MINUTES:
                self.minutes.popitem(last=False)
        if kind == "task.succeeded":
            bucket["succeeded"] += 1
        elif kind in FAILED_EVENTS:
            bucket["failed"] += 1
        elif kind == "task.received" and isinstance(event.get("queue"), str):
            queue = event["queue"]
            bucket["received"][queue] = bucket["received"].get(queue, 0) + 1
        if runtime is not None and kind in ("task.succeeded", "task.failed"):
            self.runtimes[bisect.bisect_left(RUNTIME_BUCKETS, runtime)] += 1

    def _worker_event(self, kind: str, event: dict[str, Any]) -> Optional[tuple[str, dict[str, Any]]]:
        worker_id = event.get("worker")
        if not isinstance(worker_id, str) or not worker_id:
            return None
        worker = self.workers.setdefault(worker_id, {"id": worker_id})
        for field in ("hostname", "pid", "version", "queues", "concurrency", "heartbeat_interval",
                      "running", "prefetched", "processed", "loadavg", "rss_bytes"):  # fmt: skip
            if field in event:
                worker[field] = event[field]
        worker["seen"] = self.clock()
        worker["events"] = True
        if kind == "worker.offline":
            worker["offline"] = True
        elif kind == "worker.online":
            worker.pop("offline", None)
            worker["online_at"] = _number(event.get("timestamp"))
        else:
            worker.pop("offline", None)
        return "worker", self.worker_summary(worker)

    def stats_reply(self, reply: dict[str, Any]) -> Optional[dict[str, Any]]:
        """A worker's answer to ``inspect stats``: it is up, with these figures."""
        worker_id = reply.get("worker")
        if not isinstance(worker_id, str) or "error" in reply:
            return None
        worker = self.workers.setdefault(worker_id, {"id": worker_id})
        for field in ("hostname", "pid", "version", "queues", "concurrency", "running", "prefetched",
                      "processed", "loadavg", "rss_bytes", "uptime", "pool", "events"):  # fmt: skip
            if field in reply:
                worker[field] = reply[field]
        worker["seen"] = self.clock()
        worker.pop("offline", None)
        return self.worker_summary(worker)

    def worker_summary(self, worker: dict[str, Any]) -> dict[str, Any]:
        summary = dict(worker)
        summary["up"] = self.worker_up(worker)
        return summary

    def worker_up(self, worker: dict[str, Any]) -> bool:
        if worker.get("offline"):
            return False
        interval = _number(worker.get("heartbeat_interval")) or 5.0
        # Stats are asked every few seconds too: a worker without --events is judged by them.
        silence = max(MISSED_HEARTBEATS * interval, 15.0)
        return self.clock() - float(worker.get("seen", 0.0)) <= silence

    # --- queues --------------------------------------------------------------------------------

    def queues_replies(self, replies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The workers' answers to ``inspect queues``, one entry per queue (workers of a queue
        share its consumers, so their figures are the same: the largest is kept)."""
        queues: dict[str, dict[str, Any]] = {}
        for reply in replies:
            for q in reply.get("queues") or []:
                name = q.get("queue")
                if not isinstance(name, str):
                    continue
                entry = queues.setdefault(name, {"queue": name, "pending": 0, "levels": {}, "workers": []})
                entry["workers"].append(reply.get("worker"))
                entry["pending"] = max(entry["pending"], int(_number(q.get("pending")) or 0))
                for level in q.get("levels") or []:
                    priority = level.get("priority")
                    if not isinstance(priority, int):
                        continue
                    pending = int(_number(level.get("pending")) or 0)
                    entry["levels"][priority] = max(entry["levels"].get(priority, 0), pending)
        for entry in queues.values():
            entry["levels"] = [{"priority": p, "pending": n} for p, n in sorted(entry["levels"].items(), reverse=True)]
        self.queues = queues
        self.queues_at = self.clock()
        return queues

    def queue_rows(self) -> list[dict[str, Any]]:
        """Each queue known (from the workers' answers or the events) with its rate: tasks
        received per second over the last minute."""
        now = self.clock()
        minute = int(now // 60)
        names = set(self.queues)
        current = self.minutes.get(minute, {"received": {}})["received"]
        previous = self.minutes.get(minute - 1, {"received": {}})["received"]
        names.update(current, previous)
        # The last 60 s: this minute so far plus the share of the previous minute still in it.
        share = 1.0 - (now - minute * 60) / 60.0
        rows = []
        for name in sorted(names):
            row = dict(self.queues.get(name) or {"queue": name, "pending": None, "levels": [], "workers": []})
            row["rate"] = (current.get(name, 0) + share * previous.get(name, 0)) / 60.0
            rows.append(row)
        return rows

    # --- what the browser asks for ---------------------------------------------------------------

    def charts(self) -> dict[str, Any]:
        now_minute = int(self.clock() // 60)
        series = []
        for minute in range(now_minute - MINUTES + 1, now_minute + 1):
            bucket = self.minutes.get(minute)
            series.append(
                {
                    "minute": minute * 60,
                    "succeeded": bucket["succeeded"] if bucket else 0,
                    "failed": bucket["failed"] if bucket else 0,
                }
            )
        return {
            "throughput": series,
            "runtime": {"bounds": list(RUNTIME_BUCKETS), "counts": list(self.runtimes)},
            "since": self.started,
        }

    def search(self, query: str = "", state: str = "", limit: int = 200) -> list[dict[str, Any]]:
        """The most recent tasks first, those whose id or name contains ``query`` (any case) and
        whose state is ``state`` (when given)."""
        query = query.strip().lower()
        state = state.strip().upper()
        found = []
        for task in reversed(self.tasks.values()):
            if state and task.get("state") != state:
                continue
            if query and query not in task["id"].lower() and query not in str(task.get("task", "")).lower():
                continue
            found.append(dict(task))
            if len(found) >= limit:
                break
        return found

    def overview(self) -> dict[str, Any]:
        return {
            "now": self.clock(),
            "workers": sorted((self.worker_summary(w) for w in self.workers.values()), key=lambda w: w["id"]),
            "queues": self.queue_rows(),
            "charts": self.charts(),
            "tasks_kept": len(self.tasks),
            "max_tasks": self.max_tasks,
        }
