"""The Python error table matches the Rust error types: every exception type name the worker
(or the protocol crate) records by itself, `"dbtask.<Name>"` in the Rust sources, comes back
from `get()` as its own `dbtask.<Name>` class, so that users can catch it by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import dbtask
from dbtask._errors import error_from_record

REPO = Path(__file__).resolve().parents[2]
RUST_SOURCES = [REPO / "protocol" / "src", REPO / "worker" / "src", REPO / "client-py" / "src"]
TYPE_NAME = re.compile(r'"dbtask\.([A-Z][A-Za-z]*)"')


def rust_error_type_names() -> set[str]:
    names: set[str] = set()
    for root in RUST_SOURCES:
        for path in root.rglob("*.rs"):
            names.update(TYPE_NAME.findall(path.read_text()))
    return names


def test_the_rust_sources_name_the_worker_error_types():
    # The scan itself works: these have been recorded by the worker since the start.
    assert {"UnknownTask", "MalformedMessage", "InvalidArguments", "TooLarge"} <= rust_error_type_names()


@pytest.mark.parametrize("name", sorted(rust_error_type_names()))
def test_each_rust_error_type_is_a_python_exception_of_the_same_name(name):
    cls = getattr(dbtask, name, None)
    assert isinstance(cls, type) and issubclass(cls, dbtask.TaskError), f"dbtask.{name} is missing"
    assert name in dbtask.__all__

    state = "REVOKED" if issubclass(cls, dbtask.TaskRevoked) else "FAILURE"
    record = {"id": "t1", "state": state, "error": {"type": f"dbtask.{name}", "message": "why", "traceback": None}}
    err = error_from_record(record)
    assert type(err) is cls
    assert (err.task_id, err.exc_type, err.message) == ("t1", f"dbtask.{name}", "why")
