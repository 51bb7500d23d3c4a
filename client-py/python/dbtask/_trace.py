"""A task's run with its class hooks and the task signals around it, as Celery orders them.

The worker calls a task's function directly. When the task's class overrides a hook
(``before_start``, ``on_success``, ``on_failure``, ``on_retry``, ``after_return``) or a task
signal has a receiver, it calls the wrapper :func:`traced` makes instead, which runs, in
order: ``task_prerun``, ``before_start``, the function, then ``on_success`` + ``task_success``,
or ``on_retry`` + ``task_retry``, or ``on_failure`` + ``task_failure``, then ``after_return``
and ``task_postrun``. All of it runs before the worker stores the outcome, on the thread (or
the event loop, where ``async def`` hooks are awaited) that runs the task, within its time
limits. A hook or receiver that raises is logged with its traceback; the task's outcome (its
return value or its exception) is the function's, whatever the hooks do.

Pure Python, importable without the compiled module.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
from typing import Any, Callable

from . import _context, signals
from ._retry import Retry

__all__ = ["ExceptionInfo", "HOOKS", "has_hooks", "traced"]

_log = logging.getLogger("dbtask.hooks")

#: The hook methods of a task class.
HOOKS = ("before_start", "on_success", "on_failure", "on_retry", "after_return")

# The worker's default (worker/src/retry: DEFAULT_MAX_RETRIES).
_DEFAULT_MAX_RETRIES = 3


class ExceptionInfo:
    """What Celery passes as ``einfo``: the exception, its type, traceback object and text."""

    __slots__ = ("exception", "type", "tb", "traceback")

    def __init__(self, exc: BaseException) -> None:
        self.exception = exc
        self.type = type(exc)
        self.tb = exc.__traceback__
        self.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    def __str__(self) -> str:
        return self.traceback

    def __repr__(self) -> str:
        return f"<ExceptionInfo {self.type.__name__}: {self.exception}>"


def has_hooks(task: Any) -> bool:
    """Whether the task's class overrides any hook of :class:`dbtask.Task`."""
    from ._task import Task

    cls = type(task)
    return any(getattr(cls, name, None) is not getattr(Task, name) for name in HOOKS)


def will_retry(task: Any, retries: int, exc: BaseException) -> bool:
    """Whether the worker retries a run that raised ``exc`` after ``retries`` retries: an
    explicit :class:`Retry` or an ``autoretry_for`` match, with a retry left. The same rule
    as the worker's ``retry::decide`` (``retries < max_retries``)."""
    if isinstance(exc, Retry):
        limit = exc.max_retries
    else:
        kinds = task.options.get("autoretry_for")
        if not kinds or not isinstance(exc, tuple(kinds) if isinstance(kinds, (list, tuple)) else kinds):
            return False
        limit = None
    if limit is None:
        limit = task.options.get("max_retries", _DEFAULT_MAX_RETRIES)
    return retries < limit


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception:
        _log.error("%s raised; the task's outcome is unchanged", what, exc_info=True)
        return None


