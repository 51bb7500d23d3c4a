"""`make bench`: the shared workloads (bench/WORKLOADS.md, W1-W7) against the real
dbtask-worker and client, next to a Rust-only baseline (bench/baseline) on the same servers.

Starts a private nats-server (-js, file storage in a temp dir) and redis-server on free ports,
runs every workload REPEATS times, checks every result (a missing or wrong one fails the run
with a non-zero exit), and writes a Markdown report to bench/results/<date>.md (also printed).

Environment: DBTASK_BENCH_REPEATS (default 3), DBTASK_BENCH_N (W1/W2 task count, 20000),
DBTASK_BENCH_W8 (W8's task count, 100000; 0 skips it; W8 runs once, after the repetitions),
DBTASK_WORKER_BIN (the worker to measure, e.g. an older build to compare with; one without
`--pool` skips the process-pool figures).
"""

from __future__ import annotations

import asyncio
import collections
import compileall
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH / "apps"))

from e2e_support import NATS_BIN, REDIS_BIN, WORKER_BIN, start_nats, start_redis, worker_env  # noqa: E402

import dbtask  # noqa: E402
from bench_tasks import add, crunch, nap, tsum  # noqa: E402

import ignored  # noqa: E402

BASELINE_BIN = REPO / "target" / "release" / "dbtask-bench-baseline"
REPEATS = int(os.environ.get("DBTASK_BENCH_REPEATS", "3"))
N = int(os.environ.get("DBTASK_BENCH_N", "20000"))
GATHER_WINDOW = 5_000  # delay() calls in flight at once in W1 (asyncio.gather per window)
ROUND_TRIPS = 1_000
W4_TASKS = 2_000
W4_CONCURRENCY = 200
CHORD_SIZE = 1_000
CHORD_SIZE_LARGE = 10_000
# W9: the W2 drain shared by this many workers on one queue.
W9_WORKERS = 4
W7_TASKS = 400
W7_ROUNDS = 130_000  # crunch(W7_ROUNDS) takes about 10 ms of one core here
W7_RESULT = crunch(W7_ROUNDS)
CORES = os.cpu_count() or 1
# An older worker measured for comparison may predate the pool of processes.
HAS_POOL = WORKER_BIN.exists() and "--pool" in subprocess.run(
    [str(WORKER_BIN), "--help"], capture_output=True, text=True, timeout=30
).stdout
W8_TASKS = int(os.environ.get("DBTASK_BENCH_W8", "100000"))
W8_COUNTDOWN = 30.0
# W2 again with extra worker flags, next to the same drain without them, in the same run: what
# a feature costs on the hot path. One (name, flags) per variant; each adds two rows to the
# report (its drain rate, and its ratio to the plain drain of the same repetition).
W2_VARIANTS: list[tuple[str, list[str]]] = [
    ("http", ["--http-addr", "127.0.0.1:0"]),
    # Lifecycle events published on core NATS, nobody listening.
    ("events", ["--events"]),
    # Not answering inspect/control (on by default): what tracking the held tasks costs.
    ("no control", ["--control", "false"]),
]
# Rounds of (plain, each variant) in turn per repetition; each figure is the median of its
# rounds, so that a burst of other load on the machine does not fall on one side only.
W2_VARIANT_ROUNDS = 3
IDLE_SETTLE = 2.5  # seconds the worker stays idle after W2 before W6's settled figure
TIMEOUT = 120.0


class BenchFailure(Exception):
    """A missing or wrong result, or a step that did not finish: the run fails."""


# ---------------------------------------------------------------------------------------------
# A minimal Redis client (raw RESP on a socket), for counting and reading records without
# going through the client under test.


class Redis:
    """Reads replies from a buffer with a moving offset: re-slicing the buffer per line would
    copy it over and over (quadratic in a big MGET reply), and this process shares the CPU
    with the worker it measures."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0

    def _fill(self) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n", self.pos)) < 0:
            self._fill()
        line = bytes(self.buf[self.pos : end])
        self.pos = end + 2
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n + 2:
            self._fill()
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n + 2
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+",):
            return rest.decode()
        if kind == b"-":
            raise BenchFailure(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise BenchFailure(f"unexpected redis reply {line!r}")

    def call(self, *args: str | bytes):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def wait_done(self, ids: list[str], timeout: float, poll: float = 0.001) -> tuple[float, float]:
        """Waits until every task of `ids` has a final record: (time the first record of any
        state appeared, time the last final one was seen).

        Records are confirmed final from the oldest task on, a window of `WINDOW` at a time,
        while the worker runs: a window found all final is followed at once by the next one,
        else the next read waits a poll interval. At the end only what finished since the last
        poll is left to read, so the time returned is at most a poll interval and one read
        after the last result was stored. (Reading every record only once the last one
        existed, as an earlier version did, added the time to read all of them, about 50 ms
        for 20,000, to every drain.)

        Each read wakes Redis, which shares the machine with the worker: reads come every 5 ms
        until 95% of the tasks are confirmed, then every 1 ms."""
        deadline = time.perf_counter() + timeout
        while self.call("DBSIZE") == 0:
            if time.perf_counter() > deadline:
                raise BenchFailure(f"no result of {len(ids)} tasks stored after {timeout} s")
            time.sleep(poll)
        first = time.perf_counter()
        pending = collections.deque(ids)
        while True:
            window = [pending.popleft() for _ in range(min(WINDOW, len(pending)))]
            raw = self.raw_records(window)
            now = time.perf_counter()
            # A byte search, not a JSON decode (check_results decodes and checks every record
            # afterwards).
            left = [t for t, r in zip(window, raw) if r is None or not any(m in r for m in FINAL_MARKS)]
            pending.extendleft(reversed(left))
            if not pending:
                return first, now
            if now > deadline:
                raise BenchFailure(f"{len(pending)} of {len(ids)} tasks not finished after {timeout} s")
            if left:
                time.sleep(poll if len(pending) <= 0.05 * len(ids) else 5 * poll)

    def raw_records(self, ids: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for i in range(0, len(ids), 2000):
            chunk = ids[i : i + 2000]
            out.extend(self.call("MGET", *[f"dbtask:result:{{{t}}}" for t in chunk]))
        return out

    def records(self, ids: list[str]) -> list[dict | None]:
        return [None if v is None else json.loads(v) for v in self.raw_records(ids)]


FINAL = ("SUCCESS", "FAILURE", "REVOKED")
WINDOW = 256  # records read at once in Redis.wait_done
FINAL_MARKS = tuple(f'"state":"{state}"'.encode() for state in FINAL)


def first_result_at(port: int, timeout: float = TIMEOUT, poll: float = 0.001) -> float:
    """When the first record was stored (the database stopped being empty), polled on a
    connection of its own: for a thread watching while the tasks are still being published."""
    redis = Redis(port)
    try:
        deadline = time.perf_counter() + timeout
        while redis.call("DBSIZE") == 0:
            if time.perf_counter() > deadline:
                raise BenchFailure(f"no result stored after {timeout} s")
            time.sleep(poll)
        return time.perf_counter()
    finally:
        redis.sock.close()


def check_results(redis: Redis, ids: list[str], expected: list, what: str) -> int:
    if len(ids) != len(expected):
        raise BenchFailure(f"{what}: {len(ids)} task ids for {len(expected)} tasks")
    if len(set(ids)) != len(ids):
        raise BenchFailure(f"{what}: duplicate task ids")
    for tid, want, rec in zip(ids, expected, redis.records(ids)):
        if rec is None:
            raise BenchFailure(f"{what}: no result stored for task {tid} (expected {want!r})")
        if rec.get("state") != "SUCCESS" or rec.get("result") != want:
            raise BenchFailure(f"{what}: task {tid} has {rec!r}, expected SUCCESS {want!r}")
    return len(ids)


# ---------------------------------------------------------------------------------------------
# Processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live children (threads included), in seconds."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out.append(int(child))
                out.extend(descendants(int(child)))
    except FileNotFoundError:
        pass
    return out


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds used so far by the threads of a process, summed by thread name with its
    number dropped (`dbtask-py-3` counts as `dbtask-py-`); the worker's main thread is named
    after the binary."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip().rstrip("0123456789")
            out[name] = out.get(name, 0.0) + int((task / "schedstat").read_text().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def rss_mib(pid: int) -> float:
    total = 0
    for p in [pid, *descendants(pid)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size of a process tree: pages shared between its processes (the
    worker binary, libpython) counted once in all, not once per process as RSS does."""
    total = 0
    for p in [pid, *descendants(pid)]:
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


