"""Helpers of the end-to-end tests: starting nats-server, redis-server and dbtask-worker
processes on free ports, and waiting for them. The fixtures in conftest.py use these; tests
import what they need from here (not from conftest, whose module name other suites share)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
APPS = TESTS / "apps"
VENV = REPO / ".venv"
WORKER_BIN = Path(os.environ.get("DBTASK_WORKER_BIN") or REPO / "target" / "release" / "dbtask-worker")
NATS_BIN = Path(os.environ.get("DBTASK_NATS_SERVER") or VENV / "bin" / "nats-server")
REDIS_BIN = os.environ.get("DBTASK_REDIS_SERVER") or "redis-server"

# The test process imports the same task modules as the workers, so both register the same names.
sys.path.insert(0, str(APPS))

READY_LINE = "worker ready"
WORKER_START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail_text(path: Path, limit: int = 12000) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "<no output>"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _wait_port(port: int, proc: subprocess.Popen, name: str, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} at start:\n{tail_text(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout} s:\n{tail_text(log)}")


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    """A server process we started: `url`, `port`, `log`."""

    def __init__(self, name: str, scheme: str, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.proc = proc
        self.log = log

    def stop(self) -> None:
        _stop(self.proc)


def start_nats(
    workdir: Path,
    *,
    jetstream: bool = True,
    binary: Path | str = NATS_BIN,
    port: int | None = None,
    config: str | None = None,
) -> Server:
    """nats-server on a free port (or on `port`, to bring a stopped one back with what its
    JetStream stored); JetStream stores under workdir. `config`: the text of a server config
    file (TLS, authorization...), written to workdir; the address, port and store stay flags."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = workdir / "nats.log"
    cmd = [str(binary), "-a", "127.0.0.1", "-p", str(port)]
    if config is not None:
        (workdir / "nats.conf").write_text(config)
        cmd += ["-c", str(workdir / "nats.conf")]
    if jetstream:
        cmd += ["-js", "-sd", str(workdir / "jetstream")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "nats-server", log)
    except BaseException:
        _stop(proc)
        raise
    return Server("nats-server", "nats", port, proc, log)


