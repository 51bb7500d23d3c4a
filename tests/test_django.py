"""The Django integration (dbtask.contrib.django) through the example project in
examples/django-project (Django 5.2 here; Django 6's Tasks backend: tests/test_django_tasks.py):
its settings, its app `shop` whose `tasks.py` a worker started with `--django` finds without
-A, `delay_on_commit` inside transactions, and its view through Django's test client, against
real servers and a real worker sharing the project's SQLite database.

Django is set up once in this process (settings cannot be set up twice), with the database in
a temp dir; each test has its own servers, reached through DBTASK_NATS_URL and
DBTASK_REDIS_URL, and the client connects on first use (the project sets no URL)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import django
import pytest

import dbtask
from dbtask import _client
from e2e_support import TESTS, VENV, Server, stream_info, worker_env

PROJECT = TESTS.parent / "examples" / "django-project"
SETTINGS = "djproject.settings"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Django set up with the example project's settings, its database migrated."""
    db = tmp_path_factory.mktemp("django") / "db.sqlite3"
    os.environ["EXAMPLE_DB"] = str(db)
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    sys.path.insert(0, str(PROJECT))
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    yield db
    # What the app's ready() installed: other test modules expect a client that only init connects.
    _client.connect_on_demand = None
    dbtask.close_sync()
    # Later tests' workers inherit this process's environment.
    for name in ("EXAMPLE_DB", "DJANGO_SETTINGS_MODULE"):
        os.environ.pop(name, None)
    sys.path.remove(str(PROJECT))


