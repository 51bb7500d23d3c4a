"""The `@task` decorator and the `Task` it makes.

Pure Python, importable without the compiled extension: the worker imports user modules, whose
`@task` registers each function in `_registry.TASKS`. Publishing goes through the process-wide
client (`dbtask.init`), whose compiled module is imported on first use.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Coroutine,
    Generic,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

from . import _client, _options, _registry
from ._canvas import Group, Signature
from ._options import DEFAULT_QUEUE
from ._result import AsyncResult, IgnoredResult

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._options import TaskOptions

__all__ = ["Task", "AsyncTask", "task"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


def _call_args(
    pos: tuple[Any, ...], args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> tuple[Sequence[Any], dict[str, Any] | None]:
    call_args: Sequence[Any] = pos
    if args is not None:
        if pos:
            raise ValueError(
                "apply_async got positional task arguments and args=...: "
                "use apply_async(1, 2) or apply_async(args=(1, 2)), not both"
            )
        if isinstance(args, (tuple, list)):
            call_args = args
        elif isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise TypeError(f"args must be a tuple or a list, not {type(args).__name__}")
        else:
            call_args = tuple(args)
    if kwargs is None or isinstance(kwargs, dict):
        return call_args, kwargs
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    return call_args, dict(kwargs)


class Task(Generic[P, R]):
    """A function registered as a task. ``R`` is what the task returns (what ``get()`` gives).

    Calling the task runs the function here, in this process (as in Celery); ``delay`` and
    ``apply_async`` send it to a worker. Async methods have a blocking twin with the suffix
    ``_sync``.

    The worker reads ``name``, ``fn``, ``is_async``, ``queue`` and ``options`` (the keys of
    :class:`dbtask._options.TaskOptions`, checked here: an unknown key is a ``TypeError``).
    """

    name: str
    fn: Callable[..., Any]
    is_async: bool
    queue: str
    options: dict[str, Any]

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@task needs a function, not {type(fn).__name__}")
        # First, so that the function's own attributes cannot shadow the task's.
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = _options.check_task_name(name if name is not None else f"{fn.__module__}.{fn.__qualname__}")
        self.queue = _options.check_queue(queue)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.options = _options.task_options(options or {})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} queue={self.queue!r}>"

    # -- hooks (Celery's names and signatures; see dbtask._trace) -------------------------
    # Override them in a subclass and pass it as ``@task(base=MyTask)``. In an ``async def``
    # task they may be ``async def`` too. They run on the worker, before the outcome is
    # stored; one that raises is logged and changes nothing.

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Before the function runs."""

    def on_success(self, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The function returned ``retval``."""

    def on_failure(
        self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], einfo: Any
    ) -> Any:
        """The function raised ``exc`` and the task fails (no retry left, or none asked for)."""

    def on_retry(
        self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], einfo: Any
    ) -> Any:
        """The function raised ``exc`` (``Retry``, or an ``autoretry_for`` type) and the task
        will run again."""

    def after_return(
        self, status: str, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], einfo: Any
    ) -> Any:
        """After the outcome hook: ``status`` is SUCCESS, RETRY or FAILURE, ``retval`` the
        return value or the exception."""

    def _result(self, ignore_result: bool | None = None) -> type[AsyncResult[Any]]:
        """The result class of a call: one whose ``get()`` refuses at once when no record
        will be stored on success."""
        ignored = self.options.get("ignore_result", False) if ignore_result is None else ignore_result
        return IgnoredResult if ignored else AsyncResult

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Runs the function locally."""
        if self.options.get("bind"):
            return self.fn(_bound_locally(self), *args, **kwargs)  # type: ignore[no-any-return]
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]

    def _priority(self, priority: int | None) -> int | None:
        return _options.check_priority(priority if priority is not None else self.options.get("priority"))

    # (priority option, the compiled PublishOptions made for it) of a plain delay().
    _plain_options: tuple[Any, Any] = (None, None)

    def _plain(self) -> Any:
        """The compiled ``PublishOptions`` of a plain ``delay()``: made once per task (its
        priority) rather than per call, and made again if the ``priority`` option changes."""
        priority = self.options.get("priority")
        made = self._plain_options
        if made[1] is None or made[0] != priority:
            made = self._plain_options = (priority, _client._native().PublishOptions(priority=self._priority(None)))
        return made[1]

    def _publish_options(
        self,
        task_id: str | None,
        countdown: float | None,
        eta: datetime | None,
        expires: float | datetime | None,
        priority: int | None,
        ignore_result: bool | None = None,
    ) -> Any:
        """The compiled ``PublishOptions`` of an ``apply_async()`` call."""
        if (
            task_id is None
            and countdown is None
            and eta is None
            and expires is None
            and priority is None
            and ignore_result is None
        ):
            return self._plain()
        if ignore_result is not None and not isinstance(ignore_result, bool):
            raise TypeError(f"ignore_result must be True or False, not {ignore_result!r}")
        eta_ts, expires_ts = _options.schedule(countdown, eta, expires)
        return _client._native().PublishOptions(
            task_id=task_id,
            eta=eta_ts,
            expires=expires_ts,
            priority=self._priority(priority),
            ignore_result=ignore_result,
        )

    # -- one task -------------------------------------------------------------------------

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[AsyncResult[R]]:
        """Sends the task to a worker: ``result = await add.delay(1, 2)``.

        Needs a running event loop (in synchronous code use :meth:`delay_sync`). The arguments
        are checked and the message is encoded and handed to the client's I/O thread before
        this returns, so a bad argument raises here, at the call. What it returns is an
        asyncio future that resolves to the :class:`AsyncResult` once JetStream has stored
        the message, or raises the publish error (``ConnectionError``, ``ValueError`` for a
        message over the server's size limit). ``asyncio.gather(*(add.delay(i) for i in
        ...))`` publishes them all at once, with no asyncio task per call.

        The task is sent even if the future is never awaited (fire and forget); its failure
        is then only logged by asyncio ("Future exception was never retrieved"). Await it to
        know the task is stored; ``await dbtask.close()`` waits for every publish in flight.
        """
        # _plain(), inlined: this is the publishing hot path.
        made = self._plain_options
        if made[1] is None or made[0] != self.options.get("priority"):
            self._plain()
            made = self._plain_options
        return _client.current().publish(self.queue, self.name, args, kwargs, made[1], self._result())

    def delay_sync(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Blocking form of :meth:`delay`."""
        return self._result()(
            _client.current().publish_sync(self.queue, self.name, args, kwargs, self._plain())
        )

    def apply_async(
        self,
        *task_args: Any,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        priority: int | None = None,
        ignore_result: bool | None = None,
        **unknown: NoReturn,
    ) -> asyncio.Future[AsyncResult[R]]:
        """Sends the task with options. Positional arguments are the task's arguments
        (``apply_async(1, 2, countdown=10)``), or pass them as in Celery
        (``apply_async(args=(1, 2), kwargs={...})``), not both.

        ``countdown``: run no earlier than this many seconds from now; ``eta``: run no earlier
        than this datetime (naive means UTC); ``expires``: seconds from now or a datetime after
        which the task is revoked instead of run; ``queue``: another queue than the task's;
        ``task_id``: your own id (a second publish of the same id within the stream's
        duplicate window, 2 minutes by default, is dropped by JetStream); ``priority``: 0 to 9,
        9 runs first on a backlog (default: the task's ``priority`` option, else 5); ``link`` /
        ``link_error``: a signature (or a list) published with the result on success, or with
        ``(task_id, error)`` on failure (``countdown`` only, no ``eta``/``expires``, then);
        ``ignore_result``: store no record on success for this call (overrides the task's
        option; ``get()`` then raises :class:`dbtask.ResultIgnored` at once).
        Another keyword is a ``TypeError`` naming these (``dbtask._options.APPLY_OPTIONS``).

        Like :meth:`delay`: checks the options and sends at once, and returns a future of the
        :class:`AsyncResult` that raises the publish error when awaited.
        """
        if unknown:
            _options.refuse_unknown("apply_async()", unknown, _options.APPLY_OPTIONS)
        pos, kw = _call_args(task_args, args, kwargs)
        if link is not None or link_error is not None:
            sig = self._linked(pos, kw, countdown, eta, expires, queue, task_id, priority)
            return _running_loop("apply_async").create_task(sig.apply_async(link=link, link_error=link_error))
        options = self._publish_options(task_id, countdown, eta, expires, priority, ignore_result)
        return _client.current().publish(
            queue if queue is not None else self.queue, self.name, pos, kw, options, self._result(ignore_result)
        )

    def apply_async_sync(
        self,
        *task_args: Any,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        priority: int | None = None,
        ignore_result: bool | None = None,
        **unknown: NoReturn,
    ) -> AsyncResult[R]:
        """Blocking form of :meth:`apply_async`."""
        if unknown:
            _options.refuse_unknown("apply_async_sync()", unknown, _options.APPLY_OPTIONS)
        pos, kw = _call_args(task_args, args, kwargs)
        if link is not None or link_error is not None:
            return self._linked(pos, kw, countdown, eta, expires, queue, task_id, priority).apply_async_sync(  # type: ignore[no-any-return]
                link=link, link_error=link_error
            )
        options = self._publish_options(task_id, countdown, eta, expires, priority, ignore_result)
        tid = _client.current().publish_sync(queue if queue is not None else self.queue, self.name, pos, kw, options)
        return self._result(ignore_result)(tid)

    # -- Django: after the transaction commits (dbtask.contrib.django) --------------------

    def delay_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Sends the task (:meth:`delay_sync`) once the current Django database transaction
        commits: nothing is sent if it rolls back; outside a transaction it is sent at once.
        Returns None, as in Celery, since the task may never be sent: give
        :meth:`apply_async_on_commit` a ``task_id`` to know its id beforehand. A publish error
        is raised by the commit (the data is committed by then). Needs Django."""
        from .contrib.django import on_commit

        on_commit(functools.partial(self.delay_sync, *args, **kwargs))

    def apply_async_on_commit(self, *task_args: Any, **options: Any) -> None:
        """:meth:`apply_async_sync` with the same arguments and options, once the current
        Django transaction commits (see :meth:`delay_on_commit`). Unknown option names and
        malformed ``args`` / ``kwargs`` raise here, at the call."""
        if not options.keys() <= _options.APPLY_OPTIONS:
            _options.refuse_unknown("apply_async_on_commit()", options, _options.APPLY_OPTIONS)
        _call_args(task_args, options.get("args"), options.get("kwargs"))
        from .contrib.django import on_commit

        on_commit(functools.partial(self.apply_async_sync, *task_args, **options))

    # -- workflows (dbtask._canvas) -------------------------------------------------------

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature (partial call): in a chain, the parent's result is prepended to ``args``."""
        return Signature(self.name, args, kwargs, {"queue": self.queue})

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: in a chain, the parent's result is not passed."""
        return Signature(self.name, args, kwargs, {"queue": self.queue, "immutable": True})

    def map(self, items: Iterable[Any]) -> Group:
        """A group calling the task once per item: ``task.map([1, 2])`` is
        ``Group([task.si(1), task.si(2)])`` (one message per item, run in parallel)."""
        return Group([self.si(item) for item in items])

    def starmap(self, items: Iterable[Sequence[Any]]) -> Group:
        """A group calling the task once per argument tuple: ``task.starmap([(1, 2), (3, 4)])``."""
        return Group([self.si(*args) for args in items])

    def _linked(
        self,
        pos: Sequence[Any],
        kw: Mapping[str, Any] | None,
        countdown: float | None,
        eta: datetime | None,
        expires: float | datetime | None,
        queue: str | None,
        task_id: str | None,
        priority: int | None,
    ) -> Signature:
        if eta is not None or expires is not None:
            raise ValueError("link/link_error work with countdown, not eta or expires")
        sig = self.s(*pos, **(kw or {}))
        return sig.set(queue=queue, countdown=countdown, task_id=task_id, priority=self._priority(priority))

    # -- many tasks -----------------------------------------------------------------------

    async def apply_many(
        self,
        args_list: Iterable[Sequence[Any]],
        kwargs_list: Iterable[Mapping[str, Any]] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        **unknown: NoReturn,
    ) -> list[AsyncResult[R]]:
        """Sends one task per item of ``args_list`` (with the matching item of
        ``kwargs_list``): all messages are written first, then every confirmation is awaited,
        which is much faster than awaiting ``delay()`` in a loop. Results keep the order.
        The options are those of :meth:`apply_async` that apply to many tasks at once."""
        if unknown:
            _options.refuse_unknown("apply_many()", unknown, _options.MANY_OPTIONS)
        calls = _calls(args_list, kwargs_list)
        eta_ts, expires_ts = _options.schedule(countdown, eta, expires)
        level = self._priority(priority)
        ids = await _client.current().publish_many(
            queue if queue is not None else self.queue, self.name, calls, eta_ts, expires_ts, priority=level
        )
        return [AsyncResult(i) for i in ids]

    def apply_many_sync(
        self,
        args_list: Iterable[Sequence[Any]],
        kwargs_list: Iterable[Mapping[str, Any]] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        **unknown: NoReturn,
    ) -> list[AsyncResult[R]]:
        """Blocking form of :meth:`apply_many`."""
        if unknown:
            _options.refuse_unknown("apply_many_sync()", unknown, _options.MANY_OPTIONS)
        calls = _calls(args_list, kwargs_list)
        eta_ts, expires_ts = _options.schedule(countdown, eta, expires)
        level = self._priority(priority)
        ids = _client.current().publish_many_sync(
            queue if queue is not None else self.queue, self.name, calls, eta_ts, expires_ts, priority=level
        )
        return [AsyncResult(i) for i in ids]


def _running_loop(method: str) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"{method}() needs a running event loop: await it from a coroutine, "
            f"or use {method}_sync() in synchronous code"
        ) from None


def _calls(
    args_list: Iterable[Sequence[Any]], kwargs_list: Iterable[Mapping[str, Any]] | None
) -> list[tuple[Sequence[Any], Mapping[str, Any] | None]]:
    all_args = [a if isinstance(a, (tuple, list)) else tuple(a) for a in args_list]
    if kwargs_list is None:
        return [(a, None) for a in all_args]
    all_kwargs = [k if k is None or isinstance(k, dict) else dict(k) for k in kwargs_list]
    if len(all_kwargs) != len(all_args):
        raise ValueError(f"args_list has {len(all_args)} items but kwargs_list has {len(all_kwargs)}")
    return list(zip(all_args, all_kwargs))


def _bound_locally(t: Task[Any, Any]) -> Any:
    from ._retry import BoundTask, Request

    return BoundTask(t, Request(task=t.name))


class AsyncTask(Task[P, R]):
    """A task whose function is ``async def``: calling it locally gives a coroutine."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:  # type: ignore[override]
        """Runs the function locally: await the result."""
        if self.options.get("bind"):
            return self.fn(_bound_locally(self), *args, **kwargs)  # type: ignore[no-any-return]
        return self.fn(*args, **kwargs)  # type: ignore[no-any-return]


def _task_class(base: type[Task[Any, Any]] | None, is_async: bool) -> type[Task[Any, Any]]:
    """The class of a new task: ``base`` (mixed with :class:`AsyncTask` for an ``async def``
    function), else ``Task`` or ``AsyncTask``."""
    if base is None:
        return AsyncTask if is_async else Task
    if not is_async or issubclass(base, AsyncTask):
        return base
    made = _ASYNC_BASES.get(base)
    if made is None:
        made = _ASYNC_BASES[base] = type(base.__name__, (base, AsyncTask), {"__module__": base.__module__})
    return made


_ASYNC_BASES: dict[type[Any], type[Any]] = {}


class _TaskDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R_co]], /) -> AsyncTask[P, R_co]: ...
    @overload
    def __call__(self, fn: Callable[P, R_co], /) -> Task[P, R_co]: ...


@overload
def task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncTask[P, R]: ...
@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    base: type[Task[Any, Any]] | None = None,
    **options: Unpack[TaskOptions],
) -> _TaskDecorator: ...


def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    base: type[Task[Any, Any]] | None = None,
    **options: Any,
) -> Any:
    """Registers a function as a task: ``@task`` or ``@task(name=..., queue=..., ...)``.

    The name defaults to ``f"{fn.__module__}.{fn.__qualname__}"``, the queue to ``"default"``.
    Every other keyword is a task option, stored in ``Task.options`` for the worker (options
    left unset are not stored); :class:`dbtask._options.TaskOptions` lists them. An unknown
    keyword (a Celery option such as ``acks_late`` included) is a ``TypeError`` naming
    the valid ones, and a bad value a ``ValueError``, here, at decoration.

    Retries (see ``dbtask._retry``): ``max_retries`` (default 3), ``retry_delay`` (seconds,
    default 1), ``retry_backoff`` (True or a factor in seconds: delay = factor * 2**retries),
    ``retry_backoff_max`` (default 600), ``retry_jitter`` (default True: a random delay between
    0 and the backoff delay), ``autoretry_for`` (exception types retried automatically), and
    ``bind=True`` (the function gets ``self`` with ``self.request`` and ``self.retry()``).
    ``time_limit`` / ``soft_time_limit`` (seconds) bound the task's run time: see
    docs/time-limits.md. ``track_started=True`` records STARTED; ``rate_limit`` (``"100/s"``)
    bounds the starts per period across workers; ``priority`` (0 to 9) is the level of
    ``delay()``. ``ignore_result``, ``store_errors_even_if_ignored`` and ``result_ttl``:
    see docs/results.md. ``base``: a subclass of :class:`Task` whose hooks (``on_success``,
    ``on_failure``, ``on_retry``, ``after_return``, ``before_start``) run around each run.
    """
    _options.check_names("task()", options, _options.TASK_OPTIONS)
    opts = _options.task_options(options, "task()")
    _options.check_queue(queue)
    if name is not None:
        _options.check_task_name(name)

    if base is not None and not (isinstance(base, type) and issubclass(base, Task)):
        raise TypeError(f"base must be a subclass of dbtask.Task, not {base!r}")

    def decorate(f: Callable[..., Any]) -> Task[Any, Any]:
        cls = _task_class(base, inspect.iscoroutinefunction(f))
        t: Task[Any, Any] = cls(f, name=name, queue=queue, options=opts)
        _registry.register(t)
        return t

    if fn is not None:
        return decorate(fn)
    return decorate
