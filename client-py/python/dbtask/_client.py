"""The process-wide client: one connection to NATS and one to Redis, shared by every task.

`init` / `init_sync` connect it; everything else finds it here. The compiled module
(`dbtask._dbtask`) is imported on first use only, so that `import dbtask` and `@task` work in
the worker's embedded interpreter and in code that only declares tasks.

Calling `init` again with the same URLs keeps the existing connections (so calling it at
every start-up hook is cheap); with other URLs it connects anew, swaps the new client in, and
closes the old one once its in-flight calls are done. If the new connection fails, the old
client stays in place and the error is raised.

After `os.fork()` the child does not inherit the connection (sockets and the I/O thread do not
survive a fork): call `init` again in the child (e.g. gunicorn's `post_fork`).
"""

from __future__ import annotations

import os
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from . import _otel

if TYPE_CHECKING:
    from ._dbtask import Client

__all__ = ["init", "init_sync", "close", "close_sync", "current"]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DEFAULT_TIMEOUT = 5.0

NOT_INITIALIZED = "dbtask is not initialized: call dbtask.init(...) or dbtask.init_sync(...) first"

_lock = threading.Lock()
_client: Optional["Client"] = None
_forked = False
# Connects the client when `current` finds none: set by a framework integration that knows the
# settings (dbtask.contrib.django), so that the first call connects, in any process, including
# one forked from a process that had connected. None: `current` raises instead.
connect_on_demand: Optional[Callable[[], None]] = None
# Clients inherited through fork(): kept alive, never closed or dropped, because their
# connections and tasks belong to the parent's I/O thread.
_orphans: list["Client"] = []


def _native() -> ModuleType:
    from . import _dbtask

    return _dbtask


def current() -> "Client":
    """The connected client, or RuntimeError."""
    client = _client
    if client is None and connect_on_demand is not None:
        connect_on_demand()
        client = _client
    if client is None:
        if _forked:
            raise RuntimeError(
                NOT_INITIALIZED + " (this process was forked from one that called init: "
                "connections do not survive os.fork(), call init again in the child)"
            )
        raise RuntimeError(NOT_INITIALIZED)
    return client


# NATS TLS and credentials (docs/security.md): the keywords of `init`, each defaulting to the
# environment variable the worker reads for the same setting.
NATS_SECURITY = ("nats_tls_ca", "nats_tls_cert", "nats_tls_key", "nats_creds", "nats_nkey")
# Redis TLS (docs/deployment.md, "Redis"): the same, for a rediss:// Redis.
REDIS_TLS = ("redis_ca", "redis_cert", "redis_key")
PathArg = Union[str, "os.PathLike[str]", None]


def _security(given: dict[str, PathArg], names: tuple[str, ...] = NATS_SECURITY) -> dict[str, str]:
    """The NATS TLS and credential files (or other `names`): the keywords given, else
    ``$DBTASK_NATS_TLS_CA``...; unset ones left out."""
    out: dict[str, str] = {}
    for name in names:
        value = given[name]
        if value is None:
            value = os.environ.get("DBTASK_" + name.upper()) or None
        if value is None:
            continue
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path (str or os.PathLike), not {type(value).__name__}")
        out[name] = os.fspath(value)
    return out


NatsUrl = Union[str, Sequence[str], None]


def _seeds(nats_url: NatsUrl) -> str:
    """`nats_url` as one string: a URL, or seed servers separated by commas (a list of URLs is
    joined with commas). Defaults to ``$DBTASK_NATS_URL``, then ``nats://127.0.0.1:4222``."""
    if nats_url is None:
        return os.environ.get("DBTASK_NATS_URL", DEFAULT_NATS_URL)
    if isinstance(nats_url, str):
        return nats_url
    if isinstance(nats_url, (list, tuple)) and all(isinstance(u, str) for u in nats_url):
        if not nats_url:
            raise ValueError("nats_url is an empty list: give at least one NATS server URL")
        return ",".join(nats_url)
    raise TypeError(f"nats_url must be a string or a list of strings, not {type(nats_url).__name__}")


