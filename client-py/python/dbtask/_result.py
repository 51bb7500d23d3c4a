"""AsyncResult: a handle on a task's outcome, made from its id in any process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Generic, TypeVar

from . import _client, _revoke
from ._revoke import DEFAULT_REVOKE_TTL
from ._errors import ResultIgnored, error_from_record

__all__ = ["AsyncResult", "IgnoredResult", "STATES", "READY_STATES"]

T = TypeVar("T")

STATES = ("PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED")
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def _outcome(record: dict[str, Any]) -> Any:
    if record.get("state") == "SUCCESS":
        return record.get("result")
    raise error_from_record(record)


def _info(task_id: str, record: dict[str, Any] | None) -> dict[str, Any]:
    return record if record is not None else {"id": task_id, "state": "PENDING"}


class AsyncResult(Generic[T]):
    """The outcome of one task, by id. ``AsyncResult(id)`` works in any process.

    Async methods have a blocking twin with the suffix ``_sync`` (for scripts and sync web
    views; it releases the GIL while it waits and needs no event loop).
    """

    __slots__ = ("id",)

    def __init__(self, id: str) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError(f"task id must be a non-empty string, not {id!r}")
        self.id = id

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    async def get(self, timeout: float | None = None) -> T:
        """Waits until the task is ready and returns its result, or raises its error.

        A builtin exception raised by the task (``ValueError``...) is re-raised as itself with
        the remote traceback as ``__cause__``; anything else raises :class:`dbtask.TaskError`.
        Raises ``TimeoutError`` when ``timeout`` seconds pass first (``None``: wait forever).
        If Redis is unreachable, a wait with a ``timeout`` goes on waiting for it to come back
        and raises ``ConnectionError`` if it has not by then; without a ``timeout`` it raises
        ``ConnectionError`` at once.
        """
        record = await _client.current().wait(self.id, timeout)
        return _outcome(record)  # type: ignore[no-any-return]

    def get_sync(self, timeout: float | None = None) -> T:
        """Blocking form of :meth:`get`."""
        record = _client.current().wait_sync(self.id, timeout)
        return _outcome(record)  # type: ignore[no-any-return]

    async def state(self) -> str:
        """One of PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED."""
        record = await _client.current().get_record(self.id)
        return "PENDING" if record is None else str(record["state"])

    def state_sync(self) -> str:
        """Blocking form of :meth:`state`."""
        record = _client.current().get_record_sync(self.id)
        return "PENDING" if record is None else str(record["state"])

    async def ready(self) -> bool:
        """True once the task succeeded, failed or was revoked."""
        return (await self.state()) in READY_STATES

    def ready_sync(self) -> bool:
        """Blocking form of :meth:`ready`."""
        return self.state_sync() in READY_STATES

    async def info(self) -> dict[str, Any]:
        """The whole stored record, or ``{"id": ..., "state": "PENDING"}`` when there is none:
        id, state, task, queue, result (SUCCESS) or error {type, message, traceback} (FAILURE,
        RETRY: the last error, REVOKED), attempts, retries (when > 0), worker, date_received,
        date_started, date_done, eta (RETRY: when the next attempt is due), and args / kwargs
        when the worker runs with ``result_extended``."""
        return _info(self.id, await _client.current().get_record(self.id))

    def info_sync(self) -> dict[str, Any]:
        """Blocking form of :meth:`info`."""
        return _info(self.id, _client.current().get_record_sync(self.id))

    async def revoke(self, terminate: bool = False, *, ttl: float = DEFAULT_REVOKE_TTL) -> None:
        """Revokes this task on every worker (see :func:`dbtask.revoke`)."""
        await _revoke.revoke(self.id, terminate, ttl=ttl)

    def revoke_sync(self, terminate: bool = False, *, ttl: float = DEFAULT_REVOKE_TTL) -> None:
        """Blocking form of :meth:`revoke`."""
        _revoke.revoke_sync(self.id, terminate, ttl=ttl)

    async def forget(self) -> None:
        """Deletes the task's record from Redis: its state reads PENDING again."""
        await _client.current().forget(self.id)

    def forget_sync(self) -> None:
        """Blocking form of :meth:`forget`."""
        _client.current().forget_sync(self.id)

    async def progress(self, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Each state the task stores as it happens, its record as a dict (see :meth:`info`):
        ``async for update in result.progress(): print(update["state"], update.get("meta"))``.

        Yields the current record first (when there is one), then every update
        (``update_state``, a retry...) as the worker stores it, heard on the same notification
        channel as :meth:`get`: no polling. Ends after the final record (SUCCESS, FAILURE or
        REVOKED), which it yields too. A state stored and replaced while the connection to
        Redis was down is skipped: the stream resumes from the current record.
        ``timeout``: seconds to wait for each update (``TimeoutError``); None waits for ever.
        """
        stream = _client.current().progress(self.id)
        try:
            while True:
                record = await stream.next(timeout)
                if record is None:
                    return
                yield record
        finally:
            stream.close()

    def progress_sync(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Blocking form of :meth:`progress`: ``for update in result.progress_sync(): ...``."""
        stream = _client.current().progress(self.id)
        try:
            while True:
                record = stream.next_sync(timeout)
                if record is None:
                    return
                yield record
        finally:
            stream.close()


class IgnoredResult(AsyncResult[T]):
    """The result of a call sent with ``ignore_result``: the worker stores no record on
    success, so :meth:`get` raises :class:`dbtask.ResultIgnored` at once instead of waiting
    for ever. The other methods work as for any result (a failure is still recorded, unless
    the task says ``store_errors_even_if_ignored=False``)."""

    __slots__ = ()

    def _refuse(self) -> ResultIgnored:
        return ResultIgnored(
            f"task {self.id} was sent with ignore_result: no result is stored on success, "
            "so get() has nothing to wait for (info() shows a recorded failure)"
        )

    async def get(self, timeout: float | None = None) -> T:
        raise self._refuse()

    def get_sync(self, timeout: float | None = None) -> T:
        raise self._refuse()
