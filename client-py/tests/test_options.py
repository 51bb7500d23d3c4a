"""The task options contract (``dbtask._options``): which names each call takes, and the checks
of their values. Unit tests: no server, no compiled module; every refusal happens before
anything is sent."""

from __future__ import annotations

import asyncio
import inspect
import math
from datetime import datetime, timedelta, timezone

import pytest

import dbtask
from dbtask import Chain, Chord, Group, Signature, _options
from dbtask._registry import TASKS

from conftest import add

# The options a task stored before they became a contract, each with a valid value: every
# @task(...) of this repository (tests/apps, examples, bench, README) uses only these.
EVERY_TASK_OPTION = {
    "name": "opts.every",
    "queue": "opts",
    "max_retries": 2,
    "retry_delay": 0.5,
    "retry_backoff": True,
    "retry_backoff_max": 30,
    "retry_jitter": False,
    "autoretry_for": (ConnectionError, TimeoutError),
    "bind": True,
    "track_started": True,
    "time_limit": 60,
    "soft_time_limit": 50,
    "rate_limit": "100/s",
    "priority": 0,
    "ignore_result": True,
    "store_errors_even_if_ignored": False,
    "result_ttl": 3600,
    "base": dbtask.Task,
}


def valid_list(valid: frozenset[str]) -> str:
    return ", ".join(sorted(valid))


# -- names -----------------------------------------------------------------------------------


def test_the_option_sets():
    # What the worker reads from Task.options (worker/src/python/registry.rs and retry.rs),
    # plus priority, which the client reads.
    assert _options.STORED_OPTIONS == {
        "max_retries", "retry_delay", "retry_backoff", "retry_backoff_max", "retry_jitter",
        "autoretry_for", "bind", "track_started", "time_limit", "soft_time_limit", "rate_limit",
        "priority", "ignore_result", "store_errors_even_if_ignored", "result_ttl",
    }  # fmt: skip
    assert _options.TASK_OPTIONS == _options.STORED_OPTIONS | {"name", "queue", "base"}
    assert set(EVERY_TASK_OPTION) == _options.TASK_OPTIONS


def keyword_names(fn) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}


def test_each_call_takes_the_names_of_its_set():
    assert keyword_names(dbtask.Task.apply_async) == _options.APPLY_OPTIONS
    assert keyword_names(dbtask.Task.apply_async_sync) == _options.APPLY_OPTIONS
    many = _options.MANY_OPTIONS | {"args_list", "kwargs_list"}
    assert keyword_names(dbtask.Task.apply_many) == many
    assert keyword_names(dbtask.Task.apply_many_sync) == many
    assert keyword_names(Signature.set) == _options.SIGNATURE_OPTIONS
    assert keyword_names(Signature.apply_async) == _options.SIGNATURE_APPLY_OPTIONS
    assert keyword_names(Signature.apply_async_sync) == _options.SIGNATURE_APPLY_OPTIONS


def test_an_unknown_decorator_option_is_a_type_error_naming_the_valid_ones():
    before = dict(TASKS)
    with pytest.raises(TypeError) as info:

        @dbtask.task(bogus=1)
        def never() -> None: ...

    assert str(info.value) == (
        f"task() got an unknown option 'bogus'; valid options: {valid_list(_options.TASK_OPTIONS)}"
    )
    assert TASKS == before, "nothing is registered"
    with pytest.raises(TypeError, match="unknown option 'bogus'"):
        dbtask.task(name="opts.never", bogus=1)


def test_celery_options_with_no_meaning_here_are_refused():
    with pytest.raises(TypeError, match=r"^task\(\) got unknown options 'acks_late', 'serializer'; valid options: autoretry_for, base, bind, "):
        dbtask.task(serializer="json", acks_late=True)
    for option in ("serializer", "default_retry_delay", "reject_on_worker_lost", "shared"):
        with pytest.raises(TypeError, match=f"unknown option '{option}'"):
            dbtask.task(**{option: True})


def test_a_near_miss_gets_a_suggestion():
    with pytest.raises(TypeError, match=r"unknown option 'max_retry' \(did you mean 'max_retries'\?\)"):
        dbtask.task(max_retry=3)
    with pytest.raises(TypeError, match=r"unknown option 'ratelimit' \(did you mean 'rate_limit'\?\)"):
        dbtask.task(ratelimit="1/s")


def test_a_task_built_directly_checks_its_options_too():
    with pytest.raises(TypeError, match=r"^Task\(\) got an unknown option 'acks_late'"):
        dbtask.Task(lambda: None, name="opts.direct", options={"acks_late": True})


def test_every_option_in_use_is_accepted_and_stored_for_the_worker():
    @dbtask.task(**EVERY_TASK_OPTION)
    def every() -> None: ...

    assert TASKS["opts.every"] is every and every.queue == "opts"
    stored = {k: v for k, v in EVERY_TASK_OPTION.items() if k not in ("name", "queue", "base")}
    assert every.options == stored
    assert isinstance(every.options, dict)


