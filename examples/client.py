"""Example async client: enqueues the tasks of tasks.py and prints their results.

Start NATS, Redis and a worker first (`make demo` does all of it), or point the client at
your own servers:

    cd examples && dbtask-worker -A tasks &
    DBTASK_NATS_URL=nats://127.0.0.1:4222 DBTASK_REDIS_URL=redis://127.0.0.1:6379 python client.py
"""

import asyncio
import os
import sys

import dbtask
from tasks import add, divide, greet

NATS_URL = os.environ.get("DBTASK_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("DBTASK_REDIS_URL", "redis://127.0.0.1:6379")


async def main() -> int:
    await dbtask.init(nats_url=NATS_URL, redis_url=REDIS_URL)
    try:
        # A sync (`def`) task.
        result = await add.delay(2, 3)
        print(f"add(2, 3) = {await result.get(timeout=10)!r}    (sync task, id {result.id})")

        # An `async def` task, with a keyword argument.
        result = await greet.delay("dbtask", delay=0.05)
        print(f"greet('dbtask') = {await result.get(timeout=10)!r}    (async task, id {result.id})")

        # A failing task: the worker stores the exception, get() raises it here.
        result = await divide.delay(1, 0)
        try:
            await result.get(timeout=10)
        except ZeroDivisionError as exc:
            print(f"divide(1, 0) raised {type(exc).__name__}: {exc}    (state {await result.state()})")
            # The worker's traceback comes along as the exception's __cause__.
            lines = [line.strip() for line in str(exc.__cause__ or "").splitlines()]
            frames = [i for i, line in enumerate(lines[:-1]) if line.startswith('File "')]
            if frames:
                where, code = lines[frames[-1]], lines[frames[-1] + 1]
                print(f"  remote traceback: {where}: {code}")
        else:
            print("divide(1, 0) did not raise", file=sys.stderr)
            return 1

        # Many at once: publish them all, then wait for them all.
        results = await asyncio.gather(*(add.delay(i, i) for i in range(10)))
        values = await asyncio.gather(*(r.get(timeout=10) for r in results))
        print(f"10 tasks in parallel: {values}")
        if values != [2 * i for i in range(10)]:
            return 1
    finally:
        await dbtask.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
