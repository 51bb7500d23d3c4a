"""Tasks for the end-to-end tests. The worker imports this module with `-A e2e_tasks` (its cwd
is tests/apps/); the tests import it too, so both sides register the same names
(`e2e_tasks.<function>`).

Tasks that coordinate with a test take a `marker` path: they append a line to it when they
start, so the test knows the task is running inside a worker without sleeping blindly.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from dbtask import task


class Declined(Exception):
    """A user-defined exception: reaches the client as dbtask.TaskError."""


def _mark(path: str | None, text: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


@task
def add(x, y):
    return x + y


@task
async def async_mul(x, y):
    await asyncio.sleep(0.01)
    return x * y


@task
async def async_timers(delays):
    """How long `asyncio.sleep(d)` and a `wait_for(..., d)` timeout took on the worker's loop
    for each `d`, how long a socket's readiness took to arrive, and the loop's selector."""
    loop = asyncio.get_running_loop()
    timers = []
    for delay in delays:
        t0 = loop.time()
        await asyncio.sleep(delay)
        slept = loop.time() - t0
        t0 = loop.time()
        try:
            await asyncio.wait_for(loop.create_future(), delay)
        except asyncio.TimeoutError:
            pass
        timers.append([delay, slept, loop.time() - t0])
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.setblocking(False)
        loop.call_later(0.005, writer.send, b"x")
        received = await asyncio.wait_for(loop.sock_recv(reader, 1), 5)
    return {
        "timers": timers,
        "received": received.decode(),
        "selector": type(getattr(loop, "_selector", None)).__name__,
    }


@task
def greet(name, *, greeting="Hello", punctuation="!"):
    return f"{greeting}, {name}{punctuation}"


@task
async def async_greet(name, greeting="Hi"):
    await asyncio.sleep(0)
    return {"text": f"{greeting} {name}", "parts": [greeting, name]}


@task
def fail(message):
    raise ValueError(f"bad input: {message}")  # the raising line: the traceback must show it


@task
async def async_fail(message):
    await asyncio.sleep(0)
    raise KeyError(message)


@task
def decline(amount):
    raise Declined(f"payment of {amount} declined")


@task
def unserializable():
    return {1, 2, 3}  # a set is not JSON


@task
def record(n, path):
    """Appends "<n> <pid>" to path and returns the pid: who ran what, how many times."""
    time.sleep(0.005)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{n} {os.getpid()}\n")
    return os.getpid()


@task
def sleep_then(seconds, value, marker=None):
    _mark(marker, f"start {value} {os.getpid()}")
    time.sleep(seconds)
    return value


@task
async def async_sleep_then(seconds, value, marker=None):
    _mark(marker, f"start {value} {os.getpid()}")
    await asyncio.sleep(seconds)
    return value


@task(track_started=True)
def tracked(seconds, marker=None):
    _mark(marker, f"start {os.getpid()}")
    time.sleep(seconds)
    return "tracked"


@task
def whoami():
    return os.getpid()


@task
def big(n):
    return "x" * n
