"""Fixtures of the end-to-end tests: real servers and real worker processes.

Every test gets its own nats-server (JetStream, store in the test's temp dir) and redis-server,
each on a free port of 127.0.0.1, so tests never see each other's streams, consumers or
results (and the machine's own Redis on 6379 and NATS on 4222 are never touched). Workers are
the real `target/release/dbtask-worker` (or $DBTASK_WORKER_BIN) run with cwd tests/apps/,
where the task modules live, and VIRTUAL_ENV set to the repo's .venv. When a test fails, the
logs of its workers and servers are attached to the report.
"""

from __future__ import annotations

import inspect
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import pytest_asyncio

from e2e_support import (
    APPS,
    NATS_BIN,
    TESTS,
    WORKER_BIN,
    NatsCluster,
    Server,
    Worker,
    WorkerFactory,
    tail_text,
    start_nats,
    start_nats_cluster,
    start_redis,
    start_redis_cluster,
    worker_env,
)

# Per-test limit when pytest.ini is not read (pytest run from the repo root with other suites).
DEFAULT_TIMEOUT = 120


# These two hooks make the suite work without tests/pytest.ini too (pytest run from the repo
# root together with other suites): async tests get the asyncio marker, every test a timeout.
@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    if name.startswith("test") and inspect.iscoroutinefunction(obj):
        if not any(m.name == "asyncio" for m in getattr(obj, "pytestmark", [])):
            pytest.mark.asyncio(obj)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getini("timeout"):
        return
    for item in items:
        if TESTS in Path(str(item.fspath)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.fixture(scope="session", autouse=True)
def _binaries() -> None:
    missing = [str(p) for p in (WORKER_BIN, NATS_BIN) if not Path(p).is_file()]
    if missing:
        pytest.exit(f"missing {', '.join(missing)}: run `make build` (or `make test`) first", returncode=3)


@pytest.fixture
def logs(request: pytest.FixtureRequest) -> list:
    """Things whose output is attached to the report of a failed test."""
    items: list = []
    request.node._dbtask_logs = items
    return items


@pytest.fixture
def nats(tmp_path: Path, logs: list) -> Iterator[Server]:
    server = start_nats(tmp_path / "nats")
    logs.append(server)
    yield server
    server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path, logs: list) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster on loopback (`start_nats_cluster`); `nats_cluster.url` is
    the seeds list of all three. Workers join it with `worker_factory(nats_url=nats_cluster.url)`."""
    cluster = start_nats_cluster(tmp_path / "cluster")
    logs.extend(cluster.nodes)
    yield cluster
    cluster.stop()


@pytest.fixture
def redis(request: pytest.FixtureRequest, tmp_path: Path, logs: list) -> Iterator[Server]:
    """A redis-server; a 3-master Redis Cluster for tests parametrized with "cluster"
    (`e2e_support.PLAIN_AND_CLUSTER`)."""
    if getattr(request, "param", "plain") == "cluster":
        server = start_redis_cluster(tmp_path / "redis-cluster")
    else:
        server = start_redis(tmp_path / "redis")
    logs.append(server)
    yield server
    server.stop()


@pytest.fixture
def worker_factory(nats: Server, redis: Server, tmp_path: Path, logs: list) -> Iterator[WorkerFactory]:
    """start(*apps, queues="default", concurrency=4, args=(), ready=True, nats_url=..., ...)
    starts a worker and (unless ready=False) waits for its `worker ready` line. Workers still
    running at teardown are killed. ``django="project.settings"`` passes ``--django`` and no
    default app."""
    workers: list[Worker] = []

    def start(
        *apps: str,
        queues: str = "default",
        concurrency: int | None = 4,
        args: Sequence[str] = (),
        ready: bool = True,
        nats_url: str | None = None,
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
        django: str | None = None,
    ) -> Worker:
        index = len(workers) + 1
        cmd = [str(WORKER_BIN), "--nats-url", nats_url or nats.url, "--redis-url", redis_url or redis.url]
        if queues:
            cmd += ["--queues", queues]
        if concurrency is not None:
            cmd += ["--concurrency", str(concurrency)]
        if django is not None:
            cmd += ["--django", django]
        for app in apps or (() if django is not None else ("e2e_tasks",)):
            cmd += ["-A", app]
        cmd += list(args)
        stderr_path = tmp_path / f"worker{index}.stderr"
        stdout_path = tmp_path / f"worker{index}.stdout"
        with open(stderr_path, "wb") as err, open(stdout_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=APPS,
                # The crash journals of this test's workers, kept apart from other tests'.
                env=worker_env(DBTASK_STATE_DIR=str(tmp_path / "state"), **(env or {})),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        w = Worker(index, cmd, proc, stderr_path, stdout_path)
        workers.append(w)
        logs.append(w)
        if ready:
            w.wait_ready()
        return w

    yield start
    for w in workers:
        w.kill()


@pytest.fixture
def worker(worker_factory: WorkerFactory) -> Worker:
    """One worker on queue `default` with the e2e_tasks module."""
    return worker_factory()


@pytest_asyncio.fixture
async def client(nats: Server, redis: Server):
    """The dbtask client of this process, connected to this test's servers."""
    import dbtask

    await dbtask.init(nats_url=nats.url, redis_url=redis.url)
    yield
    await dbtask.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for thing in getattr(item, "_dbtask_logs", []):
            if isinstance(thing, Worker):
                report.sections.append((f"worker #{thing.index} (pid {thing.pid}) stderr", tail_text(thing.stderr_path)))
            elif isinstance(thing, Server):
                report.sections.append((f"{thing.name} :{thing.port} log", tail_text(thing.log, limit=4000)))
