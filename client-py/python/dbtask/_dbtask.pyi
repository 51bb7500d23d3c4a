"""Stub of the compiled module `dbtask._dbtask` (Rust, PyO3). Private: use the `dbtask` API."""

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, final, overload

_T = TypeVar("_T")

__all__ = ["Client", "PublishOptions", "Admin", "_after_fork_in_child", "new_task_id", "__version__", "PROTOCOL_VERSION"]

__version__: str
PROTOCOL_VERSION: int

@final
class PublishOptions:
    """The options of a publish (task id, eta and expires as Unix seconds, priority 0-9),
    checked once when made."""

    def __init__(
        self,
        *,
        task_id: str | None = None,
        eta: float | None = None,
        expires: float | None = None,
        priority: int | None = None,
        ignore_result: bool | None = None,
    ) -> None: ...
    @property
    def priority(self) -> int | None: ...

@final
class ProgressStream:
    """A task's states as they are stored: ``next()`` gives each record, None after the final one."""

    def next(self, timeout: float | None = None) -> Awaitable[dict[str, Any] | None]: ...
    def next_sync(self, timeout: float | None = None) -> dict[str, Any] | None: ...
    def close(self) -> None: ...

@final
class Client:
    """A connection to NATS (JetStream) and Redis, shared by the whole process."""

    @staticmethod
    def connect(
        nats_url: str,
        redis_url: str,
        timeout: float,
        *,
        nats_tls_ca: str | None = None,
        nats_tls_cert: str | None = None,
        nats_tls_key: str | None = None,
        nats_creds: str | None = None,
        nats_nkey: str | None = None,
        message_key: str | None = None,
        redis_ca: str | None = None,
        redis_cert: str | None = None,
        redis_key: str | None = None,
        stream_replicas: int = 1,
    ) -> Awaitable[Client]: ...
    @staticmethod
    def connect_sync(
        nats_url: str,
        redis_url: str,
        timeout: float,
        *,
        nats_tls_ca: str | None = None,
        nats_tls_cert: str | None = None,
        nats_tls_key: str | None = None,
        nats_creds: str | None = None,
        nats_nkey: str | None = None,
        message_key: str | None = None,
        redis_ca: str | None = None,
        redis_cert: str | None = None,
        redis_key: str | None = None,
        stream_replicas: int = 1,
    ) -> Client: ...
    @overload
    def publish(
        self,
        queue: str,
        task: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None = None,
        options: PublishOptions | None = None,
        wrap: None = None,
        trace: tuple[str, str | None] | None = None,
    ) -> asyncio.Future[str]: ...
    @overload
    def publish(
        self,
        queue: str,
        task: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        options: PublishOptions | None,
        wrap: Callable[[str], _T],
        trace: tuple[str, str | None] | None = None,
    ) -> asyncio.Future[_T]: ...
    def publish_sync(
        self,
        queue: str,
        task: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None = None,
        options: PublishOptions | None = None,
        trace: tuple[str, str | None] | None = None,
    ) -> str: ...
    def publish_many(
        self,
        queue: str,
        task: str,
        calls: Iterable[tuple[Sequence[Any], Mapping[str, Any] | None]],
        eta: float | None = None,
        expires: float | None = None,
        priority: int | None = None,
        trace: tuple[str, str | None] | None = None,
    ) -> Awaitable[list[str]]: ...
    def publish_many_sync(
        self,
        queue: str,
        task: str,
        calls: Iterable[tuple[Sequence[Any], Mapping[str, Any] | None]],
        eta: float | None = None,
        expires: float | None = None,
        priority: int | None = None,
        trace: tuple[str, str | None] | None = None,
    ) -> list[str]: ...
    def publish_workflow(
        self, signature: str, group_ttl: float, trace: tuple[str, str | None] | None = None
    ) -> Awaitable[None]: ...
    def publish_workflow_sync(
        self, signature: str, group_ttl: float, trace: tuple[str, str | None] | None = None
    ) -> None: ...
    def get_group(self, group_id: str) -> Awaitable[str | None]: ...
    def get_group_sync(self, group_id: str) -> str | None: ...
    def get_record(self, task_id: str) -> Awaitable[dict[str, Any] | None]: ...
    def get_record_sync(self, task_id: str) -> dict[str, Any] | None: ...
    def wait(self, task_id: str, timeout: float | None = None) -> Awaitable[dict[str, Any]]: ...
    def wait_sync(self, task_id: str, timeout: float | None = None) -> dict[str, Any]: ...
    def progress(self, task_id: str) -> ProgressStream: ...
    def forget(self, task_id: str) -> Awaitable[None]: ...
    def forget_sync(self, task_id: str) -> None: ...
    def revoke(self, task_id: str, terminate: bool, ttl: float) -> Awaitable[None]: ...
    def revoke_sync(self, task_id: str, terminate: bool, ttl: float) -> None: ...
    def close(self) -> Awaitable[None]: ...
    def close_sync(self) -> None: ...
    def connected_to(
        self,
        nats_url: str,
        redis_url: str,
        *,
        nats_tls_ca: str | None = None,
        nats_tls_cert: str | None = None,
        nats_tls_key: str | None = None,
        nats_creds: str | None = None,
        nats_nkey: str | None = None,
        message_key: str | None = None,
        redis_ca: str | None = None,
        redis_cert: str | None = None,
        redis_key: str | None = None,
    ) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def nats_url(self) -> str: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def stream_replicas(self) -> int: ...

