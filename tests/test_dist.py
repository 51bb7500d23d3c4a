"""The wheels as a user gets them (`make test-dist`, which builds them first and sets
DBTASK_TEST_WHEELS and DBTASK_TEST_PYTHONS; left out of `make test`).

Each wheel is installed into a fresh virtualenv of its Python version in the test's temp dir
(outside the checkout), and its `dbtask-worker` command runs a task sent by that venv's Python:
no cargo, no checkout on sys.path, no VIRTUAL_ENV, no --python.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from e2e_support import TESTS, Server

pytestmark = pytest.mark.dist

# The checkout: kept off PATH and sys.path, so that only what the wheel installed runs.
ROOT = TESTS.parent

TASKS = '''
from dbtask import task

@task
def add(x, y):
    return x + y
'''

CLIENT = '''
import sys
import dbtask
import disttasks

dbtask.init_sync(nats_url=sys.argv[1], redis_url=sys.argv[2])
result = disttasks.add.delay_sync(2, 3).get_sync(timeout=20)
print("result", result)
print("client-python", "%d.%d" % sys.version_info[:2])
print("dbtask-from", dbtask.__file__)
'''


def _pythons() -> dict[str, str]:
    """Version `X.Y` -> interpreter, for the wheels made by scripts/test-dist.sh."""
    raw = os.environ.get("DBTASK_TEST_PYTHONS")
    if not raw or not os.environ.get("DBTASK_TEST_WHEELS"):
        pytest.fail("DBTASK_TEST_WHEELS / DBTASK_TEST_PYTHONS are not set: run these tests with `make test-dist`")
    found = {}
    for python in raw.split(":"):
        version = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        found[version] = python
    return found


def _wheel(version: str) -> Path:
    tag = "cp" + version.replace(".", "")
    wheels = sorted(Path(os.environ["DBTASK_TEST_WHEELS"]).glob(f"dbtask-*-{tag}-{tag}-*.whl"))
    assert len(wheels) == 1, f"expected one wheel for Python {version}, found {wheels}"
    return wheels[0]


def _clean_env() -> dict[str, str]:
    """The environment of a user's shell: nothing of ours (no VIRTUAL_ENV, no DBTASK_*, no
    PYTHONPATH, no .venv on PATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBTASK_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if str(ROOT) not in p)
    return env


def _venv_with_wheel(version: str, python: str, where: Path) -> Path:
    venv = where / f"venv-{version}"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, env=_clean_env())
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--no-index", str(_wheel(version))],
        check=True, env=_clean_env(),
    )  # fmt: skip
    return venv


def _versions() -> list[str]:
    raw = os.environ.get("DBTASK_TEST_PYTHONS", "")
    return sorted(_pythons()) if raw else ["(make test-dist)"]


@pytest.mark.parametrize("version", _versions())
def test_the_installed_worker_runs_a_task_on_its_own_python(version, nats: Server, redis: Server, tmp_path: Path):
    python = _pythons()[version]
    venv = _venv_with_wheel(version, python, tmp_path)
    worker_cmd = venv / "bin" / "dbtask-worker"
    assert worker_cmd.is_file(), "the wheel installed no dbtask-worker command"

    shown = subprocess.run([str(worker_cmd), "--version"], capture_output=True, text=True, env=_clean_env())
    assert shown.returncode == 0, shown.stderr
    assert f"(Python {version})" in shown.stdout

    app = tmp_path / "app"
    app.mkdir()
    (app / "disttasks.py").write_text(TASKS)
    (app / "client.py").write_text(CLIENT)
    env = _clean_env()
    env["DBTASK_STATE_DIR"] = str(tmp_path / "state")
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [str(worker_cmd), "-A", "disttasks", "--nats-url", nats.url, "--redis-url", redis.url],
            cwd=app, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        client = subprocess.run(
            [str(venv / "bin" / "python"), "client.py", nats.url, redis.url],
            cwd=app, env=_clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        logs = log.read_text()
        assert client.returncode == 0, f"{client.stderr}\nworker:\n{logs}"
        lines = dict(line.split(" ", 1) for line in client.stdout.splitlines())
        assert lines["result"] == "5"
        assert lines["client-python"] == version
        # The client is the installed wheel's, not the checkout's.
        assert str(venv) in lines["dbtask-from"] and str(ROOT) not in lines["dbtask-from"]
        # The worker embedded this venv's interpreter: its version, its site-packages.
        assert f'python_version="{version}.' in logs, logs
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0, log.read_text()
    assert "worker stopped" in log.read_text()


def test_a_worker_refuses_a_python_of_another_minor_version(tmp_path: Path):
    pythons = _pythons()
    assert len(pythons) >= 2, "make test-dist builds wheels for two Python versions"
    (first, first_python), (second, second_python) = sorted(pythons.items())[:2]
    venv_first = _venv_with_wheel(first, first_python, tmp_path)
    venv_second = _venv_with_wheel(second, second_python, tmp_path)
    site = subprocess.run(
        [str(venv_first / "bin" / "python"), "-c", "import dbtask, os; print(os.path.dirname(dbtask.__file__))"],
        capture_output=True, text=True, check=True, env=_clean_env(),
    ).stdout.strip()  # fmt: skip
    binary = Path(site) / "_bin" / "dbtask-worker"
    # The first version's worker told to embed the second version's interpreter.
    env = _clean_env()
    env["LD_LIBRARY_PATH"] = subprocess.run(
        [first_python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    run = subprocess.run(
        [str(binary), "--python", str(venv_second / "bin" / "python"), "-A", "disttasks"],
        capture_output=True, text=True, env=env, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode != 0
    assert f"embeds Python {first}" in run.stderr, run.stderr
    assert f"is Python {second}" in run.stderr, run.stderr
    assert "pip install" in run.stderr
