"""The task API's pure-Python parts (issue 19), without a server: the new options and their
checks, `base=` classes, signals, the traced run's order and its retry rule, and the log
writer that stands in for ``sys.stdout`` in a worker."""

from __future__ import annotations

import asyncio
import logging

import pytest

import dbtask
from dbtask import _logs, _trace, signals
from dbtask._registry import TASKS


def test_result_options_are_checked_at_decoration() -> None:
    @dbtask.task(name="api.quiet", ignore_result=True, store_errors_even_if_ignored=False, result_ttl=60)
    def quiet() -> None: ...

    assert quiet.options == {"ignore_result": True, "store_errors_even_if_ignored": False, "result_ttl": 60}
    for bad in (0, -1, 1.5, True, 2**32):
        with pytest.raises(ValueError, match="result_ttl"):
            dbtask.task(name="api.bad_ttl", result_ttl=bad)
    with pytest.raises(TypeError, match="ignore_result must be True or False"):
        dbtask.task(name="api.bad_ignore", ignore_result="yes")
    assert "api.bad_ttl" not in TASKS


def test_base_must_be_a_task_class_and_async_functions_get_an_async_one() -> None:
    class Mine(dbtask.Task):
        def on_success(self, retval, task_id, args, kwargs):
            pass

    @dbtask.task(name="api.sync_base", base=Mine)
    def s() -> int:
        return 1

    @dbtask.task(name="api.async_base", base=Mine)
    async def a() -> int:
        return 1

    assert type(s) is Mine and isinstance(a, Mine) and isinstance(a, dbtask.AsyncTask)
    assert _trace.has_hooks(s) and _trace.has_hooks(a)

    @dbtask.task(name="api.no_base")
    def plain() -> int:
        return 1

    assert not _trace.has_hooks(plain), "a plain task is called directly by the worker"
    with pytest.raises(TypeError, match="subclass of dbtask.Task"):
        dbtask.task(base=dict)
    with pytest.raises(TypeError, match="unknown option 'bass'"):
        dbtask.task(bass=Mine)


def test_signals_connect_once_filter_by_sender_and_survive_a_raising_receiver(caplog) -> None:
    sig = signals.Signal("api_test")
    calls = []

    @sig.connect
    def first(sender=None, **kwargs):
        calls.append(("first", sender, kwargs["x"]))
        raise RuntimeError("first fails")

    @sig.connect(sender="only-me")
    def second(sender=None, **kwargs):
        calls.append(("second", sender, kwargs["x"]))

    sig.connect(first)  # twice: kept once
    with caplog.at_level(logging.ERROR, logger="dbtask.signals"):
        answers = sig.send(sender="someone", x=1)
        sig.send(sender="only-me", x=2)
    assert calls == [("first", "someone", 1), ("first", "only-me", 2), ("second", "only-me", 2)]
    assert isinstance(answers[0][1], RuntimeError)
    assert "receiver" in caplog.text and "first fails" in caplog.text
    assert sig.disconnect(first) and not sig.disconnect(first)
    with pytest.raises(TypeError, match="callable"):
        sig.connect(42)


def test_the_worker_hears_when_task_signals_come_and_go() -> None:
    heard = []
    signals.on_change = lambda task_signals, revoked: heard.append((task_signals, revoked))
    try:
        receiver = signals.task_postrun.connect(lambda **kw: None)
        signals.task_revoked.connect(receiver)
        signals.task_postrun.disconnect(receiver)
        signals.task_revoked.disconnect(receiver)
    finally:
        signals.on_change = None
    assert heard == [(True, False), (True, True), (False, True), (False, False)]


def test_will_retry_follows_the_workers_rule() -> None:
    @dbtask.task(name="api.retrying", max_retries=2, autoretry_for=(KeyError,))
    def retrying() -> None: ...

    assert _trace.will_retry(retrying, 0, dbtask.Retry())
    assert _trace.will_retry(retrying, 1, KeyError())
    assert not _trace.will_retry(retrying, 2, KeyError()), "no retry left"
    assert not _trace.will_retry(retrying, 0, ValueError()), "not an autoretry type"
    assert not _trace.will_retry(retrying, 1, dbtask.Retry(max_retries=1)), "the Retry's own limit"


def test_the_traced_run_calls_hooks_in_order_and_keeps_the_outcome(caplog) -> None:
    order = []

    class Loud(dbtask.Task):
        def before_start(self, task_id, args, kwargs):
            order.append(("before_start", args))

        def on_success(self, retval, task_id, args, kwargs):
            order.append(("on_success", retval))
            raise RuntimeError("hook fails")

        def on_failure(self, exc, task_id, args, kwargs, einfo):
            order.append(("on_failure", type(exc).__name__, "ZeroDivisionError" in einfo.traceback))

        def after_return(self, status, retval, task_id, args, kwargs, einfo):
            order.append(("after_return", status))

    @dbtask.task(name="api.divide", base=Loud)
    def divide(x, y):
        return x / y

    run = _trace.traced(divide)
    with caplog.at_level(logging.ERROR, logger="dbtask.hooks"):
        assert run(6, 3) == 2
    with pytest.raises(ZeroDivisionError):
        run(1, 0)
    assert order == [
        ("before_start", (6, 3)),
        ("on_success", 2),
        ("after_return", "SUCCESS"),
        ("before_start", (1, 0)),
        ("on_failure", "ZeroDivisionError", True),
        ("after_return", "FAILURE"),
    ]
    assert "api.divide.on_success raised" in caplog.text


def test_async_hooks_are_awaited() -> None:
    order = []

    class Awaiting(dbtask.Task):
        async def on_success(self, retval, task_id, args, kwargs):
            await asyncio.sleep(0)
            order.append(retval)

    @dbtask.task(name="api.async_hooked", base=Awaiting)
    async def double(x):
        return 2 * x

    assert asyncio.run(_trace.traced(double)(21)) == 42
    assert order == [42]


def test_update_state_and_current_task_outside_a_worker() -> None:
    assert dbtask.current_task() is None

    @dbtask.task(name="api.bound", bind=True)
    def bound(self):
        self.update_state(state="PROGRESS", meta={})

    with pytest.raises(RuntimeError, match="inside a task run by dbtask-worker"):
        bound()


def test_printed_lines_become_one_event_each() -> None:
    lines = []
    writer = _logs.LineWriter(lambda *event: lines.append(event), "stdout")
    print("one\ntwo", file=writer)
    print("thr", end="", file=writer)
    assert [e[2] for e in lines] == ["one", "two"]
    writer.flush()
    assert [(e[0], e[1], e[2], e[5]) for e in lines][-1] == (logging.INFO, "stdout", "thr", "stdout")
    with pytest.raises(TypeError):
        writer.write(b"bytes")  # type: ignore[arg-type]
