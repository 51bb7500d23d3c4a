"""The FastAPI integration (dbtask.contrib.fastapi) through the example app in
examples/fastapi, driven by FastAPI's test client against real servers and a real worker."""

from __future__ import annotations

import importlib.util
import json
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

import dbtask
from dbtask.contrib.fastapi import dbtask_lifespan
from e2e_support import TESTS

EXAMPLE = TESTS.parent / "examples" / "fastapi"


def _example_app(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    spec = importlib.util.spec_from_file_location("fastapi_example_app", EXAMPLE / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


def _events(body: str) -> list[tuple[str, dict]]:
    out = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_the_example_app_enqueues_and_streams_the_progress(worker_factory, nats, redis, monkeypatch):
    monkeypatch.setenv("DBTASK_NATS_URL", nats.url)
    monkeypatch.setenv("DBTASK_REDIS_URL", redis.url)
    worker_factory("report_tasks", env={"PYTHONPATH": str(EXAMPLE)})
    app = _example_app(monkeypatch)

    with TestClient(app) as http:  # the lifespan connects dbtask
        assert http.post("/reports", params={"rows": 0}).status_code == 422
        started = http.post("/reports", params={"rows": 12})
        assert started.status_code == 202
        task_id = started.json()["id"]

        with http.stream("GET", f"/reports/{task_id}/progress") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = _events("".join(stream.iter_text()))
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "success" and events[-1][1]["result"] == {"rows": 12, "status": "ready"}
        progress = [record["meta"]["done"] for kind, record in events if kind == "progress"]
        assert progress, f"no progress event before the result: {kinds}"
        assert progress == sorted(set(progress)) and progress[-1] <= 12
        assert all(record["meta"]["total"] == 12 for kind, record in events if kind == "progress")

        record = http.get(f"/reports/{task_id}").json()
        assert record["state"] == "SUCCESS" and record["task"] == "report_tasks.build_report"

    # The lifespan closed the client when the app stopped.
    with pytest.raises(RuntimeError, match="not initialized"):
        dbtask.AsyncResult(task_id).state_sync()


def test_an_unreachable_server_fails_the_app_start():
    app = FastAPI(lifespan=dbtask_lifespan(nats_url="nats://127.0.0.1:1", redis_url="redis://127.0.0.1:1", timeout=1))
    with pytest.raises(ConnectionError):
        with TestClient(app):
            pass


def test_the_application_s_own_lifespan_runs_inside_dbtask_s(nats, redis):
    seen = []

    @asynccontextmanager
    async def own(app):
        seen.append(await dbtask.AsyncResult("x").state())  # raises unless dbtask is connected
        yield {"ready": True}
        seen.append("stopping")

    app = FastAPI(lifespan=dbtask_lifespan(nats_url=nats.url, redis_url=redis.url, then=own))

    @app.get("/ready")
    async def ready(request: Request) -> dict:
        return {"ready": request.state.ready}

    with TestClient(app) as http:
        assert seen == ["PENDING"]  # dbtask was connected when the app's own lifespan began
        assert http.get("/ready").json() == {"ready": True}
    assert seen == ["PENDING", "stopping"]
