"""The worker's container image, run for real (`make test-containers`, which builds the image
first and sets DBTASK_TEST_IMAGE; left out of `make test`).

The image is deploy/Dockerfile built by scripts/image.sh; podman runs it with host networking
against this test's own nats-server and redis-server (images of NATS and Redis cannot be pulled
on these machines, so the servers are the host's binaries). The task modules of tests/apps/ are
mounted at /app, as a user would mount or COPY theirs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request
import uuid

import pytest
import yaml

from e2e_support import APPS, Server, free_port

pytestmark = pytest.mark.containers

# The global options and limits podman needs on these machines (docs/deployment.md).
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
RUN_LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096", "--network", "host"]


def _image() -> str:
    image = os.environ.get("DBTASK_TEST_IMAGE")
    if not image:
        pytest.fail("DBTASK_TEST_IMAGE is not set: run these tests with `make test-containers`")
    return image


def _podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture
def container(nats: Server, redis: Server):
    """Starts the worker image (detached) with extra arguments; removes it at the end."""
    names: list[str] = []

    def start(*worker_args: str, env: dict[str, str] | None = None, podman_args: tuple[str, ...] = ()) -> str:
        name = f"dbtask-test-{uuid.uuid4().hex[:10]}"
        env_args: list[str] = []
        for key, value in {"DBTASK_NATS_URL": nats.url, "DBTASK_REDIS_URL": redis.url, **(env or {})}.items():
            env_args += ["-e", f"{key}={value}"]
        _podman(
            "run", "-d", "--name", name, *RUN_LIMITS, "-v", f"{APPS}:/app:ro", *env_args, *podman_args,
            _image(), *worker_args,
        )  # fmt: skip
        names.append(name)
        return name

    yield start
    for name in names:
        _podman("rm", "-f", "-t", "0", name, check=False)


async def _logs_contain(name: str, text: str, timeout: float = 30) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        logs = _podman("logs", name, check=False)
        out = logs.stdout + logs.stderr
        if text in out:
            return out
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{text!r} not in the container's logs after {timeout}s:\n{out[-4000:]}")
        await asyncio.sleep(0.2)


def _compose_worker_healthcheck(port: int) -> list[str]:
    """The worker's healthcheck command in deploy/compose.yaml, on `port` instead of 9808."""
    compose = yaml.safe_load((APPS.parent.parent / "deploy" / "compose.yaml").read_text())
    test = compose["services"]["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD" and compose["services"]["worker"]["environment"]["DBTASK_HTTP_ADDR"] == "0.0.0.0:9808"
    return [part.replace("9808", str(port)) for part in test[1:]]


async def test_the_image_runs_tasks_and_stops_gracefully_on_podman_stop(container, client):
    port = free_port()
    name = container(
        "-A", "e2e_tasks", "--concurrency", "4",
        env={"DBTASK_HTTP_ADDR": f"127.0.0.1:{port}"},
        podman_args=("--health-cmd", json.dumps(_compose_worker_healthcheck(port))),
    )  # fmt: skip
    await _logs_contain(name, "worker ready")

    # Ready, as a Kubernetes probe or compose's healthcheck (run inside the container) sees it.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
        assert answer.status == 200
    health = _podman("healthcheck", "run", name, check=False)
    assert health.returncode == 0, f"compose's healthcheck failed in the image: {health.stdout}{health.stderr}"

    from e2e_tasks import add, tracked

    assert await (await add.delay(2, 3)).get(timeout=15) == 5
    # The image runs the worker as its own unprivileged user.
    assert _podman("exec", name, "id", "-un").stdout.strip() == "dbtask"

    # `podman stop` sends SIGTERM: the running task finishes and its result is stored, then
    # the worker exits 0.
    slow = await tracked.delay(1.5)
    deadline = asyncio.get_running_loop().time() + 15
    while await slow.state() != "STARTED":
        assert asyncio.get_running_loop().time() < deadline, "the task never started"
        await asyncio.sleep(0.05)
    stop = await asyncio.to_thread(_podman, "stop", "-t", "30", name)
    assert stop.returncode == 0
    assert await slow.get(timeout=10) == "tracked"
    state = _podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert state == "0"
    logs = _podman("logs", name).stderr
    assert "worker stopped" in logs


async def test_a_bad_setting_stops_the_container_with_a_clear_error(container):
    name = container("-A", "e2e_tasks", env={"DBTASK_REDIS_URL": "http://127.0.0.1:1"})
    deadline = asyncio.get_running_loop().time() + 20
    while _podman("inspect", name, "--format", "{{.State.Running}}").stdout.strip() == "true":
        assert asyncio.get_running_loop().time() < deadline, "the worker kept running with a bad Redis URL"
        await asyncio.sleep(0.2)
    assert _podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() != "0"
    assert "redis" in _podman("logs", name).stderr.lower()