async def _await(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            await value
    except Exception:
        _log.error("%s raised; the task's outcome is unchanged", what, exc_info=True)


def _send(signal: signals.Signal, **named: Any) -> None:
    if signal.receivers:
        signal.send(**named)


class _Run:
    """One run's names for its hooks and signals."""

    __slots__ = ("task", "me", "id", "args", "kwargs")

    def __init__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        me = _context.current_task()
        self.task = task
        self.me = me
        self.id = me.request.id if me is not None else None
        # A bound task's `self` is not one of its arguments.
        self.args = args[1:] if task.options.get("bind") else args
        self.kwargs = kwargs

    def state_of(self, exc: BaseException) -> str:
        retries = self.me.request.retries if self.me is not None else 0
        return "RETRY" if will_retry(self.task, retries, exc) else "FAILURE"

    def prerun(self) -> None:
        _send(signals.task_prerun, sender=self.task, task_id=self.id, task=self.task, args=self.args, kwargs=self.kwargs)

    def signals_after(self, state: str, retval: Any, einfo: ExceptionInfo | None) -> None:
        t = self.task
        if state == "SUCCESS":
            _send(signals.task_success, sender=t, result=retval)
        elif state == "RETRY":
            request = self.me.request if self.me is not None else None
            _send(signals.task_retry, sender=t, request=request, reason=retval, einfo=einfo)
        else:
            _send(
                signals.task_failure,
                sender=t,
                task_id=self.id,
                exception=retval,
                args=self.args,
                kwargs=self.kwargs,
                traceback=retval.__traceback__,
                einfo=einfo,
            )

    def postrun(self, state: str, retval: Any) -> None:
        _send(
            signals.task_postrun,
            sender=self.task,
            task_id=self.id,
            task=self.task,
            args=self.args,
            kwargs=self.kwargs,
            retval=retval,
            state=state,
        )

    def outcome_hook(self, state: str, retval: Any, einfo: ExceptionInfo | None) -> tuple[str, Callable[..., Any], tuple[Any, ...]]:
        t = self.task
        if state == "SUCCESS":
            return "on_success", t.on_success, (retval, self.id, self.args, self.kwargs)
        hook = t.on_retry if state == "RETRY" else t.on_failure
        return hook.__name__, hook, (retval, self.id, self.args, self.kwargs, einfo)


def traced(task: Any) -> Callable[..., Any]:
    """The function the worker calls instead of ``task.fn`` when hooks or task signals are
    in use: ``def`` for a sync task, ``async def`` for an async one."""
    fn = task.fn
    name = task.name

    if not task.is_async:

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            r = _Run(task, args, kwargs)
            r.prerun()
            _call(f"{name}.before_start", task.before_start, r.id, r.args, r.kwargs)
            try:
                retval = fn(*args, **kwargs)
            except BaseException as exc:
                state, einfo = r.state_of(exc), ExceptionInfo(exc)
                what, hook, hook_args = r.outcome_hook(state, exc, einfo)
                _call(f"{name}.{what}", hook, *hook_args)
                r.signals_after(state, exc, einfo)
                _call(f"{name}.after_return", task.after_return, state, exc, r.id, r.args, r.kwargs, einfo)
                r.postrun(state, exc)
                raise
            what, hook, hook_args = r.outcome_hook("SUCCESS", retval, None)
            _call(f"{name}.{what}", hook, *hook_args)
            r.signals_after("SUCCESS", retval, None)
            _call(f"{name}.after_return", task.after_return, "SUCCESS", retval, r.id, r.args, r.kwargs, None)
            r.postrun("SUCCESS", retval)
            return retval

        return run

    @functools.wraps(fn)
    async def run_async(*args: Any, **kwargs: Any) -> Any:
        r = _Run(task, args, kwargs)
        r.prerun()
        await _await(f"{name}.before_start", task.before_start, r.id, r.args, r.kwargs)
        try:
            retval = await fn(*args, **kwargs)
        except BaseException as exc:
            state, einfo = r.state_of(exc), ExceptionInfo(exc)
            what, hook, hook_args = r.outcome_hook(state, exc, einfo)
            await _await(f"{name}.{what}", hook, *hook_args)
            r.signals_after(state, exc, einfo)
            await _await(f"{name}.after_return", task.after_return, state, exc, r.id, r.args, r.kwargs, einfo)
            r.postrun(state, exc)
            raise
        what, hook, hook_args = r.outcome_hook("SUCCESS", retval, None)
        await _await(f"{name}.{what}", hook, *hook_args)
        r.signals_after("SUCCESS", retval, None)
        await _await(f"{name}.after_return", task.after_return, "SUCCESS", retval, r.id, r.args, r.kwargs, None)
        r.postrun("SUCCESS", retval)
        return retval

    return run_async
