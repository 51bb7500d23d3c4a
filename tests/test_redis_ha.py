"""Redis over TLS, behind Sentinel, restarted with its AOF, and a Cluster's sharded
notifications (issue 18, "Redis"). The Cluster also runs the workflow, rate-limit and
revocation tests (`PLAIN_AND_CLUSTER` in test_workflows.py, test_rate_limit.py and
test_revoke.py). The TLS and Cluster tests are quick; the failover and restart ones carry
`chaos`."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import time
from pathlib import Path

import pytest

import dbtask
from e2e_support import RedisCluster, Server, _wait_port, free_port, start_redis, wait_for_lines
from e2e_tasks import add, sleep_then

# ---------------------------------------------------------------------------------------------
# TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, a client certificate signed by
    it, and another CA that signed nothing here: PEM files in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=dbtask test {name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=directory)  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=dbtask test {name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=directory)  # fmt: skip
    return {name: directory / name for name in
            ("ca.pem", "other-ca.pem", "server.pem", "server.key", "client.pem", "client.key")}  # fmt: skip


def start_redis_tls(workdir: Path, certs: dict[str, Path], *, client_certs: bool) -> Server:
    """redis-server speaking only TLS, requiring a client certificate when `client_certs`."""
    return start_redis(workdir, tls=[
        "--tls-cert-file", str(certs["server.pem"]), "--tls-key-file", str(certs["server.key"]),
        "--tls-ca-cert-file", str(certs["ca.pem"]), "--tls-auth-clients", "yes" if client_certs else "no",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def redis_tls(tmp_path: Path, certs, logs: list):
    server = start_redis_tls(tmp_path / "redis-tls", certs, client_certs=False)
    logs.append(server)
    yield server
    server.stop()


@pytest.fixture
def redis_mtls(tmp_path: Path, certs, logs: list):
    server = start_redis_tls(tmp_path / "redis-mtls", certs, client_certs=True)
    logs.append(server)
    yield server
    server.stop()


async def test_worker_and_client_speak_tls_to_redis_with_a_given_ca(worker_factory, nats, redis_tls, certs):
    ca = str(certs["ca.pem"])
    worker_factory(redis_url=redis_tls.url, args=["--redis-ca", ca])
    await dbtask.init(nats_url=nats.url, redis_url=redis_tls.url, redis_ca=ca)
    try:
        result = await add.delay(2, 3)
        assert await result.get(timeout=30) == 5
    finally:
        await dbtask.close()


async def test_a_redis_that_wants_a_client_certificate_gets_one(worker_factory, nats, redis_mtls, certs):
    tls = {"redis_ca": str(certs["ca.pem"]), "redis_cert": str(certs["client.pem"]), "redis_key": str(certs["client.key"])}
    worker_factory(
        redis_url=redis_mtls.url,
        args=["--redis-ca", tls["redis_ca"], "--redis-cert", tls["redis_cert"], "--redis-key", tls["redis_key"]],
    )
    await dbtask.init(nats_url=nats.url, redis_url=redis_mtls.url, **tls)
    try:
        assert await (await add.delay(20, 22)).get(timeout=30) == 42
    finally:
        await dbtask.close()
    # Without the certificate the server refuses the handshake: a clear error, at once.
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="Redis"):
        await dbtask.init(nats_url=nats.url, redis_url=redis_mtls.url, redis_ca=tls["redis_ca"], timeout=5)
    assert time.monotonic() - start < 15


async def test_a_wrong_ca_is_a_clear_error_not_a_hang(worker_factory, nats, redis_tls, certs):
    other = str(certs["other-ca.pem"])
    with pytest.raises(ConnectionError, match="TLS with Redis"):
        await dbtask.init(nats_url=nats.url, redis_url=redis_tls.url, redis_ca=other, timeout=5)
    w = worker_factory(redis_url=redis_tls.url, args=["--redis-ca", other], ready=False)
    code = await w.wait_async(60)
    assert code != 0
    assert "certificate" in w.stderr.lower() or "tls" in w.stderr.lower(), w.stderr[-2000:]


def test_tls_files_without_rediss_are_refused_at_start(worker_factory, redis, certs):
    w = worker_factory(args=["--redis-ca", str(certs["ca.pem"])], ready=False)
    assert w.wait(60) != 0
    assert "rediss://" in w.stderr, w.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Cluster: sharded notifications


def node_cli(port: int, *args: str) -> str:
    """redis-cli against one node, without following redirections."""
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def shard_channels(cluster: RedisCluster) -> dict[int, set[str]]:
    """The sharded channels of `dbtask:done:*` each node has subscribers for."""
    return {n.port: set(node_cli(n.port, "PUBSUB", "SHARDCHANNELS", "dbtask:done:*").split()) for n in cluster.nodes}


@pytest.mark.parametrize("redis", ["cluster"], indirect=True)
async def test_gets_on_a_cluster_wait_on_the_shard_that_holds_their_record(worker_factory, redis, client):
    count = 60
    sent = await add.apply_many([(n, 1000) for n in range(count)])
    channels = {f"dbtask:done:{{{r.id}}}" for r in sent}
    waits = asyncio.ensure_future(asyncio.gather(*(r.get(timeout=60) for r in sent)))
    # No worker yet: every get() waits, each subscribed on the node that owns its channel's slot.
    deadline = time.monotonic() + 20
    while (held := shard_channels(redis)) and set().union(*held.values()) != channels:
        assert time.monotonic() < deadline, f"{len(set().union(*held.values()))} of {count} sharded subscriptions"
        await asyncio.sleep(0.05)
    assert sum(len(c) for c in held.values()) == count  # each on one node only
    assert len([port for port, c in held.items() if c]) > 1  # spread over the shards
    for port, held_here in held.items():
        for channel in held_here:
            assert node_cli(port, "PUBSUB", "SHARDNUMSUB", channel).split()[1] == "1"
            # No classic subscription anywhere: a client that fell back to SUBSCRIBE fails here.
        assert node_cli(port, "PUBSUB", "CHANNELS", "dbtask:done:*") == ""
        assert node_cli(port, "PUBSUB", "NUMSUB", *sorted(channels)[:5]).split()[1::2] == ["0"] * 5
    # The worker SPUBLISHes: every get() is woken by its notification.
    worker_factory(concurrency=8)
    assert await waits == [n + 1000 for n in range(count)]
    # Each record is on the node where its get() was subscribed (MOVED on any other).
    for port, held_here in held.items():
        for channel in held_here:
            key = channel.replace("dbtask:done:", "dbtask:result:")
            assert node_cli(port, "EXISTS", key) == "1", (port, key)
    # The subscriptions end with the waits.
    deadline = time.monotonic() + 10
    while any(shard_channels(redis).values()):
        assert time.monotonic() < deadline, shard_channels(redis)
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Sentinel failover and AOF restart (chaos)

MASTER = "dbtask-master"
DRAIN = 3000


class SentinelGroup:
    """One master, one replica and three Sentinels on loopback."""

    def __init__(self, master: Server, replica: Server, sentinels: list[Server]) -> None:
        self.master, self.replica, self.sentinels = master, replica, sentinels
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in sentinels) + f"/{MASTER}"

    def ask(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.sentinels[0].port), *args],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        return out.stdout

    def master_port(self) -> int:
        return int(self.ask("SENTINEL", "get-master-addr-by-name", MASTER).split()[1])

    def stop(self) -> None:
        for s in [*self.sentinels, self.replica, self.master]:
            s.stop()


def start_sentinel_group(workdir: Path) -> SentinelGroup:
    master = start_redis(workdir / "master")
    replica = start_redis(workdir / "replica", args=["--replicaof", "127.0.0.1", str(master.port)])
    sentinels: list[Server] = []
    for i in range(3):
        d = workdir / f"sentinel{i}"
        d.mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = d / "sentinel.conf"
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\ndir {d}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master.port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 2000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
        )
        log = d / "sentinel.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        sentinels.append(Server("redis-sentinel", "redis", port, proc, log))
        _wait_port(port, proc, "redis-sentinel", log)
    group = SentinelGroup(master, replica, sentinels)
    # The Sentinels learn of the replica from the master's INFO (every 10 s at first).
    deadline = time.monotonic() + 40
    while "master-link-status\nok" not in group.ask("SENTINEL", "replicas", MASTER):
        if time.monotonic() > deadline:
            group.stop()
            raise RuntimeError(f"the Sentinels did not see the replica:\n{group.ask('SENTINEL', 'replicas', MASTER)}")
        time.sleep(0.2)
    return group


@pytest.fixture
def sentinel_group(tmp_path: Path, logs: list):
    group = start_sentinel_group(tmp_path / "sentinel")
    logs.extend([group.master, group.replica, *group.sentinels])
    yield group
    group.stop()


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_a_sentinel_failover_mid_drain_loses_no_result(worker_factory, nats, sentinel_group, tmp_path):
    marker = tmp_path / "runs.txt"
    await dbtask.init(nats_url=nats.url, redis_url=sentinel_group.url)
    try:
        sent = await sleep_then.apply_many([(0.02, n, str(marker)) for n in range(DRAIN)])
        worker_factory(redis_url=sentinel_group.url, concurrency=8)
        await wait_for_lines(marker, DRAIN // 5, timeout=60)
        # The client waits for every result across the failover.
        waits = asyncio.ensure_future(asyncio.gather(*(r.get(timeout=90) for r in sent)))
        first = sentinel_group.master.port
        assert "OK" in sentinel_group.ask("SENTINEL", "FAILOVER", MASTER)
        deadline = time.monotonic() + 30
        while sentinel_group.master_port() == first:
            assert time.monotonic() < deadline, "the Sentinels did not fail over within 30 s"
            await asyncio.sleep(0.1)
        assert sentinel_group.master_port() == sentinel_group.replica.port
        assert await waits == list(range(DRAIN))
        # Every result is on the new master (the old one, demoted a few seconds after the
        # failover, drops what it took meanwhile: the worker wrote that again to the new one).
        # Waited for, since a get() may have read a record from the old master first.
        await wait_for_lines(marker, DRAIN, timeout=60)
        port = str(sentinel_group.replica.port)
        count = ["redis-cli", "-p", port, "EVAL", "return #redis.call('KEYS', 'dbtask:result:*')", "0"]
        deadline = time.monotonic() + 60
        while (stored := int(subprocess.run(count, capture_output=True, text=True, check=True).stdout)) < DRAIN:
            assert time.monotonic() < deadline, f"{stored} of {DRAIN} results on the new master"
            await asyncio.sleep(0.2)
        # A new task after the failover runs and its result is read.
        assert await (await add.delay(1, 2)).get(timeout=30) == 3
    finally:
        await dbtask.close()
    runs = collections.Counter(line.split()[1] for line in marker.read_text().splitlines())
    twice = sum(1 for c in runs.values() if c > 1)
    print(f"sentinel failover: {twice} of {DRAIN} tasks ran twice")


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_redis_with_aof_restarted_mid_drain_keeps_every_result(worker_factory, nats, tmp_path, logs):
    # appendfsync always: a write Redis confirmed is on disk, so a SIGKILL keeps it.
    aof = ["--appendonly", "yes", "--appendfsync", "always"]
    redis = start_redis(tmp_path / "redis-aof", args=aof)
    logs.append(redis)
    marker = tmp_path / "runs.txt"
    try:
        await dbtask.init(nats_url=nats.url, redis_url=redis.url)
        sent = await sleep_then.apply_many([(0.02, n, str(marker)) for n in range(DRAIN)])
        worker_factory(redis_url=redis.url, concurrency=8)
        await wait_for_lines(marker, DRAIN // 5, timeout=60)
        redis.proc.send_signal(signal.SIGKILL)
        redis.proc.wait()
        await asyncio.sleep(1)
        back = start_redis(redis.log.parent, port=redis.port, args=aof)
        redis.proc = back.proc
        values = await asyncio.gather(*(r.get(timeout=90) for r in sent))
        assert values == list(range(DRAIN))
        runs = collections.Counter(line.split()[1] for line in marker.read_text().splitlines())
        twice = sorted(int(n) for n, count in runs.items() if count > 1)
        # A task whose outcome could not be stored is held unacked and stored later, not rerun.
        assert twice == [], f"{len(twice)} tasks ran twice: {twice[:10]}"
    finally:
        await dbtask.close()
        redis.stop()
