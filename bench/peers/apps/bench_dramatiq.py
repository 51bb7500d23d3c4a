"""Dramatiq's actors for `make bench-peers` (bench/peers/compare.py): the worker imports this
module with `dramatiq bench_dramatiq` (its cwd is bench/peers/apps/), the harness imports it to
send them. Broker: Redis; results: the Results middleware with its Redis backend (same server,
BENCH_PEERS_REDIS_URL). `nap` is an async actor, run on the AsyncIO middleware's event loop."""

from __future__ import annotations

import asyncio
import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware.asyncio import AsyncIO
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

URL = os.environ.get("BENCH_PEERS_REDIS_URL", "redis://127.0.0.1:6379/2")

# redis-py pools 100 connections at most by default; W4's worker runs 200 threads.
POOL_URL = URL + ("&" if "?" in URL else "?") + "max_connections=1000"
backend = RedisBackend(url=POOL_URL)
broker = RedisBroker(url=POOL_URL)
broker.add_middleware(Results(backend=backend))
broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=0)
def add(x, y):
    return x + y


@dramatiq.actor(store_results=True, max_retries=0)
def tsum(values):
    return sum(values)


@dramatiq.actor(store_results=True, max_retries=0)
async def nap(i):
    await asyncio.sleep(0.05)
    return i