@pytest.fixture
def servers(project: Path, nats: Server, redis: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This test's servers, for the client (first use) and the worker."""
    monkeypatch.setenv("DBTASK_NATS_URL", nats.url)
    monkeypatch.setenv("DBTASK_REDIS_URL", redis.url)
    yield
    dbtask.close_sync()  # the next test's first use connects to its own servers


@pytest.fixture
def django_worker(servers: None, project: Path, worker_factory):
    """A worker started with --django and no -A, in the project's folder."""
    return worker_factory(django=SETTINGS, env={"PYTHONPATH": str(PROJECT), "EXAMPLE_DB": str(project)})


def _published(nats: Server) -> int:
    """Messages ever stored in the task stream (its last sequence number)."""
    return int(stream_info(nats.port)["state"]["last_seq"])


def _shipped(order_id: int, timeout: float = 30.0) -> bool:
    from shop.models import Order

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Order.objects.get(pk=order_id).shipped:
            return True
        time.sleep(0.05)
    return False


def test_the_worker_finds_the_apps_tasks_module_without_a(django_worker):
    assert "-A" not in django_worker.cmd
    assert "shop.tasks" in django_worker.stderr, django_worker.describe()


def test_delay_on_commit_sends_nothing_when_the_transaction_rolls_back(django_worker, nats: Server):
    from django.db import transaction
    from shop.models import Order
    from shop.tasks import ship_order

    dbtask.AsyncResult("warm-up").state_sync()  # connects on first use
    before = _published(nats)

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        with transaction.atomic():
            order = Order.objects.create(item="book", quantity=1)
            ship_order.delay_on_commit(order.id)
            ship_order.apply_async_on_commit(order.id, task_id="rolled-back")
            raise Abort
    assert _published(nats) == before
    assert not Order.objects.filter(pk=order.id).exists()
    assert dbtask.AsyncResult("rolled-back").state_sync() == "PENDING"


def test_delay_on_commit_sends_when_the_transaction_commits_and_the_worker_runs_it(django_worker, nats: Server):
    from django.db import transaction
    from shop.models import Order
    from shop.tasks import ship_order

    dbtask.AsyncResult("warm-up").state_sync()
    before = _published(nats)
    with transaction.atomic():
        order = Order.objects.create(item="lamp", quantity=2)
        assert ship_order.delay_on_commit(order.id) is None
        ship_order.apply_async_on_commit(order.id, task_id=f"ship-{order.id}")
        with transaction.atomic():  # a savepoint: still waits for the outer commit
            ship_order.delay_on_commit(order.id)
        assert _published(nats) == before  # nothing sent inside the transaction
    assert _published(nats) == before + 3
    result = dbtask.AsyncResult(f"ship-{order.id}").get_sync(timeout=30)
    assert result == {"order": order.id, "item": "lamp", "shipped": True}
    assert Order.objects.get(pk=order.id).shipped


def test_outside_a_transaction_delay_on_commit_sends_at_once(django_worker, nats: Server):
    from shop.models import Order
    from shop.tasks import ship_order

    order = Order.objects.create(item="pen", quantity=3)  # autocommit
    ship_order.apply_async_on_commit(order.id, task_id=f"ship-{order.id}")
    assert dbtask.AsyncResult(f"ship-{order.id}").get_sync(timeout=30)["shipped"] is True


def test_the_view_places_an_order_that_the_worker_ships(django_worker):
    from django.test import Client

    http = Client()
    placed = http.post("/orders", {"item": "chair", "quantity": 4}, content_type="application/json")
    assert placed.status_code == 201, placed.content
    order_id = placed.json()["order"]
    assert _shipped(order_id), "the worker did not ship the order placed through the view"
    assert http.get(f"/orders/{order_id}").json() == {"order": order_id, "item": "chair", "shipped": True}


def test_apply_async_on_commit_refuses_a_bad_call_at_once(servers: None, nats: Server):
    from django.db import transaction
    from shop.tasks import ship_order

    with transaction.atomic():
        with pytest.raises(TypeError, match="countdwn.*did you mean 'countdown'"):
            ship_order.apply_async_on_commit(1, countdwn=5)
        with pytest.raises(TypeError, match="args must be a tuple or a list"):
            ship_order.apply_async_on_commit(args="1")
        with pytest.raises(ValueError, match="not both"):
            ship_order.apply_async_on_commit(1, args=(2,))


def test_an_unknown_dbtask_setting_is_refused_with_the_valid_names(project: Path):
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from dbtask.contrib.django import init_options

    with override_settings(DBTASK_NATS_URLS="nats://x:4222"):
        with pytest.raises(ImproperlyConfigured, match="DBTASK_NATS_URLS.*DBTASK_NATS_URL"):
            init_options()
    with override_settings(DBTASK_REDIS_URL="redis://r:6379", DBTASK_TIMEOUT=2):
        assert init_options() == {"redis_url": "redis://r:6379", "timeout": 2}


def test_the_settings_connect_the_client_on_first_use(project: Path, nats: Server, redis: Server, monkeypatch):
    from django.test import override_settings

    monkeypatch.delenv("DBTASK_NATS_URL", raising=False)
    monkeypatch.delenv("DBTASK_REDIS_URL", raising=False)
    dbtask.close_sync()
    with override_settings(DBTASK_NATS_URL=nats.url, DBTASK_REDIS_URL=redis.url):
        assert dbtask.AsyncResult("x").state_sync() == "PENDING"
        client = _client.current()
        assert client.nats_url == nats.url
    dbtask.close_sync()


FORKED = """
import os, sys
import django
django.setup()
import dbtask

dbtask.AsyncResult("parent").state_sync()          # the parent connects on first use
pid = os.fork()
if pid == 0:
    # The connection did not survive the fork; the first use in the child connects again.
    code = 0 if dbtask.AsyncResult("child").state_sync() == "PENDING" else 3
    os._exit(code)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_process_forked_after_connecting_connects_again_on_first_use(
    project: Path, nats: Server, redis: Server
):
    # A preloaded WSGI server (gunicorn --preload) forks its workers from a process whose
    # Django app is ready and whose client may be connected.
    run = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", FORKED],
        cwd=PROJECT,
        env=worker_env(
            DJANGO_SETTINGS_MODULE=SETTINGS, EXAMPLE_DB=str(project),
            DBTASK_NATS_URL=nats.url, DBTASK_REDIS_URL=redis.url,
        ),  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_a_worker_given_settings_it_cannot_import_says_so(servers: None, worker_factory):
    worker = worker_factory(django="nosuchproject.settings", ready=False)
    assert worker.wait(30) != 0
    assert "cannot set up Django with the settings \"nosuchproject.settings\"" in worker.stderr, worker.describe()
    assert "ModuleNotFoundError" in worker.stderr


def test_the_process_pool_sets_django_up_in_each_child(servers: None, project: Path, worker_factory):
    from shop.models import Order
    from shop.tasks import ship_order

    worker_factory(
        django=SETTINGS, args=["--pool", "processes"], concurrency=2,
        env={"PYTHONPATH": str(PROJECT), "EXAMPLE_DB": str(project)},
    )  # fmt: skip
    order = Order.objects.create(item="desk", quantity=1)
    assert ship_order.delay_sync(order.id).get_sync(timeout=30)["shipped"] is True


def test_the_tasks_backend_needs_django_6_and_says_so(project: Path):
    assert django.VERSION[:2] == (5, 2), "the main suite runs the Django 5.2 LTS pinned in requirements-dev.txt"
    with pytest.raises(ImportError, match=r"Django 6\.0 added; this is Django 5\.2\.\d+: upgrade Django, or use"):
        import dbtask.contrib.django.tasks_backend  # noqa: F401