def _replicas(stream_replicas: int | None) -> int:
    """`stream_replicas`, else ``$DBTASK_STREAM_REPLICAS``, else 1; checked by the client."""
    if stream_replicas is None:
        text = os.environ.get("DBTASK_STREAM_REPLICAS") or "1"
        try:
            stream_replicas = int(text)
        except ValueError:
            raise ValueError(f"$DBTASK_STREAM_REPLICAS must be a whole number, not {text!r}") from None
    if isinstance(stream_replicas, bool) or not isinstance(stream_replicas, int):
        raise TypeError(f"stream_replicas must be an int, not {type(stream_replicas).__name__}")
    if not 1 <= stream_replicas <= 5:
        raise ValueError(
            f"stream_replicas must be between 1 and 5 (3 on a NATS cluster of 3 servers or more), not {stream_replicas}"
        )
    return stream_replicas


def _resolve(nats_url: NatsUrl, redis_url: str | None, timeout: float) -> tuple[str, str, float]:
    nats = _seeds(nats_url)
    redis = redis_url if redis_url is not None else os.environ.get("DBTASK_REDIS_URL", DEFAULT_REDIS_URL)
    if not isinstance(redis, str):
        raise TypeError("redis_url must be a string")
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return nats, redis, timeout


def _keep(nats: str, redis: str, security: dict[str, str], replicas: int) -> bool:
    client = _client
    return (
        client is not None
        and client.connected_to(nats, redis, **security)
        and client.stream_replicas == replicas
    )


def _install(new: "Client") -> Optional["Client"]:
    """Makes `new` the current client; returns the one it replaces."""
    global _client, _forked
    with _lock:
        old, _client = _client, new
        _forked = False
    return old if old is not new else None


async def init(
    nats_url: NatsUrl = None,
    redis_url: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    nats_tls_ca: PathArg = None,
    nats_tls_cert: PathArg = None,
    nats_tls_key: PathArg = None,
    nats_creds: PathArg = None,
    nats_nkey: PathArg = None,
    message_key: PathArg = None,
    stream_replicas: int | None = None,
    redis_ca: PathArg = None,
    redis_cert: PathArg = None,
    redis_key: PathArg = None,
    eager: bool = False,
) -> None:
    """Connects to NATS and Redis (awaitable form of :func:`init_sync`).

    URLs default to ``$DBTASK_NATS_URL`` / ``$DBTASK_REDIS_URL``, then
    ``nats://127.0.0.1:4222`` / ``redis://127.0.0.1:6379``. ``nats_url`` may name several
    seed servers of a NATS cluster, separated by commas or as a list: the client connects to
    any that answers and moves to another server when its own dies. ``timeout`` bounds the
    connection attempt. Raises ConnectionError (the URL with its password hidden) when a
    server cannot be reached.

    Creates the task stream when it is missing, with ``stream_replicas`` copies of each
    message (default ``$DBTASK_STREAM_REPLICAS``, else 1; give a NATS cluster the count its
    workers get with ``--stream-replicas``); a stream that exists is left to the workers.

    NATS over TLS and with credentials (docs/security.md), each a file path, defaulting to
    ``$DBTASK_NATS_TLS_CA``... as for the worker: ``nats_tls_ca`` the CA certificate (PEM)
    that signed the server's certificate (TLS is then required), ``nats_tls_cert`` and
    ``nats_tls_key`` a client certificate and its key (mutual TLS), ``nats_creds`` a
    ``.creds`` file (user JWT and nkey seed), ``nats_nkey`` a file holding an nkey user seed.
    A missing or wrong file raises ValueError naming the keyword.

    ``message_key`` (default ``$DBTASK_MESSAGE_KEY``): a file holding the key (at least 32
    bytes) every task message is signed with, for workers started with ``--message-key``
    (docs/security.md).

    Redis URLs: ``redis://`` (``rediss://`` for TLS), a Redis Cluster as
    ``redis+cluster://host1:7000,host2:7001``, a Sentinel group as
    ``redis+sentinel://[:password@]host1:26379,host2:26379/<master-name>[/db]``
    (docs/deployment.md). For TLS, ``redis_ca`` (default ``$DBTASK_REDIS_CA``) is a CA
    certificate (PEM) to trust instead of the system's, ``redis_cert`` and ``redis_key`` a
    client certificate and its key.

    One client serves the whole process, every thread and event loop, async and sync API
    alike. Calling ``init`` again with the same settings keeps it; other ones replace it (the
    old one is closed after the new one connected).

    ``eager=True``: connect to nothing; ``delay()``, ``apply_async()`` and workflows run the
    tasks in this process, through the same argument checks and JSON encoding, and ``get()``
    returns their stored outcome (docs/testing.md, "Eager mode"). For tests without servers.

    With ``opentelemetry-api`` installed, each publish carries the current trace context
    (docs/tracing.md).
    """
    if eager:
        old = _install(_eager_client())
        if old is not None:
            await old.close()
        return
    nats, redis, timeout = _resolve(nats_url, redis_url, timeout)
    security = _security(
        dict(nats_tls_ca=nats_tls_ca, nats_tls_cert=nats_tls_cert, nats_tls_key=nats_tls_key,
             nats_creds=nats_creds, nats_nkey=nats_nkey)
    )  # fmt: skip
    security.update(_security({"message_key": message_key}, ("message_key",)))
    security.update(
        _security(dict(redis_ca=redis_ca, redis_cert=redis_cert, redis_key=redis_key), REDIS_TLS)
    )
    replicas = _replicas(stream_replicas)
    if _keep(nats, redis, security, replicas):
        return
    new = await _native().Client.connect(nats, redis, timeout, **security, stream_replicas=replicas)
    old = _install(_otel.traced_client(new))
    if old is not None:
        await old.close()


