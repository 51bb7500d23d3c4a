"""OpenTelemetry tracing (docs/tracing.md): W3C trace context in the task messages' headers,
a ``send`` span around each publish and a ``process`` span around each run.

On when ``opentelemetry-api`` is installed (``pip install dbtask[otel]``) and a tracer
provider is set (the SDK configured: ``trace.set_tracer_provider(...)``) at the moment it is
decided, once: the client's ``init``, and the worker's start-up after it imported the task
modules. ``DBTASK_OTEL=on`` turns it on without a provider check, ``DBTASK_OTEL=off`` off.
Off, nothing of this module runs per message: ``init`` keeps the compiled client itself (no
wrapper), and the worker calls task functions directly.

Client side, ``init`` wraps the client in :class:`TracedClient`, whose publishing methods open
a PRODUCER span ``send <subject>`` and hand its context (``traceparent``, ``tracestate``) to
the compiled client, which puts it in the message headers. Worker side, ``traced(task)`` of
``dbtask._worker`` runs each task inside :func:`process_span`'s wrapper: a CONSUMER span
``process <subject>`` whose parent is the message's context, with the messaging semantic
conventions' attributes; an exception is recorded on it with status ERROR. The worker is told
the span's context, and the retries and workflow steps it publishes after the task carry it,
so a chain is one trace: ``send`` -> first step -> second step...

Only the W3C Trace Context headers travel (``TraceContextTextMapPropagator``), whatever
propagators the application configured; baggage does not.

Pure Python, importable without the compiled module or OpenTelemetry.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Any, Callable, Optional

__all__ = ["api", "enabled", "TracedClient", "traced_client", "process_span", "SUBJECT_PREFIX"]

#: The subject prefix of a queue's task messages (``protocol::TASK_SUBJECT_PREFIX``): the
#: destination of the spans.
SUBJECT_PREFIX = "dbtask.tasks."

_OFF = ("0", "off", "false", "no")
_ON = ("1", "on", "true", "yes")
_loaded: Optional[SimpleNamespace] = None
_tried = False


def api() -> Optional[SimpleNamespace]:
    """The OpenTelemetry API pieces dbtask uses, or None when it is not installed or
    ``DBTASK_OTEL`` turns it off. Imported on the first call only."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if os.environ.get("DBTASK_OTEL", "").strip().lower() in _OFF:
        return None
    try:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    try:
        from importlib.metadata import version

        ours = version("dbtask")
    except Exception:
        ours = None
    _loaded = SimpleNamespace(
        context=context,
        trace=trace,
        SpanKind=SpanKind,
        Status=Status,
        StatusCode=StatusCode,
        propagator=TraceContextTextMapPropagator(),
        version=ours,
    )
    return _loaded


def enabled() -> Optional[SimpleNamespace]:
    """The API (see :func:`api`) when tracing is on now: importable, and a tracer provider
    set (or ``DBTASK_OTEL=on``). Callers ask once and keep the answer."""
    otel = api()
    if otel is None:
        return None
    if os.environ.get("DBTASK_OTEL", "").strip().lower() in _ON:
        return otel
    provider = otel.trace.get_tracer_provider()
    if isinstance(provider, (otel.trace.ProxyTracerProvider, otel.trace.NoOpTracerProvider)):
        return None
    return otel


def _tracer(otel: SimpleNamespace) -> Any:
    # Asked for at each span (cheap): a tracer provider set after init must be used.
    return otel.trace.get_tracer("dbtask", otel.version)


def _carrier(otel: SimpleNamespace, span: Any) -> Optional[tuple[str, Optional[str]]]:
    """``(traceparent, tracestate)`` of ``span``, or None when it has no valid context."""
    carrier: dict[str, str] = {}
    otel.propagator.inject(carrier, context=otel.trace.set_span_in_context(span))
    parent = carrier.get("traceparent")
    if not parent:
        return None
    return parent, carrier.get("tracestate") or None


# -- client --------------------------------------------------------------------------------


