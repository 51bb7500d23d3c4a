"""Helpers of the end-to-end tests: starting nats-server, redis-server and dbtask-worker
processes on free ports, and waiting for them. The fixtures in conftest.py use these; tests
import what they need from here (not from conftest, whose module name other suites share)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def start_redis(
    workdir: Path, port: int | None = None, args: Sequence[str] = (), *, tls: Sequence[str] | None = None
) -> Server:
    """redis-server on a free port (or on `port`, to bring a stopped one back), no persistence
    unless `args` (more redis-server options, which win over these) asks for it. `tls`: the
    server's TLS options (`--tls-cert-file ...`); it then speaks only TLS on that port
    (`rediss://`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = workdir / "redis.log"
    listen = ["--port", str(port)] if tls is None else ["--port", "0", "--tls-port", str(port), *tls]
    cmd = [
        REDIS_BIN, "--bind", "127.0.0.1", *listen, "--dir", str(workdir),
        "--save", "", "--appendonly", "no", "--daemonize", "no", *args,
    ]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "redis-server", log)
    except BaseException:
        _stop(proc)
        raise
    return Server("redis-server", "redis" if tls is None else "rediss", port, proc, log)


class RedisCluster:
    """A Redis Cluster we started (three masters, and replicas when asked): `url` is its
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


def start_redis_cluster(workdir: Path, masters: int = 3, replicas: int = 0) -> RedisCluster:
    """`masters` redis-servers in cluster mode on free ports (their cluster bus ports chosen
    free too), each with `replicas` replicas, joined by `redis-cli --cluster create`; returns
    once every node says the cluster is ok (and every replica is in sync)."""
    nodes: list[Server] = []
    try:
        for i in range(masters * (1 + replicas)):
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
             "--cluster-replicas", str(replicas), "--cluster-yes"],
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
                role = subprocess.run(
                    ["redis-cli", "-p", str(node.port), "INFO", "replication"], capture_output=True, text=True
                ).stdout
                if "cluster_state:ok" in info and ("role:slave" not in role or "master_link_status:up" in role):
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


def nats_request(port: int, subject: str, payload: bytes = b"", timeout: float = 10.0) -> bytes:
    """Publishes `payload` on `subject` to the nats-server on 127.0.0.1:`port`, over a plain
    NATS connection of its own, and returns the first reply (a JetStream API answer, or the
    stream's ack of a message published to one of its subjects)."""
    inbox = "_INBOX.dbtask-tests"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # INFO
        sock.sendall(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\n'
            + f"SUB {inbox} 1\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode()
            + payload
            + b"\r\n"
        )
        while True:
            line = reader.readline()
            if not line:
                raise ConnectionError(f"nats-server :{port} closed the connection before answering {subject}")
            if line.startswith(b"PING"):
                sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise ConnectionError(f"nats-server :{port} refused {subject}: {line.decode().strip()}")
            elif line.startswith(b"MSG"):
                size = int(line.split()[-1])
                return reader.read(size + 2)[:size]


def jetstream_api(port: int, subject: str, request: dict | None = None, timeout: float = 20.0) -> dict:
    """One JetStream API request (`STREAM.INFO.DBTASK_TASKS`, `STREAM.CREATE.X`...) to the
    nats-server on `port`; returns the JSON answer (with an `error` object when refused). On a
    cluster, a stream or consumer between two leaders answers nothing: the request is sent
    again, every 2 s, until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(nats_request(port, f"$JS.API.{subject}", json.dumps(request or {}).encode(), timeout=2.0))
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise


def stream_info(port: int, stream: str = "DBTASK_TASKS") -> dict:
    """The stream's info (`config`, `state`, `cluster`) as the server on `port` reports it."""
    info = jetstream_api(port, f"STREAM.INFO.{stream}")
    if "error" in info:
        raise AssertionError(f"no stream {stream} on nats-server :{port}: {info['error']}")
    return info


class NatsNode(Server):
    """One nats-server of a `NatsCluster`: its server `node` name (n1, n2...), and the ports
    of its routes and of its monitoring (`-m`, for /jsz and /healthz)."""

    def __init__(self, node: str, port: int, cluster_port: int, monitor_port: int, workdir: Path, cmd: list[str]):
        log = workdir / "nats.log"
        super().__init__(f"nats-server {node}", "nats", port, None, log)  # type: ignore[arg-type]
        self.node = node
        self.cluster_port = cluster_port
        self.monitor_port = monitor_port
        self.workdir = workdir
        self.cmd = cmd

    def start(self) -> None:
        """Starts (or starts again, with what its JetStream stored) this node."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, self.name, self.log)

    def kill(self) -> None:
        """SIGKILL, and reap: the node is gone at once, as in a crash."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def monitor(self, path: str) -> dict:
        """A monitoring endpoint's JSON, e.g. `/jsz?streams=true`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=5) as answer:
            return json.loads(answer.read())

    def clients(self, prefix: str = "") -> list[str]:
        """The names of the client connections this node serves (`/connz`), those starting
        with `prefix` (e.g. "dbtask-worker")."""
        return [c.get("name", "") for c in self.monitor("/connz")["connections"] if c.get("name", "").startswith(prefix)]


class NatsCluster:
    """A JetStream cluster of nats-server processes on loopback (see `start_nats_cluster`):
    `nodes`, and `url`, every node's URL separated by commas (the seeds list)."""

    def __init__(self, nodes: list[NatsNode]):
        self.nodes = nodes

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def alive(self) -> list[NatsNode]:
        return [n for n in self.nodes if n.alive()]

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.node == name)

    def stream(self, stream: str = "DBTASK_TASKS") -> dict:
        """The stream's info from a live node (`cluster.leader`, `cluster.replicas`, `config`)."""
        return stream_info(self.alive()[0].port, stream)

    def stream_leader(self, stream: str = "DBTASK_TASKS", timeout: float = 15.0) -> NatsNode:
        """The live node that leads `stream`, as the cluster's monitoring reports it (`/jsz`);
        waits for an election in progress."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.alive():
                try:
                    jsz = node.monitor("/jsz?streams=true")
                except OSError:
                    continue
                for account in jsz.get("account_details", []):
                    for detail in account.get("stream_detail", []):
                        leader = detail.get("cluster", {}).get("leader")
                        if detail.get("name") == stream and leader:
                            found = self.node(leader)
                            if found.alive():
                                return found
            if time.monotonic() >= deadline:
                raise AssertionError(f"no live node leads stream {stream} after {timeout} s")
            time.sleep(0.1)

    def move_stream_leader(self, to: NatsNode, stream: str = "DBTASK_TASKS", timeout: float = 15.0) -> None:
        """Makes `to` the leader of `stream` (a step-down of the current leader with `to` as
        the preferred successor, nats-server 2.11+), and waits until it is."""
        deadline = time.monotonic() + timeout
        while self.stream_leader(stream) is not to:
            answer = jetstream_api(to.port, f"STREAM.LEADER.STEPDOWN.{stream}", {"placement": {"preferred": to.node}})
            if time.monotonic() >= deadline:
                raise AssertionError(f"{to.node} did not become the leader of {stream}: {answer}")
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits until every live node serves JetStream and knows the meta leader."""
        deadline = time.monotonic() + timeout
        pending = self.alive()
        while pending:
            node = pending[0]
            try:
                ready = node.monitor("/jsz").get("meta_cluster", {}).get("leader")
            except OSError:
                ready = None
            if ready:
                pending.pop(0)
                continue
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{node.name} has no JetStream meta leader after {timeout} s:\n{tail_text(node.log)}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_nats_cluster(workdir: Path, size: int = 3, binary: Path | str = NATS_BIN) -> NatsCluster:
    """`size` nats-server processes (the project's pinned binary) forming one JetStream
    cluster: each on free loopback ports for clients, routes and monitoring (`-m`), with its
    file store under workdir/<node>, routes to every other node. Returns once every node knows
    the cluster's meta leader, so streams can be created."""
    nodes: list[NatsNode] = []
    ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
    for i, (port, cluster_port, monitor_port) in enumerate(ports):
        name = f"n{i + 1}"
        routes = ",".join(f"nats://127.0.0.1:{c}" for j, (_, c, _) in enumerate(ports) if j != i)
        node_dir = workdir / name
        node_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(binary), "-a", "127.0.0.1", "-p", str(port), "-n", name, "-m", str(monitor_port),
            "--cluster_name", "dbtask-test", "--cluster", f"nats://127.0.0.1:{cluster_port}", "--routes", routes,
            "-js", "-sd", str(node_dir / "jetstream"),
        ]  # fmt: skip
        nodes.append(NatsNode(name, port, cluster_port, monitor_port, node_dir, cmd))
    cluster = NatsCluster(nodes)
    try:
        for node in nodes:
            node.start()
        cluster.wait_ready()
    except BaseException:
        for node in nodes:
            if getattr(node, "proc", None) is not None:
                node.stop()
        raise
    return cluster
