"""Celery's tasks for `make bench-peers` (bench/peers/compare.py): the worker imports this module
with `celery -A bench_celery worker` (its cwd is bench/peers/apps/), the harness imports it to
send them. Broker and result backend: the harness's Redis (BENCH_PEERS_REDIS_URL)."""

from __future__ import annotations

import os
import time

from celery import Celery

URL = os.environ.get("BENCH_PEERS_REDIS_URL", "redis://127.0.0.1:6379/1")

app = Celery("bench_celery", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # No rate limits declared: the worker need not track them (Celery's own advice for speed).
    worker_disable_rate_limits=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(values):
    return sum(values)


@app.task
def nap(i):
    # Run by the thread pool (Celery tasks cannot be `async def`).
    time.sleep(0.05)
    return i
