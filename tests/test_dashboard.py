"""The dashboard (issue 17, section 4) in a real browser: `dbtask dashboard` runs against real
servers and a real worker started with --events, and headless Chromium (Debian's `chromium`,
driven by Playwright through its own executable: nothing downloaded) shows what a person would
see. The tests assert on the page's DOM; no screenshots are kept.

Skipped when chromium or Playwright is missing on a developer machine; in CI (``$CI`` set) they
must run, and a missing browser fails them (scripts/setup.sh installs chromium)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

import dbtask
from e2e_support import DBTASK_CLI, Server, Worker, tail_text, worker_env

import dead_tasks
import inspect_tasks

CHROMIUM = os.environ.get("DBTASK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 15_000


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what}: CI must run the dashboard's browser tests (scripts/setup.sh installs them)", pytrace=False)
    pytest.skip(f"{what} (scripts/setup.sh installs it; `make setup`)")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the Python package playwright is not installed")
    if CHROMIUM is None:
        _missing("chromium is not installed")
    with sync_playwright() as p:
        # Debian's chromium, never one downloaded by `playwright install`.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"the page's script failed: {errors}"


class Dashboard:
    """`dbtask dashboard --port 0` running in the background."""

    def __init__(self, nats: Server, redis: Server, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = tmp_path / f"dashboard{time.monotonic_ns()}.stderr"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [str(DBTASK_CLI), "dashboard", "--port", "0", *args],
                env=worker_env(DBTASK_NATS_URL=nats.url, DBTASK_REDIS_URL=redis.url, **(env or {})),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def wait_url(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = tail_text(self.log)
            for line in text.splitlines():
                if line.startswith("dbtask dashboard on "):
                    return line.split(" on ", 1)[1].split()[0].rstrip(";")
            if self.proc.poll() is not None:
                pytest.fail(f"the dashboard exited with {self.proc.returncode}:\n{text}", pytrace=False)
            time.sleep(0.05)
        pytest.fail(f"the dashboard did not say where it serves within {timeout} s:\n{tail_text(self.log)}", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def dashboard(nats: Server, redis: Server, tmp_path: Path, logs: list) -> Iterator:
    started: list[Dashboard] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Dashboard:
        d = Dashboard(nats, redis, tmp_path, *args, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def sync_client(nats: Server, redis: Server) -> Iterator[None]:
    dbtask.init_sync(nats_url=nats.url, redis_url=redis.url)
    yield
    dbtask.close_sync()


def worker_id(w: Worker) -> str:
    line = next(x for x in w.stderr.splitlines() if "worker ready" in x)
    return line.split(" worker=")[1].split()[0]


def wait_for_line(path: Path, start: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and any(x.startswith(start) for x in path.read_text().splitlines()):
            return
        time.sleep(0.02)
    raise AssertionError(f"no line {start!r} in {path} within {timeout} s")


def open_live(page, url: str) -> None:
    """Opens the page and waits until its live stream is connected."""
    page.goto(url)
    page.wait_for_selector("body[data-live='1']", state="attached")


def test_the_worker_and_submitted_tasks_appear_live(worker_factory, dashboard, sync_client, page, tmp_path):
    from playwright.sync_api import expect

    w = worker_factory("inspect_tasks", args=["--events", "--result-extended"])
    # A second worker, on a queue of its own: both are listed, each with its queues.
    other = worker_factory("inspect_tasks", queues="reports", args=["--events"])
    url = dashboard().wait_url()
    open_live(page, url)

    # The workers, up, with their queues.
    row = page.locator(f"#workers tr[data-worker='{worker_id(w)}']")
    expect(row.locator("td.status")).to_have_text("up")
    expect(row).to_contain_text("default")
    other_row = page.locator(f"#workers tr[data-worker='{worker_id(other)}']")
    expect(other_row.locator("td.status")).to_have_text("up")
    expect(other_row).to_contain_text("reports")
    expect(other_row).not_to_contain_text("default")

    # Tasks sent after the page loaded show up with their state, without a reload.
    page.evaluate("window.__notReloaded = true")
    ok = inspect_tasks.add.delay_sync(2, 3)
    bad = inspect_tasks.fail.delay_sync("card declined")
    expect(page.locator(f"#tasks tr[data-task-id='{ok.id}'] td.state")).to_have_text("SUCCESS")
    failed = page.locator(f"#tasks tr[data-task-id='{bad.id}']")
    expect(failed.locator("td.state")).to_have_text("FAILURE")
    expect(failed.locator("td.error")).to_contain_text("ValueError: card declined")
    expect(failed.locator("td.name")).to_have_text("inspect_tasks.fail")
    assert page.evaluate("window.__notReloaded") is True
    # The worker's processed count follows (from its stats or heartbeats).
    expect(row.locator("td.processed")).to_have_text("2", timeout=20_000)

    # Search by name, then by state.
    page.fill("#search-text", "inspect_tasks.add")
    expect(page.locator("#tasks tbody tr")).to_have_count(1)
    expect(page.locator("#tasks tbody tr")).to_have_attribute("data-task-id", ok.id)
    page.fill("#search-text", "")
    page.select_option("#search-state", "FAILURE")
    expect(page.locator("#tasks tbody tr")).to_have_count(1)
    expect(page.locator("#tasks tbody tr")).to_have_attribute("data-task-id", bad.id)
    page.select_option("#search-state", "")

    # The failed task's page: its arguments (the worker keeps them: --result-extended) and traceback.
    failed.locator("td.id a").click()
    expect(page.locator("#task-title")).to_have_attribute("data-state", "FAILURE")
    expect(page.locator("#task-args-value")).to_contain_text("card declined")
    expect(page.locator("#task-error")).to_have_text("ValueError: card declined")
    expect(page.locator("#task-traceback")).to_contain_text("raise ValueError(message)")
    expect(page.locator("#task-timeline tbody tr")).to_have_count(3)  # received, started, failed

    # The charts have drawn the two runs: one succeeded, one failed this minute.
    page.goto(url)
    expect(page.locator("#chart-throughput rect.ok")).to_have_count(1)
    expect(page.locator("#chart-throughput rect.bad")).to_have_count(1)

    # A workflow step's page links to its parent, whose page is there too.
    last = (inspect_tasks.add.s(1, 2) | inspect_tasks.add.s(10)).delay_sync()
    assert last.get_sync(timeout=20) == 13
    page.goto(f"{url}#/task/{last.id}")
    expect(page.locator("#task-title")).to_have_attribute("data-state", "SUCCESS")
    parent = page.locator("#task-parent_id a")
    expect(parent).to_have_count(1)
    parent_id = parent.inner_text()
    assert parent_id != last.id
    parent.click()
    expect(page.locator("#task-title")).to_contain_text(parent_id)
    expect(page.locator("#task-result")).to_have_text("3")


def test_revoke_and_terminate_buttons(worker_factory, dashboard, sync_client, page, tmp_path):
    from playwright.sync_api import expect

    marker, release = tmp_path / "marker", tmp_path / "release"
    worker_factory("inspect_tasks", concurrency=1, args=["--events"])
    url = dashboard().wait_url()
    open_live(page, url)

    running = inspect_tasks.hold.delay_sync(str(marker), str(release), "running")
    waiting = inspect_tasks.hold.delay_sync(str(marker), str(release), "waiting")
    run_row = page.locator(f"#tasks tr[data-task-id='{running.id}']")
    wait_row = page.locator(f"#tasks tr[data-task-id='{waiting.id}']")
    expect(run_row.locator("td.state")).to_have_text("STARTED")
    # The second one waits for the only slot (in the Python threads' queue: RECEIVED or STARTED).
    expect(wait_row.locator("td.state")).to_have_text(re.compile("RECEIVED|STARTED"))
    wait_for_line(marker, "start running")

    # Revoke the waiting one (it must never start), terminate the running one.
    wait_row.locator("button.revoke").click()
    expect(page.locator("#flash")).to_contain_text(f"task {waiting.id} revoked")
    run_row.locator("button.terminate").click()
    expect(run_row.locator("td.state")).to_have_text("REVOKED")
    expect(wait_row.locator("td.state")).to_have_text("REVOKED")
    expect(run_row.locator("button")).to_have_count(0)  # nothing left to revoke
    assert running.state_sync() == "REVOKED"
    assert waiting.state_sync() == "REVOKED"
    assert marker.read_text().splitlines()[0].startswith("start running"), "only the first one started"
    assert len(marker.read_text().splitlines()) == 1

    # From a task's own page too.
    third = inspect_tasks.hold.delay_sync(str(marker), str(release), "third")
    page.goto(f"{url}#/task/{third.id}")
    wait_for_line(marker, "start third")
    expect(page.locator("#task-title")).to_have_attribute("data-state", "STARTED")
    page.locator("#task-actions button.terminate").click()
    expect(page.locator("#task-title")).to_have_attribute("data-state", "REVOKED")
    assert third.state_sync() == "REVOKED"


def test_a_dead_letter_is_replayed_from_the_page(worker_factory, dashboard, sync_client, page, tmp_path):
    from playwright.sync_api import expect

    args = ["--events", "--max-deliver", "2", "--ack-wait", "1"]
    marker = tmp_path / "poison"
    marker.write_text("kill the worker")
    url = dashboard().wait_url()
    open_live(page, f"{url}#/dead")
    expect(page.locator("#dead-empty")).to_be_visible()

    poisoned = dead_tasks.poison.delay_sync(str(marker))
    workers = [worker_factory("dead_tasks", concurrency=1, args=args)]
    deadline = time.monotonic() + 60
    # The task kills its worker: start another, as a supervisor would, until it is dead-lettered.
    while poisoned.state_sync() != "FAILURE":
        assert time.monotonic() < deadline, "the poison task was not dead-lettered within 60 s"
        if workers[-1].proc.poll() is not None:
            workers.append(worker_factory("dead_tasks", concurrency=1, args=args))
        time.sleep(0.1)

    # The page shows it (live: the dead_lettered event makes it reload the list).
    row = page.locator("#dead tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text(poisoned.id)
    expect(row).to_contain_text("dead.poison")
    expect(row.locator("td.error")).to_contain_text("max_deliver=2")

    # Fixed, then replayed from the page: it runs to SUCCESS and leaves the list.
    marker.unlink()
    if workers[-1].proc.poll() is not None:
        workers.append(worker_factory("dead_tasks", concurrency=1, args=args))
    row.locator("button.replay").click()
    expect(page.locator("#flash")).to_contain_text("replayed to dbtask.tasks.default")
    expect(page.locator("#dead-empty")).to_be_visible()
    assert poisoned.get_sync(timeout=30) == "survived"
    page.goto(f"{url}#/task/{poisoned.id}")
    expect(page.locator("#task-title")).to_have_attribute("data-state", "SUCCESS")


def _get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_authentication_and_addresses(worker_factory, dashboard, page, nats, redis):
    from playwright.sync_api import expect

    # Not on a public address without a token or a password: refused, saying what to do.
    refused = dashboard("--address", "0.0.0.0")
    assert refused.proc.wait(20) == 2
    text = tail_text(refused.log)
    assert "refusing to serve the dashboard on 0.0.0.0 without authentication" in text, text
    assert "DBTASK_DASHBOARD_TOKEN" in text and "--basic-auth" in text, text

    w = worker_factory("inspect_tasks", args=["--events"])
    token = "s3cret-token-0123456789"
    guarded = dashboard(env={"DBTASK_DASHBOARD_TOKEN": token})
    url = guarded.wait_url()
    assert token not in tail_text(guarded.log)
    status, body = _get(url + "api/overview")
    assert status == 401 and "token" in body, (status, body)
    assert _get(url + "api/overview", {"Authorization": f"Bearer {token}"})[0] == 200
    assert _get(url + "api/overview", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    # A POST without the page's header is refused even with the token (another site's form).
    status, body = _get(url + "api/dead/1/replay", {"Authorization": f"Bearer {token}"}, data=b"{}")
    assert status == 403, (status, body)
    # A person opens the link with the token once; the page works from its cookie, and the
    # token leaves the address bar.
    page.goto(f"{url}?token={token}")
    page.wait_for_selector("body[data-live='1']", state="attached")
    assert "token" not in page.url
    expect(page.locator(f"#workers tr[data-worker='{worker_id(w)}'] td.status")).to_have_text("up")

    # Basic auth.
    url = dashboard("--basic-auth", "ops:pa55word").wait_url()
    status, _ = _get(url)
    assert status == 401
    good = base64.b64encode(b"ops:pa55word").decode()
    assert _get(url + "api/overview", {"Authorization": f"Basic {good}"})[0] == 200


def test_without_aiohttp_it_says_what_to_install(nats, redis):
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from dbtask._cli import main\n"
        "sys.exit(main(['dashboard']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=worker_env(DBTASK_NATS_URL=nats.url, DBTASK_REDIS_URL=redis.url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1, proc
    assert "pip install 'dbtask[dashboard]'" in proc.stderr, proc.stderr