def start_redis(workdir: Path, port: int | None = None, args: Sequence[str] = ()) -> Server:
    """redis-server on a free port (or on `port`, to bring a stopped one back), no persistence
    unless `args` (more redis-server options, which win over these) asks for it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = workdir / "redis.log"
    cmd = [
        REDIS_BIN, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
        "--save", "", "--appendonly", "no", "--daemonize", "no", *args,
    ]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "redis-server", log)
    except BaseException:
        _stop(proc)
        raise
    return Server("redis-server", "redis", port, proc, log)


class RedisCluster:
    """A Redis Cluster of three masters we started (no replicas): `url` is its
    `redis+cluster://` URL, `nodes` its servers. Stands in for a `Server` in the fixtures."""

    name = "redis-cluster"

    def __init__(self, nodes: list[Server]) -> None:
        self.nodes = nodes
        self.port = nodes[0].port
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        self.log = nodes[0].log

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_redis_cluster(workdir: Path, masters: int = 3) -> RedisCluster:
    """`masters` redis-servers in cluster mode on free ports (their cluster bus ports chosen
    free too), joined by `redis-cli --cluster create`; returns once every node says the
    cluster is ok."""
    nodes: list[Server] = []
    try:
        for i in range(masters):
            node_dir = workdir / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            port = free_port()
            log = node_dir / "redis.log"
            cmd = [
                REDIS_BIN, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(node_dir),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000",
            ]  # fmt: skip
            with open(log, "ab") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            nodes.append(Server("redis-server", "redis", port, proc, log))
            _wait_port(port, proc, "redis-server", log)
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        deadline = time.monotonic() + 30
        for node in nodes:
            while True:
                info = subprocess.run(
                    ["redis-cli", "-p", str(node.port), "CLUSTER", "INFO"], capture_output=True, text=True
                ).stdout
                if "cluster_state:ok" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster is not ok after 30 s:\n{info}")
                time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return RedisCluster(nodes)


def redis_cli(server: Server | RedisCluster, *args: str) -> str:
    """`redis-cli` against a test's Redis (following a cluster's redirections)."""
    cmd = ["redis-cli", "-p", str(server.port)]
    if isinstance(server, RedisCluster):
        cmd.append("-c")
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


def scan_keys(server: Server | RedisCluster, pattern: str) -> list[str]:
    """The keys matching `pattern`, on every node of a cluster."""
    nodes = server.nodes if isinstance(server, RedisCluster) else [server]
    keys: list[str] = []
    for node in nodes:
        out = subprocess.run(
            ["redis-cli", "-p", str(node.port), "--scan", "--pattern", pattern],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        keys += out.stdout.split()
    return sorted(keys)


# The selected tests that run against a plain Redis and a 3-master Redis Cluster
# (`@PLAIN_AND_CLUSTER`); the `redis` fixture reads the parameter.
PLAIN_AND_CLUSTER = pytest.mark.parametrize("redis", ["plain", "cluster"], indirect=True)


class Worker:
    """A dbtask-worker process we started. Its stderr (the logs) goes to `stderr_path`."""

    def __init__(self, index: int, cmd: Sequence[str], proc: subprocess.Popen, stderr_path: Path, stdout_path: Path):
        self.index = index
        self.cmd = list(cmd)
        self.proc = proc
        self.stderr_path = stderr_path
        self.stdout_path = stdout_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return tail_text(self.stderr_path, limit=10**7)

    def describe(self) -> str:
        return (
            f"worker #{self.index} (pid {self.pid}, exit code {self.proc.poll()}): {' '.join(self.cmd)}\n"
            f"--- stderr ---\n{tail_text(self.stderr_path)}"
        )

    def wait_ready(self, timeout: float = WORKER_START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.stderr:
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the worker exited before it was ready:\n{self.describe()}", pytrace=False)
            time.sleep(0.05)
        pytest.fail(f"the worker did not log {READY_LINE!r} within {timeout} s:\n{self.describe()}", pytrace=False)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float) -> int:
        """Exit code; fails the test (with the worker's stderr) if it is still running."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within {timeout} s:\n{self.describe()}", pytrace=False)

    async def wait_async(self, timeout: float) -> int:
        return await asyncio.to_thread(self.wait, timeout)


WorkerFactory = Callable[..., Worker]

DBTASK_CLI = VENV / "bin" / "dbtask"


def dbtask_cli(nats: Server, redis: Server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs the `dbtask` command line against these servers; fails the test on a non-zero exit
    unless `check` is false."""
    proc = subprocess.run(
        [str(DBTASK_CLI), *args],
        env=worker_env(DBTASK_NATS_URL=nats.url, DBTASK_REDIS_URL=redis.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, f"dbtask {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker: ours without DBTASK_* settings, with the repo's venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBTASK_")}
    env["VIRTUAL_ENV"] = str(VENV)
    env.update(extra)
    return env


async def wait_for_lines(path: Path, count: int, timeout: float = 30.0) -> list[str]:
    """Waits until the text file has at least `count` lines; returns them."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= count:
                return lines
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} has {len(lines)} lines after {timeout} s, expected {count}: {lines}")


async def wait_until_line(path: Path, line: str, timeout: float = 15.0) -> None:
    """Waits until the text file has the line `line`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never got the line {line!r}: {path.read_text() if path.exists() else ''}")


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid`, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def wait_rss_at_most(pid: int, bound: float, timeout: float = 10.0) -> float:
    """Waits until process `pid` holds at most `bound` MiB; returns what it holds then (or at
    the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        held = rss_mib(pid)
        if held <= bound or time.monotonic() >= deadline:
            return held
        await asyncio.sleep(0.1)
