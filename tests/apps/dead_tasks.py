"""Tasks of tests/test_dead_letters.py."""

import os

from dbtask import task


@task(name="dead.poison")
def poison(marker: str) -> str:
    """Kills its worker process while `marker` exists (a task no worker survives)."""
    if os.path.exists(marker):
        os._exit(1)
    return "survived"
