"""Taskiq's tasks for `make bench-peers` (bench/peers/compare.py): the worker imports this module
with `taskiq worker bench_taskiq:broker` (its cwd is bench/peers/apps/), the harness imports it to
send them. Broker: NATS JetStream (taskiq-nats, pull consumer, BENCH_PEERS_NATS_URL); results:
taskiq-redis (BENCH_PEERS_REDIS_URL). Tasks are `async def`, taskiq's native form (a plain `def`
task goes through a thread pool)."""

from __future__ import annotations

import asyncio
import os

from taskiq_nats import PullBasedJetStreamBroker
from taskiq_redis import RedisAsyncResultBackend

NATS_URL = os.environ.get("BENCH_PEERS_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("BENCH_PEERS_REDIS_URL", "redis://127.0.0.1:6379/3")
# The stream is named per run (the harness sets it) so that no earlier run's messages are left.
STREAM = os.environ.get("BENCH_PEERS_TASKIQ_STREAM", "taskiq_bench")

backend = RedisAsyncResultBackend(redis_url=REDIS_URL)
broker = PullBasedJetStreamBroker(
    servers=NATS_URL,
    subject=f"{STREAM}.tasks",
    stream_name=STREAM,
    durable=f"{STREAM}_workers",
    # Messages fetched per pull request (the default, 1, costs a request per task).
    pull_consume_batch=100,
    pull_consume_timeout=1.0,
).with_result_backend(backend)


@broker.task
async def add(x, y):
    return x + y


@broker.task
async def tsum(values):
    return sum(values)


@broker.task
async def nap(i):
    await asyncio.sleep(0.05)
    return i