class CpuMeter:
    """CPU seconds used by each process of the benchmark between start() and stop()."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = procs

    def sample(self) -> dict[str, float]:
        s = {name: cpu_seconds(pid) for name, pid in self.procs.items()}
        t = os.times()
        s["client"] = t.user + t.system
        return s

    def __enter__(self) -> "CpuMeter":
        self.before = self.sample()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        after = self.sample()
        self.wall = time.perf_counter() - self.t0
        self.used = {k: after[k] - self.before.get(k, 0.0) for k in after}


class WorkerProc:
    def __init__(
        self,
        nats_url: str,
        redis_url: str,
        workdir: Path,
        concurrency: int | None = None,
        pool: str = "threads",
        extra: list[str] | tuple[str, ...] = (),
    ) -> None:
        cmd = [str(WORKER_BIN), "-A", "bench_tasks", "--queues", "default",
               "--nats-url", nats_url, "--redis-url", redis_url, "--log-level", "warn,dbtask_worker=info",
               *extra]  # fmt: skip
        if pool != "threads":
            cmd += ["--pool", pool]
        if concurrency is not None:
            cmd += ["--concurrency", str(concurrency)]
        self.log = workdir / f"worker-{time.monotonic_ns()}.log"
        self.spawned = time.perf_counter()
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=BENCH / "apps", env=worker_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if "worker ready" in self.log.read_text(errors="replace"):
                return time.perf_counter()
            if self.proc.poll() is not None:
                raise BenchFailure(f"the worker exited at start:\n{self.log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.002)
        raise BenchFailure("the worker did not log 'worker ready' within 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode not in (0, -signal.SIGTERM):
            raise BenchFailure(
                f"the worker exited with {self.proc.returncode}:\n{self.log.read_text(errors='replace')[-4000:]}"
            )


# ---------------------------------------------------------------------------------------------
# Workloads


async def w1_gather(n: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    ids: list[str] = []
    for start in range(0, n, GATHER_WINDOW):
        results = await asyncio.gather(*[add.delay(i, i) for i in range(start, min(n, start + GATHER_WINDOW))])
        ids.extend(r.id for r in results)
    return time.perf_counter() - t0, ids


async def w1_bulk(n: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    results = await add.apply_many([(i, i) for i in range(n)])
    return time.perf_counter() - t0, [r.id for r in results]


async def w1_sequential(n: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    ids = []
    for i in range(n):
        ids.append((await add.delay(i, i)).id)
    return time.perf_counter() - t0, ids


def w1_sequential_sync(n: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    ids = [add.delay_sync(i, i).id for i in range(n)]
    return time.perf_counter() - t0, ids


async def w3_latency() -> tuple[list[float], int]:
    times = []
    for _ in range(ROUND_TRIPS):
        t0 = time.perf_counter()
        r = await add.delay(1, 2)
        value = await r.get(timeout=10)
        times.append((time.perf_counter() - t0) * 1000)
        if value != 3:
            raise BenchFailure(f"W3: task {r.id} returned {value!r}, expected 3")
    return times, ROUND_TRIPS


def handover_us(same_core: bool, rounds: int = 5_000) -> float:
    """What one hand-over to a process asleep in a read costs on this machine, in µs: half the
    median round trip of a one-byte pipe ping-pong between two processes pinned to one core,
    or to two different cores. W3's round trip is a chain of such hand-overs, on whichever
    cores the scheduler picks."""
    cpus = sorted(os.sched_getaffinity(0))
    here, there = cpus[0], cpus[0] if same_core or len(cpus) < 2 else cpus[1]
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child echoes until it reads "q"
        try:
            os.sched_setaffinity(0, {there})
            while (b := os.read(to_child, 1)) and b != b"q":
                os.write(from_child, b)
        finally:
            os._exit(0)
    try:
        os.sched_setaffinity(0, {here})
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            os.write(from_parent, b"x")
            os.read(to_parent, 1)
            times.append(time.perf_counter() - t0)
    finally:
        os.write(from_parent, b"q")
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, set(cpus))
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)
    return statistics.median(times) / 2 * 1e6


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[round((len(s) - 1) * p)]


async def w5_chord(size: int = CHORD_SIZE) -> tuple[float, float, int] | None:
    if not hasattr(dbtask, "Chord") or not hasattr(add, "s"):
        return None
    t0 = time.perf_counter()
    chord = dbtask.Chord([add.s(i, i) for i in range(size)], tsum.s())
    result = await chord.delay()
    published = time.perf_counter() - t0
    value = await result.get(timeout=60)
    elapsed = time.perf_counter() - t0
    want = sum(2 * i for i in range(size))
    if value != want:
        raise BenchFailure(f"W5: the chord's callback returned {value!r}, expected {want}")
    return elapsed, published, 1


# ---------------------------------------------------------------------------------------------
# One repetition


async def repetition(nats, redis_srv, redis: Redis, workdir: Path) -> tuple[dict, int]:
    fig: dict = {}
    checked = 0
    procs = {"nats-server": nats.proc.pid, "redis-server": redis_srv.proc.pid}
    redis.call("FLUSHALL")

    # W1 (gather) with no worker running; W2 drains those tasks.
    with CpuMeter(procs) as cpu:
        secs, ids = await w1_gather(N)
    fig["W1 gather"] = N / secs
    fig["cpu W1 gather"] = (cpu.wall, cpu.used)

    worker = WorkerProc(nats.url, redis_srv.url, workdir)
    ready_at = asyncio.get_running_loop().run_in_executor(None, worker.wait_ready)
    meter = CpuMeter({**procs, "worker": worker.proc.pid})
    meter.__enter__()
    first, last = redis.wait_done(ids, TIMEOUT)
    meter.__exit__()
    ready = await ready_at
    fig["W2 from start"] = N / (last - worker.spawned)
    fig["W2 steady"] = (N - 1) / (last - first) if last > first else float("nan")
    fig["W2 startup s"] = ready - worker.spawned
    fig["cpu W2"] = (meter.wall, meter.used)
    fig["W2 worker threads"] = thread_cpu(worker.proc.pid)
    fig["W6 rss"] = rss_mib(worker.proc.pid)
    checked += check_results(redis, ids, [2 * i for i in range(N)], "W1 gather / W2")
    # The same worker once idle: it gives freed heap memory back within 2 s of its last task.
    time.sleep(IDLE_SETTLE)
    fig["W6 rss settled"] = rss_mib(worker.proc.pid)

    # What a hand-over between processes costs here, for W3's explanation (worker idle).
    fig["hop other core us"] = handover_us(same_core=False)
    fig["hop same core us"] = handover_us(same_core=True)

    # W3 with the worker idle and warm.
    with CpuMeter({**procs, "worker": worker.proc.pid}) as cpu:
        times, n = await w3_latency()
    checked += n
    fig["W3 p50"] = pct(times, 0.5)
    fig["W3 p99"] = pct(times, 0.99)
    fig["cpu W3"] = (cpu.wall, cpu.used)
    worker.stop()

    # W2 variants (W2_VARIANTS): the same drain with and without each variant's flags, in turn.
    rates: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(W2_VARIANT_ROUNDS):
        for name, flags in [("plain", []), *W2_VARIANTS]:
            redis.call("FLUSHALL")
            results = await add.apply_many([(i, i) for i in range(N)])
            ids = [r.id for r in results]
            worker = WorkerProc(nats.url, redis_srv.url, workdir, extra=flags)
            worker.wait_ready()
            first, last = redis.wait_done(ids, TIMEOUT)
            rates[name].append((N - 1) / (last - first) if last > first else float("nan"))
            checked += check_results(redis, ids, [2 * i for i in range(N)], f"W2 variant {name}")
            worker.stop()
        # W9: the drain shared by several workers on one queue, next to one worker in the same
        # round. Both start on an empty queue and are ready before the tasks are published (a
        # worker that started first would otherwise drain alone while the others start), then
        # drain as `apply_many` publishes; first to last result.
        for label, count in (("W9 one", 1), ("W9", W9_WORKERS)):
            redis.call("FLUSHALL")
            workers = [WorkerProc(nats.url, redis_srv.url, workdir) for _ in range(count)]
            for worker in workers:
                worker.wait_ready()
            # The first result comes while the tasks are still being published: watched from
            # a thread of its own, on a connection of its own.
            first_seen = asyncio.get_running_loop().run_in_executor(None, first_result_at, redis_srv.port)
            results = await add.apply_many([(i, i) for i in range(N)])
            ids = [r.id for r in results]
            _, last = redis.wait_done(ids, TIMEOUT)
            first = await first_seen
            rates[label].append((N - 1) / (last - first) if last > first else float("nan"))
            checked += check_results(redis, ids, [2 * i for i in range(N)], f"{label} ({count} workers)")
            for worker in workers:
                worker.stop()
    for label in ("W9 one", "W9"):
        fig[label] = statistics.median(rates.pop(label))
    fig["W9 ratio"] = fig["W9"] / fig["W9 one"]
    for name, drained in rates.items():
        fig[f"W2v {name}"] = statistics.median(drained)
    for name, _ in W2_VARIANTS:
        fig[f"W2v {name} ratio"] = fig[f"W2v {name}"] / fig["W2v plain"]

    # W1 through the bulk path and sequentially, no worker; then drained and checked.
    with CpuMeter(procs) as cpu:
        secs, bulk_ids = await w1_bulk(N)
    fig["W1 bulk"] = N / secs
    fig["cpu W1 bulk"] = (cpu.wall, cpu.used)
    client_before = thread_cpu(os.getpid())
    with CpuMeter(procs) as cpu:
        secs, seq_ids = await w1_sequential(N)
    fig["W1 sequential"] = N / secs
    fig["cpu W1 sequential"] = (cpu.wall, cpu.used)
    client_after = thread_cpu(os.getpid())
    fig["W1 sequential client threads"] = {k: v - client_before.get(k, 0.0) for k, v in client_after.items()}
    n_sync = N // 4
    secs, sync_ids = await asyncio.to_thread(w1_sequential_sync, n_sync)
    fig["W1 sequential sync"] = n_sync / secs
    redis.call("FLUSHALL")
    worker = WorkerProc(nats.url, redis_srv.url, workdir, concurrency=W4_CONCURRENCY)
    worker.wait_ready()
    redis.wait_done(bulk_ids + seq_ids + sync_ids, TIMEOUT)
    expected = [2 * i for i in range(N)]
    checked += check_results(redis, bulk_ids, expected, "W1 bulk")
    checked += check_results(redis, seq_ids, expected, "W1 sequential")
    checked += check_results(redis, sync_ids, expected[:n_sync], "W1 sequential sync")

    # W4: async sleeps, concurrency 200, worker idle and warm.
    redis.call("FLUSHALL")
    threads_before = thread_cpu(worker.proc.pid)
    with CpuMeter({**procs, "worker": worker.proc.pid}) as cpu:
        t0 = time.perf_counter()
        results = await nap.apply_many([(i,) for i in range(W4_TASKS)])
        published = time.perf_counter() - t0
        _, last = redis.wait_done([r.id for r in results], TIMEOUT)
    fig["W4 s"] = last - t0
    fig["W4 publish s"] = published
    fig["cpu W4"] = (cpu.wall, cpu.used)
    fig["W4 worker threads"] = {k: v - threads_before.get(k, 0.0) for k, v in thread_cpu(worker.proc.pid).items()}
    checked += check_results(redis, [r.id for r in results], list(range(W4_TASKS)), "W4")

    w5 = await w5_chord()
    if w5 is not None:
        fig["W5 s"], fig["W5 publish s"], n = w5
        checked += n
        fig["W5 large s"], _, n = await w5_chord(CHORD_SIZE_LARGE)
        checked += n
    worker.stop()

    # For W6's bound: what a fresh worker holds before it has run anything (queues empty).
    idle = WorkerProc(nats.url, redis_srv.url, workdir)
    idle.wait_ready()
    fig["W6 rss idle"] = rss_mib(idle.proc.pid)
    idle.stop()

    if not HAS_POOL:
        return fig, checked
    # W2 and W6 again with the pool of processes (concurrency = cores): what the hand-over to a
    # child costs on trivial tasks, and what the children weigh.
    redis.call("FLUSHALL")
    results = await add.apply_many([(i, i) for i in range(N)])
    ids = [r.id for r in results]
    worker = WorkerProc(nats.url, redis_srv.url, workdir, concurrency=CORES, pool="processes")
    fig["W2 startup s processes"] = worker.wait_ready() - worker.spawned
    first, last = redis.wait_done(ids, TIMEOUT)
    fig["W2 steady processes"] = (N - 1) / (last - first) if last > first else float("nan")
    fig["W6 rss processes"] = rss_mib(worker.proc.pid)
    fig["W6 pss processes"] = pss_mib(worker.proc.pid)
    checked += check_results(redis, ids, [2 * i for i in range(N)], "W2 processes")
    worker.stop()

    # W7: CPU-bound sync tasks, pre-queued, drained by the thread pool, then by the pool of
    # processes, both with concurrency = cores; timed from `worker ready` to the last result.
    for pool in ("threads", "processes"):
        redis.call("FLUSHALL")
        results = await crunch.apply_many([(W7_ROUNDS,)] * W7_TASKS)
        ids = [r.id for r in results]
        worker = WorkerProc(nats.url, redis_srv.url, workdir, concurrency=CORES, pool=pool)
        ready = worker.wait_ready()
        _, last = redis.wait_done(ids, TIMEOUT)
        fig[f"W7 {pool} s"] = last - ready
        checked += check_results(redis, ids, [W7_RESULT] * W7_TASKS, f"W7 {pool}")
        worker.stop()
    fig["W7 speed-up"] = fig["W7 threads s"] / fig["W7 processes s"]
    # The ideal: the same calls made here, one after another, spread perfectly over the cores.
    t0 = time.perf_counter()
    for _ in range(20):
        crunch(W7_ROUNDS)
    fig["W7 ideal s"] = W7_TASKS * (time.perf_counter() - t0) / 20 / CORES
    fig["W7 vs ideal"] = fig["W7 processes s"] / fig["W7 ideal s"]
    return fig, checked


async def w8_scheduled(nats, redis_srv, redis: Redis, workdir: Path) -> tuple[dict, int]:
    """W8: W8_TASKS tasks for one eta W8_COUNTDOWN s ahead, published while a worker runs; what
    the worker holds while they wait, and how late after the eta they start."""
    redis.call("FLUSHALL")
    worker = WorkerProc(nats.url, redis_srv.url, workdir)
    worker.wait_ready()
    rss_before = rss_mib(worker.proc.pid)
    eta = datetime.now(timezone.utc) + timedelta(seconds=W8_COUNTDOWN)
    t0 = time.perf_counter()
    results = []
    for start in range(0, W8_TASKS, 10_000):
        chunk = [(i, i) for i in range(start, min(W8_TASKS, start + 10_000))]
        results += await add.apply_many(chunk, eta=eta)
    fig = {"W8 enqueue": W8_TASKS / (time.perf_counter() - t0)}
    await asyncio.sleep(max(0.0, eta.timestamp() - time.time() - 2))
    fig["W8 rss growth"] = rss_mib(worker.proc.pid) - rss_before
    ids = [r.id for r in results]
    redis.wait_done(ids, TIMEOUT + W8_COUNTDOWN)
    checked = check_results(redis, ids, [2 * i for i in range(W8_TASKS)], "W8")
    late = sorted(rec["date_started"] - eta.timestamp() for rec in redis.records(ids))
    fig["W8 early"] = float(sum(x < 0 for x in late))
    fig["W8 late p50"] = pct(late, 0.5) * 1000
    fig["W8 late p99"] = pct(late, 0.99) * 1000
    worker.stop()
    return fig, checked


def run_baseline(nats_url: str, redis_url: str) -> dict:
    out = subprocess.run([str(BASELINE_BIN), nats_url, redis_url, str(N)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise BenchFailure(f"the Rust baseline failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------------------------
# Report


def first_line(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def versions() -> dict[str, str]:
    import tomllib

    version = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    rev = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "dbtask": f"{version} ({rev}{', uncommitted changes' if dirty else ''})",
        "nats-server": first_line([str(NATS_BIN), "--version"]),
        "redis-server": first_line([REDIS_BIN, "--version"]),
        "Python": platform.python_version(),
        "rustc": first_line(["rustc", "--version"]),
        "machine": f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}",
    }


def med(xs):
    return statistics.median(xs)


def fmt(v: float, unit: str) -> str:
    if unit == "/s":
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.2f}"
    if unit == "s":
        return f"{v:.3f}"
    if unit == "×":
        return f"{v:.2f}"
    if unit == "tasks":
        return f"{v:,.0f}"
    return f"{v:.1f}"


class Of(NamedTuple):
    """A target relative to another figure of the same run: `share` times the median of the
    Rust-only baseline's figure `raw` (the row's baseline key when None), or of dbtask's own
    figure `fig`."""

    share: float
    fig: str | None = None


# A row's target: None, an absolute figure (in the row's unit), or Of(...) (issue 22: targets
# as fractions of the raw limit measured in the same run, so they hold on any machine).
ROWS = [
    # key, label, unit, target, higher is better, baseline key
    ("W1 gather", "W1 enqueue, `asyncio.gather` of `delay()` (windows of 5,000)", "/s", Of(0.90), True, "enqueue_window_per_s"),
    ("W1 bulk", "W1 enqueue, `apply_many`", "/s", Of(0.90), True, "enqueue_window_per_s"),
    ("W1 sequential", "W1 enqueue, sequential `await delay()`", "/s", Of(0.85), True, "enqueue_sequential_per_s"),
    ("W1 sequential sync", "W1 enqueue, sequential `delay_sync()` (N/4)", "/s", None, True, "enqueue_sequential_per_s"),
    ("W2 from start", "W2 drain, worker start to last result", "/s", Of(0.65), True, "drain_per_s"),
    ("W2 steady", "W2 drain, first to last result", "/s", Of(0.75), True, "drain_per_s"),
    ("W2 startup s", "W2 worker start until `worker ready`", "s", None, False, None),
    ("W2q kept", "W2 drain, worker start until the stream is empty (bench/ignored.py)", "/s", None, True, "drain_per_s"),
    ("W2q ignored", "the same with `ignore_result=True`", "/s", None, True, "drain_per_s"),
    ("W2q speed-up", "`ignore_result=True` ÷ results kept, same run", "×", None, True, None),
    ("W2q records", "records left by the `ignore_result` drain", "tasks", None, False, None),
    ("W3 p50", "W3 round trip p50", "ms", Of(1.4), False, "rt_p50_ms"),
    ("W3 p99", "W3 round trip p99", "ms", Of(1.5), False, "rt_p99_ms"),
    ("W4 s", "W4 2,000 × `asyncio.sleep(0.05)`, concurrency 200 (ideal 0.50 s)", "s", 1.05 * 0.50, False, None),
    ("W5 s", "W5 chord of 1,000 `add` + `tsum`", "s", 0.05, False, None),
    ("W5 large s", "W5 chord of 10,000 `add` + `tsum`", "s", 0.5, False, None),
    ("W6 rss", "W6 worker RSS after W2 (process tree)", "MiB", 25, False, None),
    ("W6 rss settled", "W6 worker RSS after W2, then 2.5 s idle", "MiB", None, False, None),
    ("W2 steady processes", "W2 drain, first to last result, `--pool processes`, concurrency = cores", "/s", None, True, "drain_per_s"),
    ("W2 startup s processes", "W2 worker start until `worker ready`, `--pool processes` (children started and ready)", "s", None, False, None),
    ("W6 rss processes", "W6 RSS of the process tree after W2, `--pool processes`", "MiB", None, False, None),
    ("W6 pss processes", "W6 PSS of the process tree after W2, `--pool processes`", "MiB", None, False, None),
    ("W7 threads s", "W7 400 × 10 ms CPU, `--pool threads`, concurrency = cores", "s", None, False, None),
    ("W7 processes s", "W7 400 × 10 ms CPU, `--pool processes`, concurrency = cores", "s", None, False, None),
    ("W7 speed-up", "W7 threads ÷ processes (target on 2 cores)", "×", 1.8, True, None),
    ("W7 ideal s", "W7 ideal: 400 calls timed in the bench process ÷ cores", "s", None, False, None),
    ("W7 vs ideal", "W7 processes ÷ ideal", "×", 1.15, False, None),
    ("W2v plain", f"W2 drain, first to last result, tasks from `apply_many` (median of {W2_VARIANT_ROUNDS} rounds taken in turn with the variants below): their reference", "/s", None, True, "drain_per_s"),
    *[
        row
        for name, flags in W2_VARIANTS
        for row in (
            (f"W2v {name}", f"the same drain with `{' '.join(flags)}`", "/s", None, True, "drain_per_s"),
            (f"W2v {name} ratio", f"`{' '.join(flags)}` ÷ the reference, same run (1 = no cost)", "×", None, True, None),
        )
    ],
    ("W8 enqueue", f"W8 enqueue {W8_TASKS:,} tasks for one eta 30 s ahead (`apply_many`, 10,000 a call)", "/s", Of(0.80, fig="W1 bulk"), True, None),
    ("W8 rss growth", "W8 worker RSS growth while they wait", "MiB", 2, False, None),
    ("W8 early", "W8 tasks started before their eta", "tasks", 0, False, None),
    ("W8 late p50", "W8 start after the eta, p50", "ms", None, False, None),
    ("W8 late p99", "W8 start after the eta, p99", "ms", 500, False, None),
    ("W9 one", f"W9 reference: one worker, ready before the {N:,} tasks are published, first to last result (median of {W2_VARIANT_ROUNDS} rounds in turn with W9)", "/s", None, True, "drain_per_s"),
    ("W9", f"W9 the same drain shared by {W9_WORKERS} workers on one queue", "/s", Of(0.90, fig="W9 one"), True, "drain_per_s"),
    ("W9 ratio", f"W9 {W9_WORKERS} workers ÷ one, same run", "×", None, True, None),
]


def threshold(target, bkey: str | None, figs: list[dict], base: list[dict]) -> float | None:
    """The figure a row must reach in this run: its target made absolute."""
    if not isinstance(target, Of):
        return target
    if target.fig is not None:
        xs = [f[target.fig] for f in figs if target.fig in f]
        return target.share * med(xs) if xs else None
    return target.share * med([b[bkey] for b in base])


def target_text(target, higher: bool, unit: str, limit: float) -> str:
    sign = "≥" if higher else "≤"
    if not isinstance(target, Of):
        return f"{sign} {fmt(limit, unit)} {UNIT_NAME[unit]}"
    of = f"dbtask's {target.fig}" if target.fig else "raw"
    share = f"{target.share:.0%} of {of}" if higher or target.fig else f"{target.share:.2f}× raw"
    return f"{sign} {share} = {fmt(limit, unit)} {UNIT_NAME[unit]}"

UNIT_NAME = {"/s": "tasks/s", "ms": "ms", "s": "s", "MiB": "MiB", "×": "×", "tasks": "tasks"}


def report(figs: list[dict], base: list[dict], checked: int, vers: dict, started: datetime, took: float) -> str:
    lines = [
        f"# dbtask benchmark, {started:%Y-%m-%d %H:%M} UTC",
        "",
        "Workloads: bench/WORKLOADS.md (W1-W9; W8 once, after the last run). Reproduce with `make bench`.",
        "Targets (issue 22) are fractions of the Rust-only baseline measured in this run (\"raw\"), "
        "or of another figure of this run, so that they mean the same on any machine.",
        f"Each figure: median of {len(figs)} runs (min-max). N = {N:,} tasks for W1/W2. "
        f"**{checked:,} results checked**, all correct.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in vers.items()],
        "",
        "## Rust-only baseline (raw JetStream + Redis, no Python, no dbtask code)",
        "",
        "| figure | median | min-max |",
        "|---|---|---|",
    ]
    for key, label, unit in [
        ("enqueue_window_per_s", "enqueue, window of 4,096 confirmed publishes", "/s"),
        ("enqueue_sequential_per_s", "enqueue, one confirmed publish at a time", "/s"),
        ("drain_per_s", "drain: pull 500, pipelined SET+PUBLISH, ack", "/s"),
        ("rt_p50_ms", "round trip p50", "ms"),
        ("rt_p99_ms", "round trip p99", "ms"),
    ]:
        xs = [b[key] for b in base]
        lines.append(f"| {label} | {fmt(med(xs), unit)} {UNIT_NAME[unit]} | {fmt(min(xs), unit)}-{fmt(max(xs), unit)} |")
    lines += [
        "",
        "## dbtask",
        "",
        "| workload | median | min-max | target | vs raw limit | met |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, unit, target, higher, bkey in ROWS:
        xs = [f[key] for f in figs if key in f]
        if not xs:
            why = "needs the workflows issue (`dbtask.Chord`)" if key.startswith("W5") else "this worker has no `--pool`"
            lines.append(f"| {label} | not measured: {why} | | | | |")
            continue
        m = med(xs)
        vs = ""
        if bkey:
            b = med([x[bkey] for x in base])
            vs = f"{m / b:.0%} of raw" if higher else f"{m / b:.1f}× raw"
        met = ""
        limit = threshold(target, bkey, figs, base)
        if limit is not None:
            met = "yes" if (m >= limit if higher else m <= limit) else "**no**"
            tgt = target_text(target, higher, unit, limit)
        else:
            tgt = ""
        lines.append(f"| {label} | {fmt(m, unit)} {UNIT_NAME[unit]} | {fmt(min(xs), unit)}-{fmt(max(xs), unit)} | {tgt} | {vs} | {met} |")
    lines += [
        "",
        "## CPU split (median run, CPU seconds per process over the workload's wall time)",
        "",
        "| workload | wall s | nats-server | redis-server | worker | client (this process) |",
        "|---|---|---|---|---|---|",
    ]
    for key in ["cpu W1 gather", "cpu W1 bulk", "cpu W1 sequential", "cpu W2", "cpu W3", "cpu W4"]:
        runs = sorted((f[key] for f in figs), key=lambda wu: wu[0])
        wall, used = runs[len(runs) // 2]
        cells = [f"{used.get(p, 0):.2f} ({used.get(p, 0) / wall:.0%})" if p in used else "-"
                 for p in ("nats-server", "redis-server", "worker", "client")]  # fmt: skip
        lines.append(f"| {key[4:]} | {wall:.3f} | " + " | ".join(cells) + " |")
    lines += bounds(figs, base)
    lines += [
        "",
        "A percentage is of one core; the machine has "
        f"{os.cpu_count()} cores, so the four processes share {os.cpu_count() * 100}%. "
        "The client column includes the harness (result polling in W2/W4).",
        "",
        f"Total time of the run: {took:.0f} s.",
        "",
    ]
    return "\n".join(lines)


# What each timed workload did, for the CPU-per-task figures: (cpu key, figure key, task count).
BOUND_ROWS = [
    ("cpu W1 gather", "W1 gather", N),
    ("cpu W1 bulk", "W1 bulk", N),
    ("cpu W1 sequential", "W1 sequential", N),
    ("cpu W2", "W2 from start", N),
    ("cpu W2", "W2 steady", N),
    ("cpu W3", "W3 p50", ROUND_TRIPS),
    ("cpu W3", "W3 p99", ROUND_TRIPS),
    ("cpu W4", "W4 s", W4_TASKS),
]


def bounds(figs: list[dict], base: list[dict]) -> list[str]:
    """For each workload whose target is missed: CPU microseconds per task of each process and
    the busiest one, so the report names what bounds the figure."""
    targets = {
        key: (limit, higher)
        for key, _, _, target, higher, bkey in ROWS
        if (limit := threshold(target, bkey, figs, base)) is not None
    }
    units = {key: unit for key, _, unit, _, _, _ in ROWS}
    raw_keys = {key: bkey for key, _, _, _, _, bkey in ROWS}
    cores = os.cpu_count() or 1
    out = ["", "## What bounds the missed targets", ""]
    missed = False
    w3_said = False
    for cpu_key, fig_key, tasks in BOUND_ROWS:
        xs = [f[fig_key] for f in figs if fig_key in f]
        if not xs or fig_key not in targets:
            continue
        target, higher = targets[fig_key]
        m = med(xs)
        if (m >= target) if higher else (m <= target):
            continue
        missed = True
        runs = sorted((f[cpu_key] for f in figs), key=lambda wu: wu[0])
        wall, used = runs[len(runs) // 2]
        per_task = {p: used[p] / tasks * 1e6 for p in used}
        busiest = max(per_task, key=per_task.get)
        total = sum(used.values())
        cells = ", ".join(f"{p} {v:.1f}" for p, v in sorted(per_task.items(), key=lambda kv: -kv[1]))
        out.append(
            f"- **{fig_key}** ({fmt(m, units[fig_key])}): CPU µs per task: {cells}. "
            f"Busiest: {busiest} at {used[busiest] / wall:.0%} of a core; the processes together "
            f"{total / wall:.0%} of the {cores * 100}% the machine has."
        )
        if higher:
            # All the CPU the processes need per task, spread perfectly over every core: no
            # scheduling of the same work on this machine gets past this rate.
            ceiling = cores * tasks / total
            out.append(
                f"  Together the processes need {total / tasks * 1e6:.1f} µs of CPU per task: "
                f"{cores} cores at full use give at most {fmt(ceiling, '/s')} tasks/s"
                + (", below the target." if ceiling < target else ".")
            )
        bkey = raw_keys.get(fig_key)
        if bkey:
            raw = [b[bkey] for b in base]
            rm = med(raw)
            above = (target > rm) if higher else (target < rm)
            out.append(
                f"  The Rust-only baseline on the same servers reaches {fmt(rm, units[fig_key])} "
                f"({fmt(min(raw), units[fig_key])}-{fmt(max(raw), units[fig_key])}) in this run"
                + (
                    ": the target is beyond the raw limit of JetStream and Redis on this machine, "
                    "so no client or worker on top of them can meet it here."
                    if above
                    else "."
                )
            )
        startup = [f["W2 startup s"] for f in figs if "W2 startup s" in f]
        if fig_key == "W2 from start" and startup:
            steady = med([f["W2 steady"] for f in figs if "W2 steady" in f])
            out.append(
                f"  Of the {N / m:.3f} s from the worker's start, {med(startup):.3f} s pass before it is "
                "ready (the embedded CPython starting and importing asyncio, `dbtask` and the task "
                f"module, then the NATS and Redis set-up); the drain itself runs at {fmt(steady, '/s')} tasks/s."
            )
            threads = [f["W2 worker threads"] for f in figs if "W2 worker threads" in f]
            if threads:
                names = sorted({name for t in threads for name in t})
                split = ", ".join(
                    f"`{name}` {med([t.get(name, 0.0) for t in threads]) / N * 1e6:.1f}" for name in names
                )
                out.append(
                    f"  The worker's CPU µs per task by thread, start-up included: {split} (the main "
                    "thread moves messages; `dbtask-py-` threads run the sync tasks)."
                )
        if fig_key == "W1 sequential" and bkey:
            raw_us = 1e6 / med([b[bkey] for b in base])
            hops = [f["hop other core us"] for f in figs if "hop other core us" in f]
            threads = [f["W1 sequential client threads"] for f in figs if "W1 sequential client threads" in f]
            io = med([t.get("dbtask-io", 0.0) for t in threads]) / N * 1e6 if threads else 0.0
            caller = med([t.get("python", 0.0) for t in threads]) / N * 1e6 if threads else 0.0
            out.append(
                f"  One publish at a time is latency: each waits for its confirmation. The baseline "
                f"takes {raw_us:.0f} µs per confirmed publish, dbtask {1e6 / m:.0f} µs: it adds two "
                "hand-overs between sleeping threads (the caller's asyncio thread to the client's I/O "
                "thread, and the confirmation back)"
                + (f", {med(hops):.1f} µs each to another core in this run" if hops else "")
                + f", and the Python code of `delay()` and of the awaiting loop. The client's I/O "
                f"thread spends {io:.1f} µs of CPU per publish (it sleeps and wakes twice per publish: "
                f"most of it is the kernel's context switches), its caller's thread {caller:.1f} µs."
            )
        if fig_key in ("W3 p50", "W3 p99") and not w3_said:
            w3_said = True
            out.append(
                "  A round trip is latency, not CPU: each hand-over to a thread or process that "
                "sleeps waits for its wake-up. The baseline's round trip has four (client to "
                "NATS, NATS to the responder, responder to Redis, Redis to the client); dbtask's "
                "has four more: in the client, the caller's asyncio thread to the client's I/O "
                "thread and back, and in the worker, its I/O thread to a Python thread and back."
            )
            hops = [f["hop other core us"] for f in figs if "hop other core us" in f]
            if hops:
                other = med(hops)
                same = med([f["hop same core us"] for f in figs])
                which = fig_key.split()[-1]
                raw_rt = med([b[raw_keys[fig_key]] for b in base])
                out.append(
                    f"  Measured in this run, a hand-over to a process asleep on another core "
                    f"costs {other:.1f} µs here, {same:.1f} µs on the same core (half a pipe "
                    f"ping-pong's round trip between two pinned processes). The four extra "
                    f"hand-overs thus cost {4 * same / 1000:.2f}-{4 * other / 1000:.2f} ms of the "
                    f"{m - raw_rt:.2f} ms between dbtask's {which} and the baseline's, depending on "
                    "where the scheduler puts the threads. The rest is work on both sides: the "
                    "Python code (`delay()`, `get()`, the task call), the system calls that wake "
                    "each sleeping thread, and the worker's result write."
                )
        if fig_key == "W4 s":
            threads = [f["W4 worker threads"] for f in figs if "W4 worker threads" in f]
            aio = med([t.get("dbtask-asyncio", 0.0) for t in threads]) / W4_TASKS * 1e6 if threads else 0.0
            io = med([t.get("dbtask-worker", 0.0) for t in threads]) / W4_TASKS * 1e6 if threads else 0.0
            publish = med([f["W4 publish s"] for f in figs if "W4 publish s" in f] or [0.0])
            waves = W4_TASKS // W4_CONCURRENCY
            out.append(
                f"  The ideal is {waves} waves of {W4_CONCURRENCY} tasks × 0.05 s = {waves * 0.05:.2f} s. "
                f"Between two waves the worker finishes {W4_CONCURRENCY} tasks and starts the next "
                f"{W4_CONCURRENCY}: its asyncio thread spends {aio:.1f} µs of CPU per task on that "
                f"(the coroutine, its asyncio Task, the result's encoding) and its I/O thread {io:.1f} µs, "
                f"about {aio * W4_CONCURRENCY / 1000:.1f} ms per wave on the asyncio thread alone; "
                f"publishing the 2,000 tasks takes {publish:.3f} s, during which the first wave starts."
            )
    rss = [f["W6 rss"] for f in figs if "W6 rss" in f]
    idle = [f["W6 rss idle"] for f in figs if "W6 rss idle" in f]
    settled = [f["W6 rss settled"] for f in figs if "W6 rss settled" in f]
    if rss and idle and "W6 rss" in targets and med(rss) > targets["W6 rss"][0]:
        missed = True
        out.append(
            f"- **W6** ({med(rss):.1f} MiB): a fresh worker holds {med(idle):.1f} MiB once it is ready "
            "and before it runs anything (the embedded CPython with `dbtask` and the task module "
            f"imported, the tokio runtime, the Python thread pool); W2 adds {med(rss) - med(idle):.1f} MiB "
            "(mostly heap: the handler futures and buffers of the tasks in flight, which malloc keeps "
            "until the worker trims it once idle"
            + (f": {med(settled):.1f} MiB after 2.5 s idle)." if settled else ").")
        )
    w5 = [f["W5 s"] for f in figs if "W5 s" in f]
    if w5 and "W5 s" in targets and med(w5) > targets["W5 s"][0]:
        missed = True
        publish = med([f["W5 publish s"] for f in figs if "W5 publish s" in f])
        out.append(
            f"- **W5** ({med(w5):.3f} s): building and publishing the 1,000 members (one message each, "
            f"confirmed) takes {publish:.3f} s of it; the worker starts on them as they arrive, "
            "then each member's result is counted by a Lua script before the last one publishes "
            "the callback."
        )
    if not missed:
        out.append("Every measured target is met.")
    else:
        out += [
            "",
            "A busiest process near 100% of a core is the bound (the client and the worker each "
            "run Python on one thread). Processes together well below the machine's total mean the "
            "workload waits on round trips, or on other load on the machine (compare with the "
            "baseline's spread).",
        ]
    return out


def byte_compile() -> None:
    """Byte-compiles `dbtask` and the bench's task module, as installing a wheel does (pip
    compiles at install time). `make build` installs the client in editable mode, which leaves
    that to the first import; where PYTHONDONTWRITEBYTECODE is set, every worker start would
    compile them again, about 10 ms of W2's start-up that a deployed worker does not pay."""
    for path in (Path(dbtask.__file__).parent, BENCH / "apps"):
        compileall.compile_dir(str(path), quiet=1)


