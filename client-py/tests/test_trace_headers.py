"""OpenTelemetry on the client (docs/tracing.md): with the SDK configured, a publish carries the
current trace context in the message headers (``traceparent``) under a ``send`` span; without
a tracer provider, or with ``DBTASK_OTEL=off``, no header is added and the client is not
wrapped. The traced cases run in a child process: a tracer provider is set once per process,
and this one must keep running the other tests untraced."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest

import dbtask
from conftest import PY, add, last_message

pytest.importorskip("opentelemetry.sdk")

# Configures the SDK, publishes inside a span of its own, prints what it saw as JSON.
CHILD = r"""
import json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

import dbtask
from dbtask import _client

@dbtask.task(name="t.add", queue="math")
def add(x, y):
    return x + y

dbtask.init_sync(nats_url=sys.argv[1], redis_url=sys.argv[2])
with trace.get_tracer("test").start_as_current_span("request") as outer:
    inside = add.delay_sync(1, 2).id
outside = add.delay_sync(3, 4).id
wrapped = type(_client.current()).__name__
dbtask.close_sync()
spans = [
    {"name": s.name, "kind": s.kind.name, "trace_id": format(s.context.trace_id, "032x"),
     "span_id": format(s.context.span_id, "016x"),
     "parent": format(s.parent.span_id, "016x") if s.parent else None,
     "attributes": dict(s.attributes)}
    for s in exporter.get_finished_spans()
]
print(json.dumps({"inside": inside, "outside": outside, "wrapped": wrapped, "spans": spans}))
"""


def run_child(nats, redis, **env: str) -> dict:
    out = subprocess.run(
        [PY, "-c", CHILD, nats.url, redis.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def headers_of(nats, task_id: str) -> dict:
    # Both messages went to the same subject: read them by sequence from the stream.
    async def read() -> dict:
        import nats as nats_py

        nc = await nats_py.connect(nats.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("DBTASK_TASKS")
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await js.get_msg("DBTASK_TASKS", seq)
                except Exception:
                    continue
                if msg.headers and msg.headers.get("Dbtask-Id") == task_id:
                    return dict(msg.headers)
        finally:
            await nc.close()
        raise AssertionError(f"no message for task {task_id}")

    return asyncio.run(read())


def test_a_publish_inside_a_span_carries_its_trace_context(nats, redis):
    seen = run_child(nats, redis)
    assert seen["wrapped"] == "TracedClient"
    spans = {s["name"]: s for s in seen["spans"] if s["name"] == "request"}
    request = spans["request"]
    sends = [s for s in seen["spans"] if s["name"] == "send dbtask.tasks.math"]
    assert len(sends) == 2
    inside = next(s for s in sends if s["attributes"]["messaging.message.id"] == seen["inside"])
    assert inside["kind"] == "PRODUCER" and inside["parent"] == request["span_id"]
    assert inside["trace_id"] == request["trace_id"]
    assert inside["attributes"]["messaging.system"] == "nats"
    assert inside["attributes"]["messaging.operation.type"] == "send"
    assert inside["attributes"]["messaging.destination.name"] == "dbtask.tasks.math"
    assert inside["attributes"]["dbtask.task.name"] == "t.add"

    headers = headers_of(nats, seen["inside"])
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", request["trace_id"], inside["span_id"])
    assert int(flags, 16) & 1, "sampled"
    # Outside the request span the send span is a trace of its own, still carried.
    outside = next(s for s in sends if s["attributes"]["messaging.message.id"] == seen["outside"])
    assert outside["parent"] is None
    assert headers_of(nats, seen["outside"])["traceparent"].split("-")[2] == outside["span_id"]


def test_dbtask_otel_off_turns_it_off(nats, redis):
    seen = run_child(nats, redis, DBTASK_OTEL="off")
    assert seen["wrapped"] == "Client" and seen["spans"][0]["name"] == "request"
    assert "traceparent" not in headers_of(nats, seen["inside"])


def test_without_a_tracer_provider_nothing_is_added(client, nats):
    from dbtask import _client

    # This process set no tracer provider: the client is the compiled one, not wrapped.
    assert type(_client.current()).__name__ == "Client"
    result = add.delay_sync(1, 2)
    msg = asyncio.run(last_message(nats.url, "dbtask.tasks.math"))
    assert msg.headers["Dbtask-Id"] == result.id
    assert "traceparent" not in msg.headers and "tracestate" not in msg.headers


def test_a_trace_header_that_cannot_travel_is_refused(client):
    from dbtask import _client

    native = _client.current()
    with pytest.raises(ValueError, match="traceparent"):
        native.publish_sync("math", "t.add", (1, 2), None, None, trace=("00-bad\nvalue", None))