def init_sync(
    nats_url: NatsUrl = None,
    redis_url: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    nats_tls_ca: PathArg = None,
    nats_tls_cert: PathArg = None,
    nats_tls_key: PathArg = None,
    nats_creds: PathArg = None,
    nats_nkey: PathArg = None,
    message_key: PathArg = None,
    stream_replicas: int | None = None,
    redis_ca: PathArg = None,
    redis_cert: PathArg = None,
    redis_key: PathArg = None,
    eager: bool = False,
) -> None:
    """Connects to NATS and Redis, blocking; see :func:`init`. Usable with or without asyncio:
    the client made here serves the async API too, from any thread and event loop.
    ``eager=True``: tasks run in this process, no server (docs/testing.md, "Eager mode")."""
    if eager:
        old = _install(_eager_client())
        if old is not None:
            old.close_sync()
        return
    nats, redis, timeout = _resolve(nats_url, redis_url, timeout)
    security = _security(
        dict(nats_tls_ca=nats_tls_ca, nats_tls_cert=nats_tls_cert, nats_tls_key=nats_tls_key,
             nats_creds=nats_creds, nats_nkey=nats_nkey)
    )  # fmt: skip
    security.update(_security({"message_key": message_key}, ("message_key",)))
    security.update(
        _security(dict(redis_ca=redis_ca, redis_cert=redis_cert, redis_key=redis_key), REDIS_TLS)
    )
    replicas = _replicas(stream_replicas)
    if _keep(nats, redis, security, replicas):
        return
    new = _native().Client.connect_sync(nats, redis, timeout, **security, stream_replicas=replicas)
    old = _install(_otel.traced_client(new))
    if old is not None:
        old.close_sync()


def _eager_client() -> "Client":
    """A new eager client (``init(eager=True)``), loading the compiled module (its encoder)."""
    from ._eager import EagerClient

    _native()
    return EagerClient()  # type: ignore[return-value]


def _take() -> Optional["Client"]:
    global _client
    with _lock:
        client, _client = _client, None
    return client


async def close() -> None:
    """Waits for pending publishes and closes the connections. Does nothing when not
    initialized; `init` may be called again afterwards."""
    client = _take()
    if client is not None:
        await client.close()


def close_sync() -> None:
    """Blocking form of :func:`close`."""
    client = _take()
    if client is not None:
        client.close_sync()


def _after_fork_in_child() -> None:
    global _client, _forked, _lock
    _lock = threading.Lock()
    if _client is not None:
        _orphans.append(_client)
        _client = None
        _forked = True
    native = _native_if_loaded()
    if native is not None:
        native._after_fork_in_child()


def _native_if_loaded() -> ModuleType | None:
    return sys.modules.get(__name__.rpartition(".")[0] + "._dbtask")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
