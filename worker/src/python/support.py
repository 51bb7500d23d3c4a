"""Python half of the worker's embedded runtime (loaded once as module `_dbtask_worker`).

The Rust side (worker/src/python/) calls these helpers with the GIL held on its own Python
threads; nothing here is part of the public `dbtask` package.
"""

import asyncio
import inspect
import json
import select
import selectors
import traceback
import types

# Compact, strict JSON: NaN and the infinities are not JSON, so they fail like any other
# unserializable value instead of producing text that other readers reject.
encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
decode = json.loads


def format_exception(exc):
    """The full formatted traceback of `exc`, chained exceptions included."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def describe(name, fn):
    """(signature or None, precise, display) for a task function.

    `precise` is true when calling `fn` checks its arguments exactly as `signature.bind` would,
    before running any of its code (a plain function, not a wrapper): the worker then calls it
    directly and uses `bind` only to explain a TypeError.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, False, f"{name}(...)"
    precise = (
        type(fn) is types.FunctionType
        and not hasattr(fn, "__wrapped__")
        and "__signature__" not in fn.__dict__
    )
    return sig, precise, f"{name}{sig}"


def new_loop(wait):
    """The worker's event loop.

    With asyncio's default policy it is a selector loop whose epoll waits take their timeout
    in nanoseconds (`wait`: epoll_pwait2, Linux 5.11+). The stdlib's epoll selector rounds
    every timeout up to a whole millisecond, so a timer (`asyncio.sleep`, `wait_for`) fires
    up to 1 ms late, about 0.5 ms on average; here it fires when due. Timers still never
    fire early. Where epoll_pwait2 is missing, or a task module set another policy (uvloop,
    say), the policy's own loop is used.
    """
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy and hasattr(
        selectors, "EpollSelector"
    ):
        try:
            return asyncio.SelectorEventLoop(_precise_selector(wait))
        except OSError:
            pass
    return asyncio.new_event_loop()


def _precise_selector(wait):
    class PreciseEpollSelector(selectors.EpollSelector):
        def select(self, timeout=None):
            # As EpollSelector.select, but the timeout goes to `wait` unrounded (None blocks).
            max_ev = max(len(self._fd_to_key), 1)
            ready = []
            for fd, event in wait(self._selector.fileno(), timeout, max_ev):
                events = 0
                if event & ~select.EPOLLIN:
                    events |= selectors.EVENT_WRITE
                if event & ~select.EPOLLOUT:
                    events |= selectors.EVENT_READ
                key = self._key_from_fd(fd)
                if key:
                    ready.append((key, events & key.events))
            return ready

    selector = PreciseEpollSelector()
    try:
        wait(selector.fileno(), 0, 1)  # OSError (ENOSYS) where the kernel lacks epoll_pwait2
    except OSError:
        selector.close()
        raise
    return selector


def heartbeat(loop, beat, every):
    """Calls `beat()` on `loop` every `every` seconds, as a timer callback of the loop itself:
    a task that blocks the loop stops the beats (the worker's liveness watches them)."""

    def tick():
        beat()
        loop.call_later(every, tick)

    loop.call_soon_threadsafe(tick)


def start_loop(loop):
    """Helpers bound to `loop`, the worker's one asyncio event loop:
    (submit, stop, pending, interrupt)."""
    from dbtask._worker import CURRENT

    running = set()
    # Task id -> asyncio Task, so that a time limit or a revocation can reach a running task.
    by_id = {}
    create_task = loop.create_task
    keep = running.add
    forget = running.discard
    set_current = CURRENT.set

    async def run(coro, reply, task_id, current):
        # `dbtask.current_task()`, in this task's own context (its children inherit it).
        set_current(current)
        # Catch everything, BaseException included: a task raising SystemExit or
        # KeyboardInterrupt must end as a failure, not propagate out of the loop.
        by_id[task_id] = asyncio.current_task()
        try:
            result = await coro
        except BaseException as exc:
            reply.fail(exc)
            if isinstance(exc, GeneratorExit):
                raise
        else:
            reply.succeed(result)
        finally:
            if by_id.get(task_id) is asyncio.current_task():
                del by_id[task_id]

    def submit(coro, reply, task_id, current):
        # The loop keeps only weak references to its tasks: hold them until they are done.
        t = create_task(run(coro, reply, task_id, current))
        keep(t)
        t.add_done_callback(forget)

    async def stop_when_idle():
        while running:
            await asyncio.wait(list(running))
        loop.stop()

    def stop():
        create_task(stop_when_idle())

    def pending():
        return len(running)

    def interrupt(task_id, kind, message):
        """On the loop thread: "soft" raises SoftTimeLimitExceeded at the await the task is
        suspended on; "hard" and "terminate" cancel it."""
        t = by_id.get(task_id)
        if t is None or t.done():
            return
        if kind == "soft":
            from dbtask._worker import SoftTimeLimitExceeded

            inject(t, SoftTimeLimitExceeded(message), 0)
        else:
            t.cancel(message)

    def inject(t, exc, tries):
        # An asyncio Task can only be cancelled from outside; to make the coroutine see
        # another exception, fail the future it awaits (following awaited Tasks inward).
        if t.done():
            return
        fut = getattr(t, "_fut_waiter", None)
        while isinstance(fut, asyncio.Task):
            fut = getattr(fut, "_fut_waiter", None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        elif tries < 100:
            # Between two steps (e.g. after `await asyncio.sleep(0)`): try at the next one.
            loop.call_soon(inject, t, exc, tries + 1)
        else:
            t.cancel(str(exc))

    return submit, stop, pending, interrupt
