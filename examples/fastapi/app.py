"""A FastAPI application that enqueues work from an endpoint and streams its progress.

    cd examples/fastapi
    dbtask-worker -A report_tasks &                  # a worker for the tasks
    uvicorn app:app                                  # needs fastapi and uvicorn

    curl -X POST 'localhost:8000/reports?rows=20'    # {"id": "..."}
    curl -N localhost:8000/reports/<id>/progress     # server-sent events, one per step, then SUCCESS
    curl localhost:8000/reports/<id>                 # the task's record

Settings come from DBTASK_NATS_URL, DBTASK_REDIS_URL... (dbtask.contrib.fastapi.lifespan).
"""

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse

import dbtask
from dbtask.contrib.fastapi import lifespan, sse_progress
from report_tasks import build_report

app = FastAPI(lifespan=lifespan)


@app.post("/reports", status_code=202)
async def start_report(rows: int = 10) -> dict:
    if not 1 <= rows <= 10_000:
        raise HTTPException(422, "rows must be between 1 and 10000")
    result = await build_report.delay(rows)
    return {"id": result.id}


@app.get("/reports/{task_id}")
async def report(task_id: str) -> dict:
    return await dbtask.AsyncResult(task_id).info()


@app.get("/reports/{task_id}/progress")
async def report_progress(task_id: str) -> StreamingResponse:
    return StreamingResponse(sse_progress(dbtask.AsyncResult(task_id), timeout=60), media_type="text/event-stream")
