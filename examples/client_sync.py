"""Example synchronous client: the same API without asyncio, for scripts and for Django or
Flask views. Every coroutine of the async API has a twin with the `_sync` suffix.

    DBTASK_NATS_URL=nats://127.0.0.1:4222 DBTASK_REDIS_URL=redis://127.0.0.1:6379 python client_sync.py
"""

import os
import sys

import dbtask
from tasks import add, divide, greet

NATS_URL = os.environ.get("DBTASK_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("DBTASK_REDIS_URL", "redis://127.0.0.1:6379")


def main() -> int:
    dbtask.init_sync(nats_url=NATS_URL, redis_url=REDIS_URL)
    try:
        result = add.delay_sync(20, 22)
        print(f"[sync API] add(20, 22) = {result.get_sync(timeout=10)!r}")

        result = greet.delay_sync("sync caller")
        print(f"[sync API] greet('sync caller') = {result.get_sync(timeout=10)!r}")

        result = divide.delay_sync(1, 0)
        try:
            result.get_sync(timeout=10)
        except ZeroDivisionError as exc:
            print(f"[sync API] divide(1, 0) raised {type(exc).__name__}: {exc}")
        else:
            print("divide(1, 0) did not raise", file=sys.stderr)
            return 1

        # A handle restored from an id alone, as another process would do.
        again = dbtask.AsyncResult(result.id)
        print(f"[sync API] AsyncResult({result.id!r}).state_sync() = {again.state_sync()!r}")
    finally:
        dbtask.close_sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