def _after_fork_in_child() -> None: ...
def new_task_id() -> str: ...
def encode_task(
    queue: str,
    task: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    options: PublishOptions | None = None,
) -> bytes: ...

@final
class Admin:
    """Operator commands on JetStream (used by the ``dbtask`` command line)."""

    @staticmethod
    def connect_sync(
        nats_url: str,
        timeout: float = 5.0,
        *,
        nats_tls_ca: str | None = None,
        nats_tls_cert: str | None = None,
        nats_tls_key: str | None = None,
        nats_creds: str | None = None,
        nats_nkey: str | None = None,
    ) -> Admin: ...
    def dead_list(
        self, queue: str | None = None, start: int = 1, limit: int = 100
    ) -> list[tuple[int, str, dict[str, str], str]]: ...
    def dead_get(self, sequence: int) -> tuple[int, str, dict[str, str], str] | None: ...
    def dead_replay(self, sequence: int) -> tuple[str, int]: ...
    def dead_purge(self, queue: str | None = None) -> int: ...
    def events(self) -> EventSubscription: ...
    def request_all(self, command: str, body: str, timeout: float, expect: int | None = None) -> list[str]: ...
    def scheduled(self, start: int = 1, limit: int = 100) -> list[tuple[int, str, dict[str, str], str]]: ...
    def purge_queue(self, queue: str) -> int: ...

@final
class EventSubscription:
    """The workers' events (``dbtask.events.>``), made by ``Admin.events``."""

    def next_sync(self, timeout: float | None = None) -> tuple[str, str] | None: ...

@final
class Schedules:
    """Periodic schedules on the connected client's servers (``dbtask.schedule`` and the rest;
    a declaration is the JSON made by ``dbtask._periodic.declaration``)."""

    def __init__(self, client: Client) -> None: ...
    def schedule(self, declaration: str) -> Awaitable[None]: ...
    def schedule_sync(self, declaration: str) -> None: ...
    def unschedule(self, name: str) -> Awaitable[bool]: ...
    def unschedule_sync(self, name: str) -> bool: ...
    def list(self) -> Awaitable[str]: ...
    def list_sync(self) -> str: ...
    def run(self, name: str) -> Awaitable[str]: ...
    def run_sync(self, name: str) -> str: ...
