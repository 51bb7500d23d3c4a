"""Django 6's Tasks framework on dbtask workers (dbtask.contrib.django.tasks_backend), through
the example project's `shop/reports.py` (`@django.tasks.task` functions).

Django 6 needs Python 3.12+, so this runs with `make test-dist`: the dbtask wheel of the 3.12+
interpreter installed into a fresh venv with Django 6 (scripts/requirements-django6.txt,
downloaded by scripts/test-dist.sh), its `dbtask-worker --django` serving the project, and
that venv's Python enqueueing and reading results as a Django process does.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from e2e_support import READY_LINE, TESTS, Server, tail_text
from test_dist import _clean_env, _pythons, _venv_with_wheel

pytestmark = pytest.mark.dist

PROJECT = TESTS.parent / "examples" / "django-project"
REQUIREMENTS = TESTS.parent / "scripts" / "requirements-django6.txt"

CLIENT = r"""
import json, time
from datetime import timedelta

import django
django.setup()
from django.tasks import TaskResultStatus, default_task_backend
from django.tasks.exceptions import TaskResultDoesNotExist, TaskResultMismatch
from django.utils import timezone

from dbtask.contrib.django.tasks_backend import dbtask_priority
from shop import reports
from shop.models import Order


def finished(result):
    deadline = time.monotonic() + 30
    while not result.is_finished and time.monotonic() < deadline:
        time.sleep(0.05)
        result.refresh()
    return result


out = {}
Order.objects.create(item="lamp", quantity=1)
Order.objects.create(item="lamp", quantity=2)

counted = reports.count_orders.enqueue("lamp")
out["enqueued"] = [counted.status, counted.args, counted.enqueued_at is not None]
finished(counted)
out["counted"] = [counted.status, counted.return_value, counted.attempts,
                  counted.started_at is not None, counted.finished_at is not None]

summary = finished(reports.order_summary.enqueue(item="lamp"))
out["summary"] = [summary.status, summary.return_value, summary.id]

shouted = finished(reports.shout.enqueue("quiet"))
out["async"] = [shouted.status, shouted.return_value]

failed = finished(reports.fail.enqueue("out of stock"))
out["failed"] = [failed.status, [e.exception_class_path for e in failed.errors],
                 "out of stock" in failed.errors[0].traceback, failed.errors[0].exception_class is ValueError]
try:
    failed.return_value
except ValueError as e:
    out["failed_return_value"] = str(e)

# From the id alone, as another process would.
again = reports.count_orders.get_result(counted.id)
out["get_result"] = [again.status, again.return_value, again.task.module_path]
try:
    reports.shout.get_result(counted.id)
except TaskResultMismatch:
    out["mismatch"] = "TaskResultMismatch"
try:
    default_task_backend.get_result("no-such-task")
except TaskResultDoesNotExist:
    out["missing"] = "TaskResultDoesNotExist"

run_after = timezone.now() + timedelta(seconds=1)
later = finished(reports.count_orders.using(run_after=run_after).enqueue("lamp"))
out["deferred"] = [later.status, later.started_at >= run_after]

out["priorities"] = [dbtask_priority(p) for p in (-100, -21, -1, 0, 1, 50, 100)]
print(json.dumps(out, default=str))
"""


def _python_for_django6() -> tuple[str, str]:
    for version, python in sorted(_pythons().items(), reverse=True):
        if tuple(map(int, version.split("."))) >= (3, 12):
            return version, python
    pytest.skip("Django 6 needs Python 3.12+ and make test-dist found none: set DBTASK_DIST_PYTHON to one")


def test_django_tasks_run_on_a_dbtask_worker(nats: Server, redis: Server, tmp_path: Path):
    version, python = _python_for_django6()
    wheels = os.environ.get("DBTASK_TEST_DJANGO6")
    assert wheels, "DBTASK_TEST_DJANGO6 is not set: scripts/test-dist.sh downloads Django 6 for Python 3.12+"
    venv = _venv_with_wheel(version, python, tmp_path)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--no-index", "--find-links", wheels, "-r", str(REQUIREMENTS)],
        check=True, env=_clean_env(),
    )  # fmt: skip

    env = _clean_env()
    env.update(EXAMPLE_DB=str(tmp_path / "db.sqlite3"), DJANGO_SETTINGS_MODULE="djproject.settings")
    env.update(DBTASK_NATS_URL=nats.url, DBTASK_REDIS_URL=redis.url)
    subprocess.run([str(venv / "bin" / "python"), "manage.py", "migrate", "-v0"], cwd=PROJECT, env=env, check=True)

    log = tmp_path / "worker.log"
    worker_env = dict(env, DBTASK_STATE_DIR=str(tmp_path / "state"))
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [str(venv / "bin" / "dbtask-worker"), "--django", "djproject.settings", "-A", "shop.reports",
             "--queues", "default,reports"],
            cwd=PROJECT, env=worker_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while READY_LINE not in log.read_text() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert READY_LINE in log.read_text(), tail_text(log)
        run = subprocess.run(
            [str(venv / "bin" / "python"), "-c", CLIENT],
            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert run.returncode == 0, f"{run.stderr}\nworker:\n{tail_text(log)}"
        seen = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    assert seen["enqueued"] == ["READY", ["lamp"], True]
    assert seen["counted"] == ["SUCCESSFUL", 2, 1, True, True], tail_text(log)
    status, summary, task_id = seen["summary"]
    assert status == "SUCCESSFUL"
    # takes_context: the context's result is the dbtask task's, on its first attempt.
    assert summary == {"item": "lamp", "orders": 2, "attempt": 1, "task_id": task_id}
    assert seen["async"] == ["SUCCESSFUL", "QUIET"]
    assert seen["failed"] == ["FAILED", ["builtins.ValueError"], True, True]
    assert seen["failed_return_value"] == "Task failed"
    assert seen["get_result"] == ["SUCCESSFUL", 2, "shop.reports.count_orders"]
    assert seen["mismatch"] == "TaskResultMismatch"
    assert seen["missing"] == "TaskResultDoesNotExist"
    assert seen["deferred"] == ["SUCCESSFUL", True]
    assert seen["priorities"] == [0, 3, 4, 5, 6, 7, 9]
    # The worker found shop.tasks itself and ran the Django tasks as dbtask tasks.
    assert "shop.tasks" in log.read_text()