async def main() -> int:
    started = datetime.now(timezone.utc)
    byte_compile()
    t_start = time.perf_counter()
    for path, what in [(WORKER_BIN, "make build"), (BASELINE_BIN, "cargo build --release -p dbtask-bench-baseline")]:
        if not path.exists():
            print(f"{path} is missing: run {what} (make bench does)", file=sys.stderr)
            return 2
    vers = versions()
    with tempfile.TemporaryDirectory(prefix="dbtask-bench-") as tmp:
        workdir = Path(tmp)
        monitor_conf, monitor = ignored.monitor_config()
        nats = start_nats(workdir / "nats", config=monitor_conf)
        redis_srv = start_redis(workdir / "redis")
        try:
            redis = Redis(redis_srv.port)
            await dbtask.init(nats_url=nats.url, redis_url=redis_srv.url)
            base, figs, checked = [], [], 0
            for r in range(REPEATS):
                print(f"run {r + 1}/{REPEATS}: baseline...", file=sys.stderr, flush=True)
                b = await asyncio.to_thread(run_baseline, nats.url, redis_srv.url)
                base.append(b)
                checked += b["checked"]
                print(f"run {r + 1}/{REPEATS}: dbtask...", file=sys.stderr, flush=True)
                fig, n = await repetition(nats, redis_srv, redis, workdir)
                fig.update(await ignored.w2_ignore(N, monitor, redis, lambda: WorkerProc(nats.url, redis_srv.url, workdir), TIMEOUT))
                figs.append(fig)
                checked += n
                brief = {k: round(v, 3) for k, v in fig.items() if isinstance(v, float)}
                print(f"  baseline {b}\n  dbtask {brief}", file=sys.stderr, flush=True)
            if W8_TASKS:
                print(f"W8: {W8_TASKS:,} tasks {W8_COUNTDOWN:.0f} s ahead...", file=sys.stderr, flush=True)
                w8, n = await w8_scheduled(nats, redis_srv, redis, workdir)
                figs[-1].update(w8)  # measured once: shown as the median of one run
                checked += n
            await dbtask.close()
        except BenchFailure as e:
            print(f"\nBENCHMARK FAILED: {e}", file=sys.stderr)
            return 1
        finally:
            nats.stop()
            redis_srv.stop()
    text = report(figs, base, checked, vers, started, time.perf_counter() - t_start)
    if not any("W5 s" in f for f in figs):
        print("W5 not measured: needs the workflows issue (dbtask.Chord)", file=sys.stderr)
    out = BENCH / "results" / f"{started:%Y-%m-%d}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"report written to {out.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
