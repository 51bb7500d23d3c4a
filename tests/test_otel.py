"""OpenTelemetry across client and worker (docs/tracing.md), with the real worker: the client's
span, the `send` span of the publish and the `process` span of each step of a chain of three
are one trace, each step the child of the one before (the worker publishes the next step with
the running step's context); the spans carry the messaging attributes; a failing task's span
has status ERROR and the exception. Both processes configure the SDK in `apps/otel_tasks.py`
and write their finished spans to one JSON-lines file."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from e2e_support import APPS, VENV, worker_env

pytest.importorskip("opentelemetry.sdk")


def spans_of(path: Path, count: int, timeout: float = 20.0) -> list[dict]:
    """The spans written so far, once there are `count` (the last ones end after the record
    is stored, so get() can return before they are written)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(seen) >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)


def test_a_chain_is_one_trace_from_the_client_through_every_step(worker_factory, nats, redis, tmp_path: Path):
    spans_path = tmp_path / "spans.jsonl"
    worker_factory("otel_tasks", env={"DBTASK_TEST_SPANS": str(spans_path)})
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "otel_tasks.py", nats.url, redis.url],
        cwd=APPS,
        env=worker_env(DBTASK_TEST_SPANS=str(spans_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    told = json.loads(out.stdout.strip().splitlines()[-1])
    assert told["result"] == 16  # (1 + 2) * 2 + 10

    # request, two sends (the chain, the failing task), four process spans.
    spans = spans_of(spans_path, 7)
    by_name: dict[str, list[dict]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    (request,) = by_name["request"]
    assert request["service"] == "client"
    sends = by_name["send dbtask.workflow"] + by_name["send dbtask.tasks.default"]
    assert all(s["kind"] == "PRODUCER" and s["parent"] == request["span_id"] for s in sends)
    chain_send = by_name["send dbtask.workflow"][0]

    process = [s for s in by_name["process dbtask.tasks.default"] if s["service"] == "worker"]
    assert len(process) == 4
    assert {s["trace_id"] for s in spans} == {request["trace_id"]}, "one trace, client and worker"

    steps = [s for s in process if s["attributes"]["dbtask.task.name"] != "otel.fail"]
    first = next(s for s in steps if s["parent"] == chain_send["span_id"])
    second = next(s for s in steps if s["parent"] == first["span_id"])
    third = next(s for s in steps if s["parent"] == second["span_id"])
    assert [s["attributes"]["dbtask.task.name"] for s in (first, second, third)] == ["otel.add", "otel.double", "otel.add"]
    assert third["attributes"]["dbtask.task.id"] == told["last"]
    assert second["attributes"]["dbtask.task.parent_id"] == first["attributes"]["dbtask.task.id"]
    for s in (first, second, third):
        a = s["attributes"]
        assert s["kind"] == "CONSUMER" and s["status"] == "UNSET"
        assert a["messaging.system"] == "nats"
        assert a["messaging.operation.type"] == "process"
        assert a["messaging.destination.name"] == "dbtask.tasks.default"
        assert a["messaging.message.id"] == a["dbtask.task.id"]
        assert a["dbtask.task.retries"] == 0 and a["dbtask.task.state"] == "SUCCESS"

    (failed,) = [s for s in process if s["attributes"]["dbtask.task.name"] == "otel.fail"]
    assert failed["attributes"]["dbtask.task.id"] == told["failing"]
    assert failed["status"] == "ERROR" and "exception" in failed["events"]
    assert failed["attributes"]["dbtask.task.state"] == "FAILURE"
    task_send = by_name["send dbtask.tasks.default"][0]
    assert failed["parent"] == task_send["span_id"]


def test_with_the_process_pool_the_steps_stay_in_the_trace(worker_factory, nats, redis, tmp_path: Path):
    # Sync steps run in pool processes, whose spans the worker cannot hear of: what follows
    # them carries the message's own context (siblings under the send span), while the
    # async step runs in the worker and its follow-up continues its span.
    spans_path = tmp_path / "spans.jsonl"
    worker_factory("otel_tasks", args=["--pool", "processes"], concurrency=2, env={"DBTASK_TEST_SPANS": str(spans_path)})
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "otel_tasks.py", nats.url, redis.url],
        cwd=APPS,
        env=worker_env(DBTASK_TEST_SPANS=str(spans_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["result"] == 16
    spans = spans_of(spans_path, 7)
    assert len({s["trace_id"] for s in spans}) == 1
    (chain_send,) = [s for s in spans if s["name"] == "send dbtask.workflow"]
    process = [s for s in spans if s["name"] == "process dbtask.tasks.default"]
    names = {s["span_id"]: s["attributes"]["dbtask.task.name"] for s in process}
    first = next(s for s in process if s["parent"] == chain_send["span_id"] and names[s["span_id"]] == "otel.add")
    second = next(s for s in process if names[s["span_id"]] == "otel.double")
    assert second["parent"] == chain_send["span_id"], "after a pool task: the message's context"
    third = next(s for s in process if s["parent"] == second["span_id"])
    assert names[third["span_id"]] == "otel.add" and first is not third
    failed = next(s for s in process if names[s["span_id"]] == "otel.fail")
    assert failed["status"] == "ERROR"
