"""`make bench-peers`: W1-W6 of bench/WORKLOADS.md on dbtask and on the systems people would pick
instead (Celery, Dramatiq, Taskiq, arq), in one run, on the same servers, one system after the
other within each repetition.

Runs in bench/peers/.venv (the peers pinned in bench/peers/requirements.txt, and the dbtask
client of `make build` through a .pth): the project's .venv is left as it is. It reuses
bench/run.py for the servers, dbtask's workloads, the result checks and the process figures.
Every result each system stores is read back and checked (a missing or wrong one fails the run
with a non-zero exit); each worker's log goes to the temp dir and is shown on failure. The report
goes to bench/results/<date>-peers.md (-peers-n<N>.md for a reduced run), and is printed.

Environment: DBTASK_BENCH_N (W1/W2 task count, 20000; a smaller one also caps W3-W5's counts),
DBTASK_BENCH_REPEATS (3), DBTASK_BENCH_PEERS (which peers, comma-separated: celery, dramatiq,
taskiq, arq; all by default).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import compileall
import importlib
import importlib.metadata
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent
BENCH = PEERS_DIR.parent
REPO = BENCH.parent
APPS = PEERS_DIR / "apps"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(APPS))

import run as bench  # noqa: E402  bench/run.py
from run import BenchFailure, med, pct, rss_mib  # noqa: E402

import redis as redis_py  # noqa: E402

N = bench.N
REPEATS = bench.REPEATS
ROUND_TRIPS = min(bench.ROUND_TRIPS, N)
W4_TASKS = min(bench.W4_TASKS, N)
W4_CONCURRENCY = bench.W4_CONCURRENCY
CHORD_SIZE = min(bench.CHORD_SIZE, N)
# bench/run.py's dbtask workloads read these module globals when they run.
bench.ROUND_TRIPS, bench.CHORD_SIZE = ROUND_TRIPS, CHORD_SIZE
CORES = bench.CORES
TIMEOUT = bench.TIMEOUT
WINDOW = 256  # results read at once while waiting
VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------
# Workers of the peers: subprocesses started as each one's docs say, logs in the temp dir.


class PeerWorkers:
    """One or more worker commands of a peer, started together (W2's clock starts here)."""

    def __init__(self, name: str, cmds: list[list[str]], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.logs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        self.spawned = time.perf_counter()
        for i, cmd in enumerate(cmds):
            log = workdir / f"{name}-{time.monotonic_ns()}-{i}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                self.procs.append(
                    subprocess.Popen(cmd, cwd=APPS, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
                )

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}" for log in self.logs)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise BenchFailure(f"a {self.name} worker exited with {proc.returncode}:\n{self.tail()}")

    def rss(self) -> float:
        return sum(rss_mib(p.pid) for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self.procs:  # a worker's children (prefork, dramatiq's processes) too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------------
# The peers. Each one: its worker commands (throughput: W2, W3, W5, W6; io: W4, concurrency 200),
# how its client sends and awaits, and how its stored results are read and checked.


class Peer(abc.ABC):
    name = ""
    dist = ""  # the PyPI distribution, for its version
    db = 0  # its Redis database number
    module = ""
    setup_text = ""  # what the report says about its configuration
    w4_text = ""
    w5_text = ""

    def __init__(self, nats_url: str, redis_url: str, redis_port: int) -> None:
        self.nats_url = nats_url
        self.url = f"{redis_url.rstrip('/')}/{self.db}"
        self.r = redis_py.Redis(host="127.0.0.1", port=redis_port, db=self.db)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DBTASK_")}
        env.update(BENCH_PEERS_REDIS_URL=self.url, BENCH_PEERS_NATS_URL=self.nats_url, PYTHONPATH=str(APPS))
        return env

    def import_app(self) -> Any:
        os.environ.update(BENCH_PEERS_REDIS_URL=self.url, BENCH_PEERS_NATS_URL=self.nats_url)
        return importlib.import_module(self.module)

    def version(self) -> str:
        return importlib.metadata.version(self.dist)

    @abc.abstractmethod
    def drain_cmds(self) -> list[list[str]]:
        ...

    @abc.abstractmethod
    def io_cmds(self) -> list[list[str]]:
        ...

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @abc.abstractmethod
    async def enqueue_add(self, n: int) -> list:
        ...

    @abc.abstractmethod
    async def enqueue_nap(self, n: int) -> list:
        ...

    @abc.abstractmethod
    def fetch(self, handles: list) -> list[bytes | None]:
        ...

    @abc.abstractmethod
    def decode(self, raw: bytes) -> Any:
        """The task's return value from its stored result; BenchFailure if it failed."""
        ...

    @abc.abstractmethod
    async def round_trip(self) -> Any:
        ...

    @abc.abstractmethod
    async def chord(self, n: int) -> Any:
        ...

    # Shared by all peers.

    def wait_done(self, handles: list, workers: PeerWorkers, timeout: float = TIMEOUT) -> float:
        """Waits until every task of `handles` has a stored result, reading them oldest first a
        window at a time while the worker runs (as bench/run.py does for dbtask): returns when
        the last one was seen."""
        deadline = time.perf_counter() + timeout
        pending = collections.deque(range(len(handles)))
        while True:
            window = [pending.popleft() for _ in range(min(WINDOW, len(pending)))]
            raw = self.fetch([handles[i] for i in window])
            now = time.perf_counter()
            left = [i for i, v in zip(window, raw) if v is None]
            pending.extendleft(reversed(left))
            if not pending:
                return now
            if now > deadline:
                raise BenchFailure(f"{self.name}: {len(pending)} of {len(handles)} tasks have no result after {timeout} s")
            if left:
                workers.check_alive()
                time.sleep(0.001 if len(pending) <= 0.05 * len(handles) else 0.005)

    def check(self, handles: list, expected: list, what: str) -> int:
        if len(handles) != len(expected):
            raise BenchFailure(f"{self.name} {what}: {len(handles)} tasks sent for {len(expected)}")
        raws: list[bytes | None] = []
        for i in range(0, len(handles), 2000):
            raws += self.fetch(handles[i : i + 2000])
        for h, want, raw in zip(handles, expected, raws):
            if raw is None:
                raise BenchFailure(f"{self.name} {what}: no result stored for {h!r} (expected {want!r})")
            got = self.decode(raw)
            if got != want:
                raise BenchFailure(f"{self.name} {what}: {h!r} returned {got!r}, expected {want!r}")
        return len(handles)


async def gather_windows(calls, n: int, window: int) -> list:
    out: list = []
    for start in range(0, n, window):
        out += await asyncio.gather(*[calls(i) for i in range(start, min(n, start + window))])
    return out


class CeleryPeer(Peer):
    name, dist, db, module = "Celery", "celery", 1, "bench_celery"
    setup_text = (
        "Redis broker and Redis result backend (JSON). W2/W3/W5/W6: `celery -A bench_celery worker "
        f"--pool prefork --concurrency {CORES}` (one process per core: Python tasks need a process each "
        "to use both cores), with `--without-gossip --without-mingle --without-heartbeat` (no "
        "cluster chatter: mingle alone waits about a second at start) and rate limits off. W1: "
        "`add.delay()` in a loop (the client is synchronous)."
    )
    w4_text = (
        f"thread pool, `--pool threads --concurrency {W4_CONCURRENCY}`, one process: `time.sleep(0.05)` "
        "in a plain task (Celery tasks cannot be `async def`). Its gevent pool, the other choice for "
        "I/O, drained 1,000 pre-queued sleeps in 13 s here against 4.4 s for the threads"
    )
    w5_text = "a real chord: `chord([add.s(i, i) ...])(tsum.s())` (Redis backend counts the parts)"

    def _worker(self, pool: str, concurrency: int) -> list[str]:
        return [str(VENV_BIN / "celery"), "-A", "bench_celery", "worker", "--pool", pool, "--concurrency",
                str(concurrency), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-n", f"bench-{pool}@%h"]  # fmt: skip

    def drain_cmds(self) -> list[list[str]]:
        return [self._worker("prefork", CORES)]

    def io_cmds(self) -> list[list[str]]:
        return [self._worker("threads", W4_CONCURRENCY)]

    async def start(self) -> None:
        self.app = self.import_app()

    async def enqueue_add(self, n: int) -> list:
        add = self.app.add
        return [add.delay(i, i).id for i in range(n)]

    async def enqueue_nap(self, n: int) -> list:
        nap = self.app.nap
        return [nap.delay(i).id for i in range(n)]

    def fetch(self, handles: list) -> list[bytes | None]:
        return self.r.mget([f"celery-task-meta-{h}" for h in handles])

    def decode(self, raw: bytes) -> Any:
        import json

        rec = json.loads(raw)
        if rec.get("status") != "SUCCESS":
            raise BenchFailure(f"Celery: a task ended {rec.get('status')}: {rec!r}")
        return rec["result"]

    async def round_trip(self) -> Any:
        return self.app.add.delay(1, 2).get(timeout=10)

    async def chord(self, n: int) -> Any:
        from celery import chord

        return chord([self.app.add.s(i, i) for i in range(n)])(self.app.tsum.s()).get(timeout=60)


class DramatiqPeer(Peer):
    name, dist, db, module = "Dramatiq", "dramatiq", 2, "bench_dramatiq"
    setup_text = (
        "Redis broker, Results middleware with its Redis backend. W2/W3/W5/W6: `dramatiq "
        f"bench_dramatiq --processes {CORES} --threads 8` (its defaults: a process per core, 8 "
        "threads each). W1: `add.send()` in a loop (the client is synchronous). W3 waits with "
        "`message.get_result(block=True)` (a blocking Redis pop)."
    )
    w4_text = (
        f"an `async def` actor on the AsyncIO middleware's event loop, `--processes 1 --threads "
        f"{W4_CONCURRENCY}` (each running async actor holds a worker thread)"
    )
    w5_text = (
        "no chord that hands the results to a callback (a group's completion callback gets no "
        "results): `group(...).run()`, the members' results read by the client, then `tsum.send()`"
    )

    def _worker(self, processes: int, threads: int) -> list[str]:
        return [str(VENV_BIN / "dramatiq"), "bench_dramatiq", "--processes", str(processes), "--threads", str(threads)]

    def drain_cmds(self) -> list[list[str]]:
        return [self._worker(CORES, 8)]

    def io_cmds(self) -> list[list[str]]:
        return [self._worker(1, W4_CONCURRENCY)]

    async def start(self) -> None:
        self.app = self.import_app()

    async def enqueue_add(self, n: int) -> list:
        add = self.app.add
        return [add.send(i, i) for i in range(n)]

    async def enqueue_nap(self, n: int) -> list:
        nap = self.app.nap
        return [nap.send(i) for i in range(n)]

    def fetch(self, handles: list) -> list[bytes | None]:
        backend = self.app.backend
        with self.r.pipeline(transaction=False) as pipe:
            for m in handles:
                pipe.lindex(backend.build_message_key(m), 0)
            return pipe.execute()

    def decode(self, raw: bytes) -> Any:
        backend = self.app.backend
        try:
            return backend.unwrap_result(backend.encoder.decode(raw))
        except Exception as e:
            raise BenchFailure(f"Dramatiq: a task failed: {e!r}") from e

    async def round_trip(self) -> Any:
        return self.app.add.send(1, 2).get_result(block=True, timeout=10_000)

    async def chord(self, n: int) -> Any:
        from dramatiq import group

        g = group([self.app.add.message(i, i) for i in range(n)]).run()
        values = list(g.get_results(block=True, timeout=60_000))
        return self.app.tsum.send(values).get_result(block=True, timeout=60_000)


class TaskiqPeer(Peer):
    name, dist, db, module = "Taskiq", "taskiq", 3, "bench_taskiq"
    setup_text = (
        "NATS JetStream broker (taskiq-nats `PullBasedJetStreamBroker`, file storage, 100 messages "
        "per pull), taskiq-redis result backend. Tasks are `async def`. W2/W3/W5/W6: `taskiq worker "
        f"bench_taskiq:broker --workers {CORES}` (its default: a process per core) with "
        "`--max-async-tasks 100` (its default) and `--log-level WARNING`. W1: `asyncio.gather` of "
        "`add.kiq()`, 5,000 at a time. W3 waits with `wait_result(check_interval=0.001)` (0.2 s by "
        "default, which would be the round trip)."
    )
    w4_text = f"`async def`, `--workers 1 --max-async-tasks {W4_CONCURRENCY}`"
    w5_text = (
        "no chord (taskiq-pipelines chains tasks one after another): the members sent with "
        "`kiq()`, their results read by the client, then `tsum.kiq()`"
    )

    def _worker(self, workers: int, max_async: int) -> list[str]:
        return [str(VENV_BIN / "taskiq"), "worker", "bench_taskiq:broker", "--workers", str(workers),
                "--max-async-tasks", str(max_async), "--log-level", "WARNING"]  # fmt: skip

    def drain_cmds(self) -> list[list[str]]:
        return [self._worker(CORES, 100)]

    def io_cmds(self) -> list[list[str]]:
        return [self._worker(1, W4_CONCURRENCY)]

    async def start(self) -> None:
        self.app = self.import_app()
        await self.app.broker.startup()

    async def close(self) -> None:
        await self.app.broker.shutdown()

    async def enqueue_add(self, n: int) -> list:
        add = self.app.add
        return [t.task_id for t in await gather_windows(lambda i: add.kiq(i, i), n, bench.GATHER_WINDOW)]

    async def enqueue_nap(self, n: int) -> list:
        nap = self.app.nap
        return [t.task_id for t in await gather_windows(lambda i: nap.kiq(i), n, bench.GATHER_WINDOW)]

    def fetch(self, handles: list) -> list[bytes | None]:
        return self.r.mget(handles)

    def decode(self, raw: bytes) -> Any:
        rec = self.app.backend.serializer.loadb(raw)
        if rec.get("is_err"):
            raise BenchFailure(f"Taskiq: a task failed: {rec!r}")
        return rec["return_value"]

    async def round_trip(self) -> Any:
        t = await self.app.add.kiq(1, 2)
        res = await t.wait_result(check_interval=0.001, timeout=10)
        return res.return_value

    async def chord(self, n: int) -> Any:
        members = await gather_windows(lambda i: self.app.add.kiq(i, i), n, bench.GATHER_WINDOW)
        ids = [t.task_id for t in members]
        await asyncio.to_thread(self.wait_done, ids, self.workers)
        values = [self.decode(v) for v in self.fetch(ids)]
        t = await self.app.tsum.kiq(values)
        return (await t.wait_result(check_interval=0.001, timeout=60)).return_value


class ArqPeer(Peer):
    name, dist, db, module = "arq", "arq", 4, "bench_arq"
    ARQ_WINDOW = 500  # enqueue_job calls in flight (each holds a Redis connection of the pool)
    setup_text = (
        f"Redis. W2/W3/W5/W6: {CORES} `arq bench_arq.WorkerSettings` processes (an arq worker is one "
        "asyncio process; more processes is how it uses more cores), `max_jobs = 200`, `poll_delay "
        "= 0.001` (0.5 s by default: an idle worker looks at its queue that often). Functions are "
        f"`async def` (arq's only kind); its CLI logs every job at INFO and has no quieter level. W1: "
        f"`asyncio.gather` of `enqueue_job()`, {ARQ_WINDOW} at a "
        "time (each call holds a pooled connection). W3 waits with `job.result(poll_delay=0.001)`."
    )
    w4_text = f"`async def`, one process, `max_jobs = {W4_CONCURRENCY}`"
    w5_text = (
        "no chord: the members sent with `enqueue_job()`, their results read by the client, then "
        "`tsum` enqueued"
    )

    def drain_cmds(self) -> list[list[str]]:
        return [[str(VENV_BIN / "arq"), "bench_arq.WorkerSettings"] for _ in range(CORES)]

    def io_cmds(self) -> list[list[str]]:
        return [[str(VENV_BIN / "arq"), "bench_arq.WorkerSettings"]]

    async def start(self) -> None:
        from arq import create_pool

        self.app = self.import_app()
        self.pool = await create_pool(self.app.redis_settings(self.ARQ_WINDOW + 10))

    async def close(self) -> None:
        await self.pool.aclose()

    async def enqueue_add(self, n: int) -> list:
        jobs = await gather_windows(lambda i: self.pool.enqueue_job("add", i, i), n, self.ARQ_WINDOW)
        return [j.job_id for j in jobs]

    async def enqueue_nap(self, n: int) -> list:
        jobs = await gather_windows(lambda i: self.pool.enqueue_job("nap", i), n, self.ARQ_WINDOW)
        return [j.job_id for j in jobs]

    def fetch(self, handles: list) -> list[bytes | None]:
        return self.r.mget([f"arq:result:{h}" for h in handles])

    def decode(self, raw: bytes) -> Any:
        from arq.jobs import deserialize_result

        res = deserialize_result(raw)
        if not res.success:
            raise BenchFailure(f"arq: job {res.job_id} failed: {res.result!r}")
        return res.result

    async def round_trip(self) -> Any:
        job = await self.pool.enqueue_job("add", 1, 2)
        return await job.result(timeout=10, poll_delay=0.001)

    async def chord(self, n: int) -> Any:
        jobs = await gather_windows(lambda i: self.pool.enqueue_job("add", i, i), n, self.ARQ_WINDOW)
        ids = [j.job_id for j in jobs]
        await asyncio.to_thread(self.wait_done, ids, self.workers)
        values = [self.decode(v) for v in self.fetch(ids)]
        job = await self.pool.enqueue_job("tsum", values)
        return await job.result(timeout=60, poll_delay=0.001)


ALL_PEERS = {"celery": CeleryPeer, "dramatiq": DramatiqPeer, "taskiq": TaskiqPeer, "arq": ArqPeer}


# ---------------------------------------------------------------------------------------------
# One repetition of one system


async def peer_repetition(peer: Peer, workdir: Path) -> tuple[dict, int]:
    fig: dict = {}
    checked = 0
    peer.r.flushall()
    env = peer.env()
    expected = [2 * i for i in range(N)]

    t0 = time.perf_counter()
    ids = await peer.enqueue_add(N)
    fig["W1"] = N / (time.perf_counter() - t0)

    workers = PeerWorkers(peer.name, peer.drain_cmds(), env, workdir)
    peer.workers = workers
    try:
        last = peer.wait_done(ids, workers)
        fig["W2"] = N / (last - workers.spawned)
        fig["W6"] = workers.rss()
        checked += peer.check(ids, expected, "W1/W2")

        times = []
        for _ in range(ROUND_TRIPS):
            t0 = time.perf_counter()
            value = await peer.round_trip()
            times.append((time.perf_counter() - t0) * 1000)
            if value != 3:
                raise BenchFailure(f"{peer.name} W3: add(1, 2) returned {value!r}")
        checked += ROUND_TRIPS
        fig["W3 p50"], fig["W3 p99"] = pct(times, 0.5), pct(times, 0.99)

        t0 = time.perf_counter()
        value = await peer.chord(CHORD_SIZE)
        fig["W5"] = time.perf_counter() - t0
        want = sum(2 * i for i in range(CHORD_SIZE))
        if value != want:
            raise BenchFailure(f"{peer.name} W5: the callback returned {value!r}, expected {want}")
        checked += 1
    except BenchFailure as e:
        raise BenchFailure(f"{e}\n{workers.tail()}") from None
    finally:
        workers.stop()

    peer.r.flushall()
    workers = PeerWorkers(peer.name, peer.io_cmds(), env, workdir)
    peer.workers = workers
    try:
        # Ready and warm: one task through before the clock starts.
        if await peer.round_trip() != 3:
            raise BenchFailure(f"{peer.name} W4: the warm-up task returned a wrong result")
        checked += 1
        t0 = time.perf_counter()
        ids = await peer.enqueue_nap(W4_TASKS)
        last = peer.wait_done(ids, workers)
        fig["W4"] = last - t0
        checked += peer.check(ids, list(range(W4_TASKS)), "W4")
    except BenchFailure as e:
        raise BenchFailure(f"{e}\n{workers.tail()}") from None
    finally:
        workers.stop()
    return fig, checked


async def dbtask_repetition(nats, redis_srv, redis: bench.Redis, workdir: Path) -> tuple[dict, int]:
    """The same workloads on dbtask, through bench/run.py's functions."""
    fig: dict = {}
    checked = 0
    redis.call("FLUSHALL")
    secs, ids = await bench.w1_gather(N)
    fig["W1"] = N / secs

    worker = bench.WorkerProc(nats.url, redis_srv.url, workdir)
    _, last = redis.wait_done(ids, TIMEOUT)
    fig["W2"] = N / (last - worker.spawned)
    fig["W6"] = rss_mib(worker.proc.pid)
    checked += bench.check_results(redis, ids, [2 * i for i in range(N)], "dbtask W1/W2")
    times, n = await bench.w3_latency()
    checked += n
    fig["W3 p50"], fig["W3 p99"] = pct(times, 0.5), pct(times, 0.99)
    w5 = await bench.w5_chord()
    if w5 is not None:
        fig["W5"] = w5[0]
        checked += w5[2]
    worker.stop()

    redis.call("FLUSHALL")
    worker = bench.WorkerProc(nats.url, redis_srv.url, workdir, concurrency=W4_CONCURRENCY)
    worker.wait_ready()
    t0 = time.perf_counter()
    results = await bench.nap.apply_many([(i,) for i in range(W4_TASKS)])
    _, last = redis.wait_done([r.id for r in results], TIMEOUT)
    fig["W4"] = last - t0
    checked += bench.check_results(redis, [r.id for r in results], list(range(W4_TASKS)), "dbtask W4")
    worker.stop()
    return fig, checked


# ---------------------------------------------------------------------------------------------
# Report

ROWS = [
    # key, label, unit, higher is better
    ("W1", f"W1 enqueue {N:,} `add` tasks", "/s", True),
    ("W2", f"W2 drain {N:,}, worker start to last result", "/s", True),
    ("W3 p50", f"W3 round trip p50 ({ROUND_TRIPS:,} sequential)", "ms", False),
    ("W3 p99", "W3 round trip p99", "ms", False),
    ("W4", f"W4 {W4_TASKS:,} × 50 ms sleeps, concurrency {W4_CONCURRENCY}", "s", False),
    ("W5", f"W5 chord of {CHORD_SIZE:,} (or closest)", "s", False),
    ("W6", "W6 worker RSS after W2, process tree", "MiB", False),
]


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return {"/s": f"{v:,.0f}/s", "ms": f"{v:.2f} ms", "s": f"{v:.3f} s", "MiB": f"{v:.1f} MiB"}[unit]


def report(figs: dict[str, list[dict]], peers: list[Peer], checked: dict[str, int], started: datetime,
           loads: tuple, took: float) -> str:  # fmt: skip
    vers = bench.versions()
    names = ["dbtask"] + [p.name for p in peers]
    lines = [
        f"# `make bench-peers`, {started:%Y-%m-%d %H:%M} UTC",
        "",
        "W1-W6 of [WORKLOADS.md](../WORKLOADS.md) on dbtask and on its peers, one system after the "
        "other in each repetition, on the same loopback nats-server and redis-server "
        f"(bench/peers/compare.py). Median of {REPEATS} repetition(s); every stored result read "
        "back and checked.",
        "",
        f"Load average (1, 5, 15 min) at the start: {loads[0][0]:.2f}, {loads[0][1]:.2f}, "
        f"{loads[0][2]:.2f}; at the end: {loads[1][0]:.2f}, {loads[1][1]:.2f}, {loads[1][2]:.2f} "
        f"on {CORES} cores."
        + (
            " **The machine was busy with other work: these figures compare the systems with each "
            "other in the same minutes; they are not any system's speed.**"
            if max(loads[0][0], loads[1][0]) > CORES * 0.75
            else ""
        ),
        "",
        "| | " + " | ".join(names) + " | best peer | dbtask ÷ best peer |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- | --- |",
    ]
    for key, label, unit, higher in ROWS:
        cells, peer_vals = [], {}
        for name in names:
            xs = [f[key] for f in figs[name] if key in f]
            v = med(xs) if xs else None
            cells.append(fmt(v, unit))
            if name != "dbtask" and v is not None:
                peer_vals[name] = v
        mine = [f[key] for f in figs["dbtask"] if key in f]
        if peer_vals and mine:
            best = max(peer_vals, key=peer_vals.get) if higher else min(peer_vals, key=peer_vals.get)
            ratio = f"{med(mine) / peer_vals[best]:.2f}× ({'higher' if higher else 'lower'} is better)"
            best_cell = f"{best}"
        else:
            ratio, best_cell = "-", "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best_cell} | {ratio} |")
    lines += [
        "",
        "Results checked: " + ", ".join(f"{name} {checked.get(name, 0):,}" for name in names) + ".",
        "",
        "## How each system ran",
        "",
        "Each peer in its fastest idiomatic set-up for this machine's cores; its own Redis database "
        "(flushed before each of its steps), the same servers as dbtask. W2's clock starts when the "
        "worker command is spawned (start-up counts, as for dbtask). W4 starts an idle worker with "
        f"concurrency {W4_CONCURRENCY}, sends one task through it, then times from the first send to "
        "the last result. W5 runs on W2's worker.",
        "",
        "- **dbtask**: NATS JetStream for tasks, Redis for results; one `dbtask-worker` process "
        "(thread pool, default concurrency 16) for W2/W3/W5/W6, `--concurrency "
        f"{W4_CONCURRENCY}` for W4 (`async def` task on the worker's asyncio loop). W1: "
        "`asyncio.gather` of `delay()`, 5,000 at a time (bench/run.py's `w1_gather`). W4 sends with "
        "`apply_many`. W5 is `dbtask.Chord`.",
    ]
    for p in peers:
        lines.append(f"- **{p.name}** {p.version()}: {p.setup_text} W4: {p.w4_text}. W5: {p.w5_text}.")
    lines += [
        "",
        "The peers' members of a client-side W5 are awaited by the harness's batched Redis reads "
        "(256 keys per read), faster than their own per-task waits.",
        "",
        "## Versions",
        "",
        *[f"- {k}: {v}" for k, v in vers.items()],
        *[f"- {p.dist}: {p.version()}" for p in peers],
        f"- redis-py: {importlib.metadata.version('redis')}, nats-py: {importlib.metadata.version('nats-py')}",
        "",
        f"Sizes: N={N:,}, W3 {ROUND_TRIPS:,} round trips, W4 {W4_TASKS:,} tasks, W5 {CHORD_SIZE:,} "
        f"members; total time of the run: {took:.0f} s.",
        "",
    ]
    return "\n".join(lines)


async def main() -> int:
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    if not bench.WORKER_BIN.exists():
        print(f"{bench.WORKER_BIN} is missing: run make build (make bench-peers does)", file=sys.stderr)
        return 2
    bench.byte_compile()
    compileall.compile_dir(str(APPS), quiet=1)
    chosen = [s.strip().lower() for s in os.environ.get("DBTASK_BENCH_PEERS", ",".join(ALL_PEERS)).split(",") if s.strip()]
    unknown = [c for c in chosen if c not in ALL_PEERS]
    if unknown:
        print(f"DBTASK_BENCH_PEERS: unknown {unknown}; choose among {', '.join(ALL_PEERS)}", file=sys.stderr)
        return 2
    figs: dict[str, list[dict]] = collections.defaultdict(list)
    checked: dict[str, int] = collections.defaultdict(int)
    with tempfile.TemporaryDirectory(prefix="dbtask-bench-peers-") as tmp:
        workdir = Path(tmp)
        nats = bench.start_nats(workdir / "nats")
        redis_srv = bench.start_redis(workdir / "redis")
        peers: list[Peer] = []
        try:
            redis = bench.Redis(redis_srv.port)
            await bench.dbtask.init(nats_url=nats.url, redis_url=redis_srv.url)
            for c in chosen:
                peer = ALL_PEERS[c](nats.url, redis_srv.url, redis_srv.port)
                await peer.start()
                peers.append(peer)
            for r in range(REPEATS):
                print(f"run {r + 1}/{REPEATS}: dbtask...", file=sys.stderr, flush=True)
                fig, n = await dbtask_repetition(nats, redis_srv, redis, workdir)
                figs["dbtask"].append(fig)
                checked["dbtask"] += n
                print(f"  {fig}", file=sys.stderr, flush=True)
                for peer in peers:
                    print(f"run {r + 1}/{REPEATS}: {peer.name}...", file=sys.stderr, flush=True)
                    fig, n = await peer_repetition(peer, workdir)
                    figs[peer.name].append(fig)
                    checked[peer.name] += n
                    print(f"  {fig}", file=sys.stderr, flush=True)
            for peer in peers:
                await peer.close()
            await bench.dbtask.close()
        except BenchFailure as e:
            print(f"\nBENCHMARK FAILED: {e}", file=sys.stderr)
            return 1
        finally:
            nats.stop()
            redis_srv.stop()
    text = report(figs, peers, checked, started, (load_start, os.getloadavg()), time.perf_counter() - t_start)
    suffix = "" if N == 20_000 else f"-n{N}"
    out = BENCH / "results" / f"{started:%Y-%m-%d}-peers{suffix}.md"
    out.write_text(text)
    print(text)
    print(f"report written to {out.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
