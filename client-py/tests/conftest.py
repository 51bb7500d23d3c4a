"""Fixtures of the client's own tests: a private nats-server (JetStream) and redis-server on
free ports of 127.0.0.1, one pair per test module. No worker: tests play its part by hand
(reading the stream, writing records to Redis). Also the task ``add`` and the helpers that
several test modules use (``from conftest import ...``).

``pytest -m "not slow"`` leaves out the tests marked ``slow`` (see pytest.ini)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import nats as nats_py
import pytest

import dbtask

REPO = Path(__file__).resolve().parents[2]
NATS_BIN = os.environ.get("DBTASK_NATS_SERVER") or str(REPO / ".venv" / "bin" / "nats-server")
REDIS_BIN = os.environ.get("DBTASK_REDIS_SERVER") or "redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not start on port {port}")


class Server:
    def __init__(self, url: str, port: int, proc: subprocess.Popen) -> None:
        self.url, self.port, self.proc = url, port, proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nats(tmp: Path, *extra: str, jetstream: bool = True) -> Server:
    port = free_port()
    cmd = [NATS_BIN, "-a", "127.0.0.1", "-p", str(port), *extra]
    if jetstream:
        cmd += ["-js", "-sd", str(tmp / "js")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "nats.log", "wb"))
    _wait_port(port, proc, "nats-server")
    return Server(f"nats://127.0.0.1:{port}", port, proc)


def start_redis(tmp: Path, *extra: str, port: int | None = None) -> Server:
    port = port or free_port()
    cmd = [REDIS_BIN, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp),
           "--save", "", "--appendonly", "no", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=open(tmp / "redis.log", "wb"), stderr=subprocess.STDOUT)
    _wait_port(port, proc, "redis-server")
    return Server(f"redis://127.0.0.1:{port}", port, proc)


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def redis_cli(server: Server, *args: str) -> str:
    """A Redis command through redis-cli (the tests need no Python Redis client)."""
    out = subprocess.run(
        ["redis-cli", "-p", str(server.port), *args], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


# -- what several test modules share ---------------------------------------------------------

PY = str(REPO / ".venv" / "bin" / "python")


@dbtask.task(name="t.add", queue="math", max_retries=5, retry_delay=1.0)
def add(x: int, y: int) -> int:
    return x + y


@pytest.fixture
def client(nats: Server, redis: Server) -> Iterator[None]:
    """The process-wide client, connected to this module's servers."""
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    yield
    dbtask.close_sync()


async def last_message(nats_url: str, subject: str) -> Any:
    """The last message of ``subject`` in the task stream."""
    nc = await nats_py.connect(nats_url)
    try:
        return await nc.jetstream().get_last_msg("DBTASK_TASKS", subject)
    finally:
        await nc.close()


def store(redis: Server, record: dict[str, Any]) -> None:
    """What the worker does when a task is done: SET the record, PUBLISH it."""
    body = json.dumps(record)
    redis_cli(redis, "SET", f"dbtask:result:{{{record['id']}}}", body, "EX", "60")
    redis_cli(redis, "PUBLISH", f"dbtask:done:{{{record['id']}}}", body)
