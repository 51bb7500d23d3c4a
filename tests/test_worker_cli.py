"""The worker as an operator starts it: flags, start-up failures, the documented config."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from e2e_support import REPO, VENV, WORKER_BIN, start_nats, worker_env
from e2e_tasks import add

# The flags the issue and the README promise.
FLAGS = [
    "--queues", "--app", "--concurrency", "--nats-url", "--redis-url", "--config", "--log-level",
    "--log-format", "--shutdown-timeout", "--python", "--ack-wait", "--result-ttl",
    "--track-started", "--max-deliver",
]  # fmt: skip
# Flags that are not settings.
NOT_SETTINGS = {"--help", "--version", "--config", "--print-config"}


def _help() -> str:
    proc = subprocess.run([str(WORKER_BIN), "--help"], capture_output=True, text=True, timeout=30, env=worker_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _help_flags(text: str) -> list[str]:
    return sorted(set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z-]*)", text, flags=re.M)))


def test_help_lists_every_flag_with_its_environment_variable():
    text = _help()
    missing = [flag for flag in FLAGS if flag not in text]
    assert missing == [], text
    assert "-A" in text
    for flag in _help_flags(text):
        if flag in NOT_SETTINGS:
            continue
        env = "DBTASK_" + ("APPS" if flag == "--app" else flag[2:].upper().replace("-", "_"))
        assert env in text, f"{flag} should read {env}:\n{text}"


def test_module_that_fails_to_import_stops_the_worker_with_its_traceback(worker_factory):
    w = worker_factory("broken_app", ready=False)
    code = w.wait(60)
    assert code != 0
    err = w.stderr
    assert "broken_app failed at import on purpose" in err
    assert "Traceback" in err and "broken_app.py" in err
    assert "worker ready" not in err


def test_module_that_does_not_exist_stops_the_worker(worker_factory):
    w = worker_factory("no_such_module_dbtask_e2e", ready=False)
    assert w.wait(60) != 0
    assert "no_such_module_dbtask_e2e" in w.stderr


def test_nats_without_jetstream_stops_the_worker_with_a_clear_message(worker_factory, tmp_path):
    plain = start_nats(tmp_path / "plain-nats", jetstream=False)
    try:
        w = worker_factory(nats_url=plain.url, ready=False)
        assert w.wait(60) != 0
        assert "jetstream" in w.stderr.lower()
    finally:
        plain.stop()


def test_nats_older_than_2_12_stops_the_worker_with_a_clear_message(worker_factory, tmp_path):
    # nats-server 2.11 (installed apart by scripts/setup.sh) has no message schedules.
    binary = VENV / "nats-2.11.11" / "bin" / "nats-server"
    assert binary.exists(), f"{binary} is missing: run `make setup`"
    old = start_nats(tmp_path / "old-nats", binary=binary)
    try:
        w = worker_factory(nats_url=old.url, ready=False)
        assert w.wait(60) != 0
        assert "2.12" in w.stderr and "2.11.11" in w.stderr, w.stderr[-2000:]
    finally:
        old.stop()


async def test_documented_config_file_is_accepted(worker_factory, client):
    # config/worker.toml documents every option with its default: the worker must accept it
    # as it is (URLs and apps come from the flags here).
    worker_factory(args=["--config", str(REPO / "config" / "worker.toml")])
    assert await (await add.delay(1, 2)).get(timeout=15) == 3


def test_documented_config_mentions_every_flag():
    text = (REPO / "config" / "worker.toml").read_text()
    keys = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, flags=re.M))
    flags = [f for f in _help_flags(_help()) if f not in NOT_SETTINGS]
    expected = {"apps" if f == "--app" else f[2:].replace("-", "_") for f in flags}
    assert len(expected) >= len(FLAGS) - 1
    assert expected - keys == set(), f"config/worker.toml does not document {sorted(expected - keys)}"


async def test_worker_consumes_only_its_queues(worker_factory, client):
    worker_factory(queues="math,other")
    math = await add.apply_async(1, 2, queue="math")
    other = await add.apply_async(3, 4, queue="other")
    default = await add.delay(5, 6)
    assert await math.get(timeout=15) == 3
    assert await other.get(timeout=15) == 7
    with pytest.raises(TimeoutError):
        await default.get(timeout=1)


async def test_settings_from_the_environment_and_flags_over_environment(worker_factory, client):
    worker_factory(queues="", env={"DBTASK_QUEUES": "from_env", "DBTASK_CONCURRENCY": "2"})
    assert await (await add.apply_async(1, 2, queue="from_env")).get(timeout=15) == 3
    worker_factory(queues="from_flag", env={"DBTASK_QUEUES": "from_env"})
    assert await (await add.apply_async(2, 2, queue="from_flag")).get(timeout=15) == 4


async def test_result_ttl_is_applied_to_stored_results(worker_factory, client, redis):
    worker_factory(args=["--result-ttl", "300"])
    result = await add.delay(1, 1)
    assert await result.get(timeout=15) == 2
    ttl = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "TTL", f"dbtask:result:{{{result.id}}}"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert 0 < int(ttl.stdout.strip()) <= 300, ttl


def test_json_logs_are_one_object_per_line(worker_factory):
    w = worker_factory(args=["--log-format", "json"])
    lines = [line for line in w.stderr.splitlines() if line.strip()]
    assert lines
    events = [json.loads(line) for line in lines]
    assert any("worker ready" in json.dumps(e) for e in events)


def test_print_config_hides_passwords():
    proc = subprocess.run(
        [str(WORKER_BIN), "--print-config", "-A", "tasks", "--redis-url", "redis://:hunter2@db:6379/0",
         "--nats-url", "nats://me:hunter3@nats:4222", "--config", str(REPO / "config" / "worker.toml")],
        capture_output=True, text=True, timeout=30, env=worker_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout and "hunter3" not in proc.stdout
    assert "db:6379" in proc.stdout and "nats:4222" in proc.stdout
