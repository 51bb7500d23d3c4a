"""Python half of the worker's embedded runtime (loaded once as module `_dbtask_worker`).

The Rust side (worker/src/python/) calls these helpers with the GIL held on its own Python
threads; nothing here is part of the public `dbtask` package.
"""

import asyncio
import inspect
import json
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


def start_loop(loop):
    """Helpers bound to `loop`, the worker's one asyncio event loop:
    (submit, stop, pending, interrupt)."""
    running = set()
    # Task id -> asyncio Task, so that a time limit or a revocation can reach a running task.
    by_id = {}
    create_task = loop.create_task
    keep = running.add
    forget = running.discard

    async def run(coro, reply, task_id):
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

    def submit(coro, reply, task_id):
        # The loop keeps only weak references to its tasks: hold them until they are done.
        t = create_task(run(coro, reply, task_id))
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
            from dbtask._limits import SoftTimeLimitExceeded

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
