"""A task module that fails to import: the worker must stop with this traceback."""

from dbtask import task


@task
def never_runs():
    return None


raise RuntimeError("broken_app failed at import on purpose")
