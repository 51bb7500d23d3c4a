"""The worker's --http-addr endpoint (/metrics, /livez, /readyz) and systemd's notify protocol,
against real servers and a real worker (docs/operations.md)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import dbtask
from e2e_support import APPS, WORKER_BIN, free_port, start_redis, worker_env
from metrics_tasks import async_ok, block_the_loop, boom, nap, ok, retry_once

APP = "metrics_tasks"


@dbtask.task(name="metrics.never_registered")
def ghost(x):
    return x


def http_get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


async def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    return await asyncio.to_thread(http_get, url, accept)


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """The samples of a Prometheus text scrape: (name, labels) -> value."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        samples[(name, frozenset(LABEL.findall(labels or "")))] = float(value)
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(base: str) -> dict:
    status, content_type, text = await get(f"{base}/metrics")
    assert status == 200, text
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    return parse(text)


async def eventually(check, timeout: float = 10.0):
    """Retries `check()` (an async function raising AssertionError) until it passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
def http(worker_factory):
    """start(**kw) starts a worker of metrics_tasks with --http-addr; returns (worker, base URL)."""

    def start(*, args=(), **kw):
        port = free_port()
        w = worker_factory(APP, args=["--http-addr", f"127.0.0.1:{port}", *args], **kw)
        return w, f"http://127.0.0.1:{port}"

    return start


async def test_metrics_count_each_outcome_per_task(http, client):
    _, base = http()
    assert (await get(f"{base}/livez"))[0] == 200
    results = [await ok.delay(i) for i in range(3)]
    results += [await async_ok.delay(1)]
    results += [await boom.delay("no") for _ in range(2)]
    results += [await retry_once.delay()]
    results += [await ghost.delay(1) for _ in range(2)]
    for result in results:
        try:
            await result.get(timeout=15)
        except Exception:  # boom's ValueError, ghost's UnknownTask
            pass

    async def counted():
        samples = await scrape(base)
        total = "dbtask_tasks_total"
        expected = {
            ("metrics_tasks.ok", "succeeded"): 3,
            ("metrics_tasks.async_ok", "succeeded"): 1,
            ("metrics_tasks.boom", "failed"): 2,
            ("metrics_tasks.retry_once", "retried"): 1,
            ("metrics_tasks.retry_once", "succeeded"): 1,
            ("metrics.never_registered", "rejected"): 2,
            ("metrics_tasks.ok", "failed"): 0,
            ("metrics_tasks.nap", "succeeded"): 0,
        }
        for (task, state), count in expected.items():
            got = value(samples, total, task=task, queue="default", state=state)
            assert got == count, f"{task} {state}: {got}, expected {count}"
        # One runtime and one queue wait per run (a rejected task never runs).
        for task, runs in [("ok", 3), ("async_ok", 1), ("boom", 2), ("retry_once", 2), ("nap", 0)]:
            for histogram in ("dbtask_task_runtime_seconds", "dbtask_task_queue_wait_seconds"):
                got = value(samples, f"{histogram}_count", task=f"metrics_tasks.{task}")
                assert got == runs, f"{histogram} of {task}: {got}, expected {runs}"
                inf = value(samples, f"{histogram}_bucket", task=f"metrics_tasks.{task}", le="+Inf")
                assert inf == runs
        assert value(samples, "dbtask_task_runtime_seconds_count", task="metrics.never_registered") is None
        return samples

    samples = await eventually(counted)
    assert value(samples, "dbtask_worker_info", version="0.1.0", pool="threads") == 1
    assert value(samples, "dbtask_worker_concurrency") == 4
    assert value(samples, "dbtask_tasks_running") == 0
    assert value(samples, "dbtask_tasks_prefetched") == 0
    for name in (
        "dbtask_nats_connection_errors_total",
        "dbtask_nats_reconnects_total",
        "dbtask_redis_connection_errors_total",
        "dbtask_redis_reconnects_total",
        "dbtask_python_threads_abandoned_total",
        "dbtask_pool_processes_replaced_total",
    ):
        assert value(samples, name) == 0, name
    # OpenMetrics for a scraper that asks for it.
    status, content_type, text = await get(f"{base}/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text"), content_type
    assert text.rstrip().endswith("# EOF")
    assert 'dbtask_tasks_total{task="metrics_tasks.ok",queue="default",state="succeeded"} 3' in text


async def test_queue_pending_running_and_prefetched_reflect_a_backlog(http, client):
    # One slot, no prefetch: while `nap` runs, the rest waits in JetStream.
    _, base = http(concurrency=1, args=["--prefetch", "0"])
    napping = await nap.delay(2.5)

    async def running():
        samples = await scrape(base)
        assert value(samples, "dbtask_tasks_running") == 1

    await eventually(running)
    waiting = [await ok.delay(i) for i in range(5)]
    waiting += [await ok.apply_async(args=(9,), priority=9) for _ in range(2)]
    samples = await scrape(base)
    assert value(samples, "dbtask_queue_pending", queue="default", priority="5") == 5
    assert value(samples, "dbtask_queue_pending", queue="default", priority="9") == 2
    assert value(samples, "dbtask_queue_pending", queue="default", priority="0") == 0
    assert value(samples, "dbtask_tasks_prefetched") == 0
    assert await napping.get(timeout=15) == 2.5
    for result in waiting:
        await result.get(timeout=15)

    async def drained():
        samples = await scrape(base)
        for priority in range(10):
            assert value(samples, "dbtask_queue_pending", queue="default", priority=str(priority)) == 0
        assert value(samples, "dbtask_tasks_running") == 0
        assert value(samples, "dbtask_tasks_total", task="metrics_tasks.ok", queue="default", state="succeeded") == 7

    await eventually(drained)


async def test_two_workers_each_count_their_own_share(http, client):
    """A cluster of two: each worker counts the tasks it ran; together, every task once."""
    (_, first), (_, second) = http(), http()
    results = [await ok.delay(i) for i in range(40)]
    for result in results:
        await result.get(timeout=15)

    async def all_counted():
        shares = []
        for base in (first, second):
            samples = await scrape(base)
            shares.append(value(samples, "dbtask_tasks_total", task="metrics_tasks.ok", queue="default", state="succeeded"))
            assert value(samples, "dbtask_queue_pending", queue="default", priority="5") == 0
        assert sum(shares) == 40, shares
        return shares

    await eventually(all_counted)


async def test_livez_fails_while_the_asyncio_loop_is_blocked(http, client):
    _, base = http(args=["--liveness-timeout", "1"])
    status, _, body = await get(f"{base}/livez")
    assert status == 200, body
    assert json.loads(body)["live"] is True
    blocked = await block_the_loop.delay(3)

    async def stalled():
        status, content_type, body = await get(f"{base}/livez")
        assert status == 503, body
        assert content_type == "application/json"
        assert json.loads(body)["stalled"] == ["asyncio"]

    await eventually(stalled, timeout=5)
    assert await blocked.get(timeout=15) == 3

    async def live_again():
        status, _, body = await get(f"{base}/livez")
        assert status == 200, body

    await eventually(live_again, timeout=5)


async def test_readyz_names_redis_while_it_is_down(http, redis, tmp_path):
    _, base = http()
    status, _, body = await get(f"{base}/readyz")
    assert status == 200, body
    ready = json.loads(body)
    assert ready["ready"] is True and ready["failing"] == []
    assert ready["nats"]["ok"] and ready["redis"]["ok"] and ready["tasks"]["ok"]

    redis.stop()

    async def not_ready():
        status, content_type, body = await get(f"{base}/readyz")
        assert status == 503, body
        assert content_type == "application/json"
        ready = json.loads(body)
        assert ready["failing"] == ["redis"], ready
        assert not ready["redis"]["ok"] and ready["nats"]["ok"]

    await eventually(not_ready)
    # /livez does not care: the worker is alive, waiting for Redis.
    assert (await get(f"{base}/livez"))[0] == 200

    again = start_redis(tmp_path / "redis", port=redis.port)
    try:

        async def ready_again():
            status, _, body = await get(f"{base}/readyz")
            assert status == 200, body

        await eventually(ready_again)
        samples = await scrape(base)
        assert value(samples, "dbtask_redis_connection_errors_total") >= 1
        assert value(samples, "dbtask_redis_reconnects_total") >= 1
    finally:
        again.stop()


def run_worker(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(WORKER_BIN), "-A", APP, *args],
        cwd=APPS,
        env=worker_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_http_addr_from_flag_env_and_file_and_its_errors(tmp_path):
    shown = run_worker("--http-addr", "127.0.0.1:9808", "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert 'http_addr = "127.0.0.1:9808"' in shown.stdout
    assert "liveness_timeout = 30.0" in shown.stdout
    off = run_worker("--print-config")
    assert "http_addr" not in off.stdout
    env = run_worker("--print-config", env={"DBTASK_HTTP_ADDR": "0.0.0.0:9000"})
    assert 'http_addr = "0.0.0.0:9000"' in env.stdout
    config = tmp_path / "worker.toml"
    config.write_text('http_addr = "[::1]:9100"\n')
    from_file = run_worker("--config", str(config), "--print-config")
    assert 'http_addr = "[::1]:9100"' in from_file.stdout

    for bad, says in [("nowhere", "has no port"), ("127.0.0.1:99999", "not a port number"), ("::1:80", "brackets")]:
        refused = run_worker("--http-addr", bad)
        assert refused.returncode == 2, refused.stderr
        assert "invalid setting `http_addr`" in refused.stderr and says in refused.stderr, refused.stderr

    # A port in use fails at once, before Python or any server is touched.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        in_use = run_worker("--http-addr", f"127.0.0.1:{port}", "--nats-url", "nats://127.0.0.1:1")
    assert in_use.returncode == 1, in_use.stderr
    assert f"cannot serve --http-addr 127.0.0.1:{port}" in in_use.stderr
    assert "another process listens there" in in_use.stderr
    assert time.monotonic() - started < 10
    elsewhere = run_worker("--http-addr", "192.0.2.1:9808")
    assert elsewhere.returncode == 1
    assert "not an address of this machine" in elsewhere.stderr, elsewhere.stderr


async def test_systemd_ready_watchdog_and_stopping(worker_factory, tmp_path):
    """The notify protocol for real: a datagram socket stands in for systemd."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        manager.settimeout(0.2)
        # Watchdog every 0.6 s: fed every 0.3 s.
        w = worker_factory(APP, ready=False, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "600000"})
        seen: list[str] = []

        def receive_until(what: str, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if any(what in message.splitlines() for message in seen):
                    return
                try:
                    seen.append(manager.recv(4096).decode())
                except socket.timeout:
                    if w.proc.poll() is not None:
                        break
            pytest.fail(f"no {what} from the worker; got {seen}\n{w.describe()}", pytrace=False)

        receive_until("READY=1", 60)
        # READY=1 comes after the worker is ready, never before.
        assert "worker ready" in w.stderr
        ready = next(m for m in seen if "READY=1" in m.splitlines())
        assert "STATUS=serving queues default" in ready.splitlines()
        before = len([m for m in seen if "WATCHDOG=1" in m])
        receive_until("WATCHDOG=1", 5)
        time.sleep(1.0)
        while True:
            try:
                seen.append(manager.recv(4096).decode())
            except socket.timeout:
                break
        assert len([m for m in seen if "WATCHDOG=1" in m]) - before >= 2, seen
        w.send(signal.SIGTERM)
        receive_until("STOPPING=1", 15)
        assert w.wait(30) == 0


def test_the_shipped_units_verify(tmp_path):
    """`systemd-analyze verify` of deploy/*.service (with ExecStart pointing at the built
    worker, which verify requires to exist), where systemd is installed."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    deploy = APPS.parent.parent / "deploy"
    for unit, name in [("dbtask-worker.service", "dbtask-worker.service"), ("dbtask-worker@.service", "dbtask-worker@test.service")]:
        text = (deploy / unit).read_text()
        assert "\nType=notify\n" in text and "\nWatchdogSec=" in text, unit
        assert "ExecStart=/srv/myapp/.venv/bin/dbtask-worker " in text, unit  # the wheel's worker
        (tmp_path / name).write_text(text.replace("/srv/myapp/.venv/bin/dbtask-worker", str(WORKER_BIN)))
        checked = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and not checked.stderr.strip(), f"{unit}: {checked.stderr}"