def test_options_left_unset_are_not_stored():
    @dbtask.task(name="opts.unset", max_retries=None, rate_limit=None, priority=None, bind=None)
    def unset() -> None: ...

    assert unset.options == {}

    @dbtask.task
    def bare() -> None: ...

    assert bare.options == {} and bare.queue == "default"


def test_an_unknown_apply_option_is_a_type_error_naming_the_valid_ones():
    # Checked before the client is needed: no init in this module.
    expected = f"apply_async() got an unknown option 'routing_key'; valid options: {valid_list(_options.APPLY_OPTIONS)}"
    with pytest.raises(TypeError) as info:
        add.apply_async(1, 2, routing_key="x")
    assert str(info.value) == expected
    with pytest.raises(TypeError, match=r"^apply_async_sync\(\) got an unknown option 'retry'"):
        add.apply_async_sync(1, 2, retry=False)
    with pytest.raises(TypeError, match=r"unknown option 'coutndown' \(did you mean 'countdown'\?\)"):
        add.apply_async(1, 2, coutndown=5)
    with pytest.raises(TypeError, match=r"^apply_many_sync\(\) got an unknown option 'task_id'; valid options: countdown, eta, expires, priority, queue$"):
        add.apply_many_sync([(1, 2)], task_id="x")
    with pytest.raises(TypeError, match=r"^apply_many\(\) got an unknown option 'headers'"):
        asyncio.run(add.apply_many([(1, 2)], headers={}))


def test_an_unknown_signature_option_is_a_type_error_naming_the_valid_ones():
    valid = valid_list(_options.SIGNATURE_OPTIONS)
    with pytest.raises(TypeError) as info:
        add.s(1).set(bogus=1)
    assert str(info.value) == f"set() got an unknown signature option 'bogus'; valid signature options: {valid}"
    with pytest.raises(TypeError, match=r"^Signature\(\) got an unknown signature option 'bogus'"):
        Signature("t.add", (1,), {}, {"bogus": 1})
    with pytest.raises(TypeError, match="unknown signature option 'bogus'"):
        Signature.from_dict({"task": "t.add", "options": {"bogus": 1}})
    with pytest.raises(TypeError, match=r"^Chain\(\) got an unknown signature option 'expires'"):
        Chain([add.s(1)], expires=10)
    with pytest.raises(TypeError, match=r"^Group\(\) got an unknown signature option"):
        Group([add.s(1)], link=add.s())
    with pytest.raises(TypeError, match=r"^Chord\(\) got an unknown signature option"):
        Chord([add.s(1)], add.s(), eta=datetime.now())
    for workflow in (Chain([add.s(1)]), Group([add.s(1)]), Chord([add.s(1)], add.s()), Chain([])):
        with pytest.raises(TypeError, match=r"^set\(\) got an unknown signature option 'bogus'"):
            workflow.set(bogus=1)
    with pytest.raises(TypeError, match=r"^apply_async_sync\(\) got an unknown option 'eta'; valid options: args, countdown, kwargs, link, link_error, priority, queue, task_id$"):
        add.s(1).apply_async_sync(eta=datetime.now())
    with pytest.raises(TypeError, match=r"^apply_async\(\) got an unknown option 'expires'"):
        asyncio.run(add.s(1).apply_async(expires=10))


def test_workflow_options_reach_every_task():
    chord = Chord([add.s(1), add.s(2)], add.s(), task_id="c")
    chord.set(queue="q2", priority=7, task_id="c2")
    assert [m.options for m in chord.members] == [{"queue": "q2", "priority": 7}] * 2
    assert chord.body.options == {"queue": "q2", "priority": 7, "task_id": "c2"}
    chain = Chain([add.s(1), add.si(2)]).set(countdown=1, task_id="last")
    assert chain.steps[0].options == {"queue": "math", "countdown": 1.0}
    assert chain.steps[1].options == {"queue": "math", "immutable": True, "countdown": 1.0, "task_id": "last"}
    assert add.si(1).set(immutable=False).options == {"queue": "math"}


# -- priority --------------------------------------------------------------------------------


def test_priority_is_0_to_9_everywhere():
    assert _options.MAX_PRIORITY == 9 and _options.DEFAULT_PRIORITY == 5
    for good in (0, 5, 9):
        assert _options.check_priority(good) == good
        assert add.s(1).set(priority=good).options["priority"] == good
        assert dbtask.task(name=f"opts.p{good}", priority=good)(lambda: None).options == {"priority": good}
    for bad in (-1, 10, 255, 2.5, "9", True):
        with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
            dbtask.task(priority=bad)
        with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
            add.s(1).set(priority=bad)
        with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
            Signature.from_dict({"task": "t.add", "options": {"priority": bad}})
        with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
            add.apply_async(1, 2, priority=bad)  # before the client is needed
        with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
            add.apply_many_sync([(1, 2)], priority=bad)


