"""Checks of the rate-limit and priority options, at decoration and call time (the worker and
the compiled module check them again: a bad value never reaches a queue)."""

from __future__ import annotations

import re
from typing import Any

MAX_PRIORITY = 9
"""Highest priority: ``apply_async(priority=9)`` runs before lower levels on a backlog."""

DEFAULT_PRIORITY = 5
"""The level of a task sent without a priority."""

_RATE_RE = re.compile(r"\s*(\d+)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour)\s*)?")


def check_rate_limit(value: Any) -> str:
    """``"100/s"``, ``"10/m"``, ``"1000/h"`` (or a bare count: per second); else ValueError."""
    match = _RATE_RE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return f"{value}/s"
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f'invalid rate_limit {value!r}: use "<count>/s", "<count>/m" or "<count>/h" '
            'with a whole count of at least 1, e.g. "100/s"'
        )
    return value.strip()


def check_priority(value: Any) -> int | None:
    """``None`` or an int from 0 to 9 (9 runs first); else ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise ValueError(f"priority must be an integer from 0 to {MAX_PRIORITY} (highest), not {value!r}")
    return value
