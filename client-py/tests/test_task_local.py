"""A task declared and called in this process: ``import dbtask`` and ``@task`` need neither
the compiled module nor a server, and sending before ``init`` says what to call."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

import dbtask
from conftest import PY, add


@dbtask.task
async def amul(x: int, y: int) -> int:
    return x * y


def test_import_and_task_do_not_load_the_extension():
    code = (
        "import sys, dbtask\n"
        "@dbtask.task\n"
        "def f(x): return x + 1\n"
        "@dbtask.task(name='g', queue='q1')\n"
        "async def g(x): return x\n"
        "from dbtask._registry import TASKS\n"
        "assert TASKS['__main__.f'] is f and f(1) == 2 and not f.is_async\n"
        "assert TASKS['g'].is_async and TASKS['g'].queue == 'q1' and g.options == {}\n"
        "assert 'dbtask._dbtask' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([PY, "-c", code], check=True)


def test_task_attributes_and_local_call():
    assert add.name == "t.add" and add.queue == "math" and not add.is_async
    assert add.options == {"max_retries": 5, "retry_delay": 1.0}
    assert add(1, 2) == 3
    assert amul.name == f"{__name__}.amul" and amul.queue == "default" and amul.is_async
    assert asyncio.run(amul(3, 4)) == 12
    assert isinstance(amul, dbtask.Task) and isinstance(amul, dbtask.AsyncTask)
    with pytest.raises(ValueError, match="invalid queue name"):
        dbtask.task(queue="a.b")(lambda: None)


def test_used_before_init_is_a_runtime_error():
    dbtask.close_sync()
    with pytest.raises(RuntimeError, match=r"call dbtask.init\(...\) or dbtask.init_sync\(...\) first"):
        add.delay_sync(1, 2)
    with pytest.raises(RuntimeError, match="not initialized"):
        dbtask.AsyncResult("x").state_sync()

