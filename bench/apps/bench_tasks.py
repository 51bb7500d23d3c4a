"""Tasks of `make bench` (bench/run.py). The worker imports this module with `-A bench_tasks`
(its cwd is bench/apps/); run.py imports it too, so both sides register the same names."""

from __future__ import annotations

import asyncio

from dbtask import task


@task
def add(x, y):
    return x + y


@task
async def nap(i):
    await asyncio.sleep(0.05)
    return i


@task
def tsum(values):
    return sum(values)


@task
def crunch(n):
    """W7: `n` rounds of pure-Python arithmetic (it holds the GIL throughout); the same work
    and the same result every run."""
    x = 0
    for i in range(n):
        x = (x * 31 + i) % 1000003
    return x


@task(ignore_result=True)
def add_quiet(x, y):
    """W2 with `ignore_result` (bench/ignored.py): `add`, with no record stored."""
    return x + y