# -- values ----------------------------------------------------------------------------------


def test_bad_values_are_refused_at_decoration():
    cases = [
        (ValueError, "invalid queue name", {"queue": "a.b"}),
        (ValueError, "invalid task name", {"name": "has space"}),
        (ValueError, "max_retries must be an int >= 0", {"max_retries": -1}),
        (ValueError, "max_retries must be an int >= 0", {"max_retries": 2**32}),
        (ValueError, "max_retries must be an int >= 0", {"max_retries": True}),
        (ValueError, "retry_delay must be >= 0", {"retry_delay": -1}),
        (TypeError, "retry_delay must be a number of seconds", {"retry_delay": "1"}),
        (ValueError, "retry_backoff_max must be a finite number", {"retry_backoff_max": math.inf}),
        (ValueError, "retry_backoff must be True, False or a factor", {"retry_backoff": -2}),
        (TypeError, "autoretry_for must hold exception types", {"autoretry_for": (ValueError, "x")}),
        (TypeError, "autoretry_for must hold exception types", {"autoretry_for": int}),
        (ValueError, "time_limit must be a positive number", {"time_limit": 0}),
        (TypeError, "soft_time_limit must be a number of seconds", {"soft_time_limit": "5"}),
        (ValueError, "soft_time_limit must be a finite number", {"soft_time_limit": math.nan}),
        (ValueError, "invalid rate_limit", {"rate_limit": "10/d"}),
        (ValueError, "invalid rate_limit", {"rate_limit": 0}),
        (TypeError, "bind must be True or False", {"bind": 1}),
        (TypeError, "track_started must be True or False", {"track_started": "yes"}),
        (TypeError, "retry_jitter must be True or False", {"retry_jitter": 0}),
    ]
    for error, message, options in cases:
        with pytest.raises(error, match=message):
            dbtask.task(**options)


def test_rate_limits_are_stored_in_their_text_form():
    assert _options.check_rate_limit(100) == "100/s"
    assert _options.check_rate_limit(" 10 / m ") == "10 / m"
    for good in ("1/s", "5/sec", "5/second", "10/m", "10/min", "10/minute", "1000/h", "2/hour", "7"):
        assert _options.check_rate_limit(good) == good
    for bad in ("", "0/s", "ten/s", "10/d", "1.5/s", "-3/m", "٣/s", 1.5, True, None):
        with pytest.raises(ValueError, match="invalid rate_limit"):
            _options.check_rate_limit(bad)


def test_countdown_eta_and_expires_become_unix_seconds():
    before = datetime.now(timezone.utc).timestamp()
    eta, expires = _options.schedule(10, None, 60)
    assert eta is not None and expires is not None
    assert before + 10 <= eta < before + 12 and before + 60 <= expires < before + 62
    naive = datetime(2030, 1, 2, 3, 4, 5)  # naive means UTC, as in Celery
    aware = datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    assert _options.schedule(None, naive, aware) == (naive.replace(tzinfo=timezone.utc).timestamp(), aware.timestamp())
    assert _options.schedule(None, None, None) == (None, None)
    with pytest.raises(ValueError, match="give countdown or eta, not both"):
        _options.schedule(1, naive, None)
    with pytest.raises(TypeError, match="eta must be a datetime"):
        _options.schedule(None, 1_900_000_000, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="countdown must be a number of seconds, not bool"):
        _options.schedule(True, None, None)
    with pytest.raises(ValueError, match="expires must be a finite number of seconds"):
        _options.schedule(None, None, math.inf)
    with pytest.raises(ValueError, match="link/link_error work with countdown, not eta or expires"):
        add.apply_async(1, 2, link=add.s(), expires=10)


def test_a_countdown_past_the_year_9999_is_a_value_error():
    # NATS schedules a task at an RFC 3339 time: four-digit years only.
    for call in (
        lambda: _options.schedule(1e20, None, None),
        lambda: add.s(1, 2).set(countdown=1e20),
        lambda: dbtask.Retry(countdown=1e20),
    ):
        with pytest.raises(ValueError, match=r"countdown=1e\+20 seconds ends after the year 9999"):
            call()
    eta, _ = _options.schedule(10 * 365 * 86400, None, None)  # ten years is fine
    assert eta is not None and eta < _options.MAX_ETA


def test_retry_checks_its_countdown_like_the_options():
    assert dbtask.Retry(countdown=2).countdown == 2.0
    with pytest.raises(ValueError, match="countdown must be a number of seconds >= 0"):
        dbtask.Retry(countdown=-1)
    with pytest.raises(TypeError, match="countdown must be a number of seconds, not str"):
        dbtask.Retry(countdown="5")  # type: ignore[arg-type]
