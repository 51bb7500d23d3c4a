"""Tasks for the tracing test (test_otel.py, docs/tracing.md). At import, when
`DBTASK_TEST_SPANS` names a file, the OpenTelemetry SDK is configured with an exporter that
appends each finished span to it as one JSON line: the worker (which imports this module with
`-A otel_tasks`) and the test's client process (`python otel_tasks.py NATS_URL REDIS_URL`)
write their spans to the same file, where the test reads one trace across both."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import dbtask
from dbtask import task


class JsonLinesExporter(SpanExporter):
    """Each finished span as one JSON line of `path` (appended: several processes share it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a", encoding="utf-8") as f:
            for s in spans:
                f.write(json.dumps(as_dict(s)) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def as_dict(s: ReadableSpan) -> dict[str, Any]:
    return {
        "name": s.name,
        "service": s.resource.attributes.get("service.name"),
        "kind": s.kind.name,
        "trace_id": format(s.context.trace_id, "032x"),
        "span_id": format(s.context.span_id, "016x"),
        "parent": format(s.parent.span_id, "016x") if s.parent else None,
        "status": s.status.status_code.name,
        "attributes": dict(s.attributes or {}),
        "events": [e.name for e in s.events],
    }


def configure(path: str, service: str) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)


SPANS = os.environ.get("DBTASK_TEST_SPANS")
if SPANS and __name__ != "__main__":
    configure(SPANS, "worker")


@task(name="otel.add")
def add(x: int, y: int) -> int:
    return x + y


@task(name="otel.double")
async def double(x: int) -> int:
    return 2 * x


@task(name="otel.fail")
def fail(why: str) -> None:
    raise ValueError(why)


def client(nats_url: str, redis_url: str) -> None:
    """The test's client: a span of its own around a chain of three and a failing task."""
    assert SPANS
    configure(SPANS, "client")
    dbtask.init_sync(nats_url=nats_url, redis_url=redis_url)
    with trace.get_tracer("test").start_as_current_span("request"):
        chain = (add.s(1, 2) | double.s() | add.s(10)).apply_async_sync()
        failing = fail.delay_sync("on purpose")
    result = chain.get_sync(timeout=30)
    try:
        failing.get_sync(timeout=30)
    except ValueError:
        pass
    dbtask.close_sync()
    print(json.dumps({"result": result, "failing": failing.id, "last": chain.id}))


if __name__ == "__main__":
    client(sys.argv[1], sys.argv[2])
