"""Tasks and declared schedules of tests/test_periodic.py. `record` appends one line per run
to the file it is given: its task id, the worker's pid, the time, and its label."""

from __future__ import annotations

import os
import time

import dbtask
from dbtask import task


@task(bind=True)
def record(self, path: str, label: str = "", seconds: float = 0.0) -> str:
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{self.request.id} {os.getpid()} {time.time():.3f} {label}\n")
    if seconds:
        time.sleep(seconds)
    return label


# Declared here, applied by each worker that imports this module. The path comes from the
# worker's environment, set by the test that starts it.
_DECLARED = os.environ.get("PERIODIC_TEST_FILE")
if _DECLARED:
    dbtask.periodic("declared", record.s(_DECLARED, "declared"), every=int(os.environ.get("PERIODIC_TEST_EVERY", "1")))
