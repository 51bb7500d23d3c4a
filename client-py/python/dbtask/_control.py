"""What ``dbtask.inspect``, ``dbtask.control`` and the command line share: one NATS
connection per server (``Admin``, made on first use), and the scatter-gather request: one
request on ``dbtask.control.<command>``, every worker's reply until the timeout.

The server is ``nats_url``, else ``$DBTASK_NATS_URL``, else ``nats://127.0.0.1:4222``; NATS TLS
and credentials as for ``dbtask.init`` (the ``nats_*`` keywords, else ``$DBTASK_NATS_*``).
"""

from __future__ import annotations

import json
import os
import threading
from typing import TYPE_CHECKING, Any, Optional

from ._client import DEFAULT_NATS_URL, NATS_SECURITY, PathArg, _native, _security

if TYPE_CHECKING:
    from ._dbtask import Admin

DEFAULT_TIMEOUT = 1.0
"""Seconds to wait for the workers' replies."""

_lock = threading.Lock()
_admins: dict[tuple[str, tuple[tuple[str, str], ...]], "Admin"] = {}


def admin(nats_url: Optional[str] = None, connect_timeout: float = 5.0, **security: PathArg) -> "Admin":
    """The connection to NATS for these settings (made once per process and server)."""
    url = nats_url if nats_url is not None else os.environ.get("DBTASK_NATS_URL", DEFAULT_NATS_URL)
    if not isinstance(url, str):
        raise TypeError(f"nats_url must be a string, not {type(url).__name__}")
    files = _security({name: security.get(name) for name in NATS_SECURITY})
    key = (url, tuple(sorted(files.items())))
    with _lock:
        found = _admins.get(key)
        if found is None:
            found = _native().Admin.connect_sync(url, connect_timeout, **files)
            _admins[key] = found
        return found


def check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def gather(
    command: str,
    body: dict[str, Any],
    *,
    timeout: float,
    worker: Optional[str],
    nats_url: Optional[str],
    security: dict[str, PathArg],
) -> list[dict[str, Any]]:
    """Every worker's reply to ``command`` (only ``worker``'s if given), sorted by worker id."""
    if worker is not None:
        if not isinstance(worker, str) or not worker:
            raise ValueError(f"worker must be a worker id such as 'host:1234', not {worker!r}")
        body = {**body, "worker": worker}
    replies = admin(nats_url, **security).request_all(
        command, json.dumps(body), check_timeout(timeout), 1 if worker is not None else None
    )
    answers = []
    for text in replies:
        try:
            answer = json.loads(text)
        except ValueError:
            continue
        if isinstance(answer, dict):
            answers.append(answer)
    answers.sort(key=lambda a: str(a.get("worker", "")))
    return answers
