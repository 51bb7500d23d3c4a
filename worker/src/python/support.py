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
    """Helpers bound to `loop`, the worker's one asyncio event loop: (submit, stop, pending)."""
    running = set()
    create_task = loop.create_task
    keep = running.add
    forget = running.discard

    async def run(coro, reply):
        # Catch everything, BaseException included: a task raising SystemExit or
        # KeyboardInterrupt must end as a failure, not propagate out of the loop.
        try:
            result = await coro
        except BaseException as exc:
            reply.fail(exc)
            if isinstance(exc, GeneratorExit):
                raise
        else:
            reply.succeed(result)

    def submit(coro, reply):
        # The loop keeps only weak references to its tasks: hold them until they are done.
        t = create_task(run(coro, reply))
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

    return submit, stop, pending
