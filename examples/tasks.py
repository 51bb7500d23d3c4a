"""Example task module, imported by the worker with `dbtask-worker -A tasks` (run from this
folder) and by the example clients, which enqueue its tasks.

Task names default to `<module>.<function>`: here `tasks.add`, `tasks.greet`, `tasks.divide`.
The worker runs only the names that the modules it imported registered.
"""

import asyncio

from dbtask import task


@task
def add(x: int, y: int) -> int:
    """A plain `def` task: runs on the worker's pool of Python threads."""
    return x + y


@task
async def greet(name: str, delay: float = 0.1) -> str:
    """An `async def` task: runs on the worker's asyncio loop."""
    await asyncio.sleep(delay)
    return f"hello, {name}"


@task
def divide(x: float, y: float) -> float:
    """Fails with ZeroDivisionError when y is 0: the client re-raises that exception."""
    return x / y
