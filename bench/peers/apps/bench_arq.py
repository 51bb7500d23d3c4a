"""arq's functions for `make bench-peers` (bench/peers/compare.py): the worker imports this module
with `arq bench_arq.WorkerSettings` (its cwd is bench/peers/apps/); the harness enqueues them by
name. Queue and results: the harness's Redis (BENCH_PEERS_REDIS_URL)."""

from __future__ import annotations

import asyncio
import os

from arq.connections import RedisSettings

URL = os.environ.get("BENCH_PEERS_REDIS_URL", "redis://127.0.0.1:6379/4")
MAX_JOBS = int(os.environ.get("BENCH_PEERS_ARQ_MAX_JOBS", "200"))


async def add(ctx, x, y):
    return x + y


async def tsum(ctx, values):
    return sum(values)


async def nap(ctx, i):
    await asyncio.sleep(0.05)
    return i


def redis_settings(max_connections: int) -> RedisSettings:
    """The harness's Redis; redis-py pools 100 connections at most by default, fewer than the
    jobs or enqueues in flight here."""
    settings = RedisSettings.from_dsn(URL)
    settings.max_connections = max_connections
    return settings


class WorkerSettings:
    functions = [add, tsum, nap]
    redis_settings = redis_settings(MAX_JOBS + 100)
    max_jobs = MAX_JOBS
    # arq polls its queue every poll_delay (0.5 s by default): idle, a job would wait up to that
    # long before it starts.
    poll_delay = 0.001
    handle_signals = True