class TracedClient:
    """The compiled client with a PRODUCER span around each publish, whose context travels in
    the message headers. Everything else is the compiled client's (attribute lookups go
    through)."""

    __slots__ = ("_inner", "_otel")

    def __init__(self, inner: Any, otel: SimpleNamespace) -> None:
        self._inner = inner
        self._otel = otel

    def __getattr__(self, name: str) -> Any:
        if name in TracedClient.__slots__:  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"<TracedClient {self._inner!r}>"

    @property
    def untraced(self) -> Any:
        """The compiled client itself."""
        return self._inner

    def _span(self, queue: str | None, task: str | None) -> Any:
        otel = self._otel
        destination = SUBJECT_PREFIX + queue if queue else "dbtask.workflow"
        attributes: dict[str, Any] = {
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": destination,
        }
        if task:
            attributes["dbtask.task.name"] = task
        return _tracer(otel).start_as_current_span(
            f"send {destination}", kind=otel.SpanKind.PRODUCER, attributes=attributes
        )

    def publish(self, queue: str, task: str, args: Any, kwargs: Any = None, options: Any = None, wrap: Any = None) -> Any:
        with self._span(queue, task) as span:
            return self._inner.publish(queue, task, args, kwargs, options, wrap, trace=_carrier(self._otel, span))

    def publish_sync(self, queue: str, task: str, args: Any, kwargs: Any = None, options: Any = None) -> str:
        with self._span(queue, task) as span:
            task_id: str = self._inner.publish_sync(queue, task, args, kwargs, options, trace=_carrier(self._otel, span))
            span.set_attribute("messaging.message.id", task_id)
            span.set_attribute("dbtask.task.id", task_id)
            return task_id

    async def publish_many(self, queue: str, task: str, calls: Any, eta: Any = None, expires: Any = None, priority: Any = None) -> Any:
        with self._span(queue, task) as span:
            span.set_attribute("messaging.batch.message_count", len(calls))
            return await self._inner.publish_many(queue, task, calls, eta, expires, priority, trace=_carrier(self._otel, span))

    def publish_many_sync(self, queue: str, task: str, calls: Any, eta: Any = None, expires: Any = None, priority: Any = None) -> Any:
        with self._span(queue, task) as span:
            span.set_attribute("messaging.batch.message_count", len(calls))
            return self._inner.publish_many_sync(queue, task, calls, eta, expires, priority, trace=_carrier(self._otel, span))

    async def publish_workflow(self, signature: str, group_ttl: float) -> Any:
        with self._span(None, None) as span:
            return await self._inner.publish_workflow(signature, group_ttl, trace=_carrier(self._otel, span))

    def publish_workflow_sync(self, signature: str, group_ttl: float) -> Any:
        with self._span(None, None) as span:
            return self._inner.publish_workflow_sync(signature, group_ttl, trace=_carrier(self._otel, span))


def traced_client(client: Any) -> Any:
    """``client`` wrapped in :class:`TracedClient` when OpenTelemetry is on, else itself."""
    otel = enabled()
    return client if otel is None else TracedClient(client, otel)


# -- worker ----------------------------------------------------------------------------------


class _Process:
    """One run's span: started with the message's context as parent, made current, told to
    the worker, ended with the outcome."""

    __slots__ = ("otel", "span", "token")

    def __init__(self, otel: SimpleNamespace, task: Any) -> None:
        from . import _context

        me = _context.current_task()
        request = me.request if me is not None else None
        parent = None
        if request is not None and request.traceparent:
            carrier = {"traceparent": request.traceparent}
            if request.tracestate:
                carrier["tracestate"] = request.tracestate
            parent = otel.propagator.extract(carrier)
        queue = request.queue if request is not None and request.queue else task.queue
        destination = SUBJECT_PREFIX + queue
        attributes: dict[str, Any] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": destination,
            "dbtask.task.name": task.name,
        }
        if request is not None:
            attributes["messaging.message.id"] = request.id
            attributes["dbtask.task.id"] = request.id
            attributes["dbtask.task.retries"] = request.retries
            attributes["dbtask.task.attempt"] = request.attempt
            if request.parent_id is not None:
                attributes["dbtask.task.parent_id"] = request.parent_id
            if request.root_id is not None:
                attributes["dbtask.task.root_id"] = request.root_id
        self.otel = otel
        self.span = _tracer(otel).start_span(
            f"process {destination}", context=parent, kind=otel.SpanKind.CONSUMER, attributes=attributes
        )
        self.token = otel.context.attach(otel.trace.set_span_in_context(self.span))
        writer = _context.span_writer
        if writer is not None and request is not None and request.id:
            made = _carrier(otel, self.span)
            if made is not None:
                writer(request.id, made[0], made[1])

    def failed(self, task: Any, exc: BaseException) -> None:
        from . import _context, _trace

        span = self.span
        me = _context.current_task()
        retries = me.request.retries if me is not None else 0
        span.set_attribute("dbtask.task.state", "RETRY" if _trace.will_retry(task, retries, exc) else "FAILURE")
        span.record_exception(exc)
        span.set_status(self.otel.Status(self.otel.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def end(self) -> None:
        try:
            self.otel.context.detach(self.token)
        finally:
            self.span.end()


def process_span(task: Any, run: Callable[..., Any]) -> Callable[..., Any]:
    """``run`` (the function the worker calls for ``task``) inside a ``process`` span."""
    otel = api()
    if otel is None:
        return run

    if not task.is_async:

        @functools.wraps(run)
        def in_span(*args: Any, **kwargs: Any) -> Any:
            p = _Process(otel, task)
            try:
                result = run(*args, **kwargs)
                p.span.set_attribute("dbtask.task.state", "SUCCESS")
                return result
            except BaseException as exc:
                p.failed(task, exc)
                raise
            finally:
                p.end()

        return in_span

    @functools.wraps(run)
    async def in_span_async(*args: Any, **kwargs: Any) -> Any:
        p = _Process(otel, task)
        try:
            result = await run(*args, **kwargs)
            p.span.set_attribute("dbtask.task.state", "SUCCESS")
            return result
        except BaseException as exc:
            p.failed(task, exc)
            raise
        finally:
            p.end()

    return in_span_async
