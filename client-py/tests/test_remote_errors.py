"""A failed task's error, raised by ``get()``: builtin exceptions as themselves with the
remote traceback as their cause, dbtask's own errors as their classes, anything else as
``TaskError``."""

from __future__ import annotations

import pytest

import dbtask
from conftest import store


def failure(task_id: str, exc_type: str, message: str, tb: str | None = "Traceback...\nboom") -> dict:
    error = {"type": exc_type, "message": message}
    if tb is not None:
        error["traceback"] = tb
    return {"id": task_id, "state": "FAILURE", "error": error, "task": "t.add"}


def test_builtin_exceptions_are_re_raised_with_the_remote_traceback(client, redis):
    store(redis, failure("err-1", "ValueError", "bad input"))
    with pytest.raises(ValueError, match="^bad input$") as info:
        dbtask.AsyncResult("err-1").get_sync(timeout=5)
    assert isinstance(info.value.__cause__, dbtask.RemoteTraceback)
    assert "boom" in str(info.value.__cause__)
    assert info.value.task_id == "err-1" and info.value.exc_type == "ValueError"

    store(redis, failure("err-2", "KeyError", "'missing'"))
    with pytest.raises(KeyError) as info:
        dbtask.AsyncResult("err-2").get_sync(timeout=5)
    assert info.value.args == ("missing",)

    store(redis, failure("err-3", "ZeroDivisionError", "division by zero", tb=None))
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        dbtask.AsyncResult("err-3").get_sync(timeout=5)


async def test_other_exceptions_are_task_errors(client, redis):
    store(redis, failure("err-4", "myapp.errors.Declined", "card declined"))
    with pytest.raises(dbtask.TaskError) as info:
        await dbtask.AsyncResult("err-4").get(timeout=5)
    err = info.value
    assert type(err) is dbtask.TaskError
    assert (err.task_id, err.exc_type, err.message) == ("err-4", "myapp.errors.Declined", "card declined")
    assert err.traceback == "Traceback...\nboom"
    assert str(err) == "myapp.errors.Declined: card declined"

    for name, cls in [("UnknownTask", dbtask.UnknownTask), ("InvalidArguments", dbtask.InvalidArguments),
                      ("MalformedMessage", dbtask.MalformedMessage), ("TooLarge", dbtask.TooLarge),
                      ("UnserializableResult", dbtask.UnserializableResult)]:  # fmt: skip
        store(redis, failure(f"err-{name}", f"dbtask.{name}", "refused", tb=None))
        with pytest.raises(cls, match=f"dbtask.{name}: refused"):
            await dbtask.AsyncResult(f"err-{name}").get(timeout=5)

    # A "builtin" name that is not an exception class, and one whose constructor differs.
    store(redis, failure("err-5", "print", "x"))
    with pytest.raises(dbtask.TaskError):
        await dbtask.AsyncResult("err-5").get(timeout=5)
    store(redis, failure("err-6", "UnicodeDecodeError", "'utf-8' codec can't decode"))
    with pytest.raises(dbtask.TaskError, match="UnicodeDecodeError"):
        await dbtask.AsyncResult("err-6").get(timeout=5)

    store(redis, {"id": "err-7", "state": "REVOKED"})
    with pytest.raises(dbtask.TaskRevoked):
        await dbtask.AsyncResult("err-7").get(timeout=5)

