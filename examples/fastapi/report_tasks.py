"""The tasks of the FastAPI example (app.py): a report built in steps that tells its progress."""

import time

from dbtask import task


@task(bind=True)
def build_report(self, rows: int, step_seconds: float = 0.05) -> dict:
    for done in range(1, rows + 1):
        time.sleep(step_seconds)  # the work of one row
        self.update_state(state="PROGRESS", meta={"done": done, "total": rows})
    return {"rows": rows, "status": "ready"}
