"""Tasks of tests/test_metrics.py: each ends one way, to be counted by /metrics."""

from __future__ import annotations

import time

from dbtask import task


@task
def ok(x):
    return x


@task
async def async_ok(x):
    return x


@task
def boom(message):
    raise ValueError(message)


@task(bind=True, autoretry_for=(ConnectionError,), max_retries=3, retry_delay=0.1)
def retry_once(self):
    """Fails its first run, succeeds on its retry."""
    if self.request.retries == 0:
        raise ConnectionError("the first run fails")
    return self.request.retries


@task
def nap(seconds):
    time.sleep(seconds)
    return seconds


@task
async def block_the_loop(seconds):
    """Blocks the worker's asyncio loop (a blocking call in an `async def` task): the loop
    stops beating, and /livez says so."""
    time.sleep(seconds)
    return seconds
