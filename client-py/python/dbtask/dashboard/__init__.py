"""``dbtask dashboard``: a web page of the cluster (workers, queues, tasks, dead letters) with
live updates from the workers' events, revoke / terminate and dead-letter replay. Needs the
``dashboard`` extra (``pip install 'dbtask[dashboard]'``: aiohttp). See docs/operations.md,
"Dashboard".
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_PORT = 5555  # Flower's
INSTALL_HINT = "pip install 'dbtask[dashboard]'"


def add_command(commands: Any) -> None:
    """Adds ``dbtask dashboard`` to the command line's subcommands."""
    p = commands.add_parser(
        "dashboard",
        help="serve a web dashboard: workers, queues, tasks, dead letters, live (needs dbtask[dashboard])",
        description="Serves the dashboard until Ctrl-C. Live task updates need workers started with --events.",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument(
        "--address",
        default=os.environ.get("DBTASK_DASHBOARD_ADDRESS", "127.0.0.1"),
        help="address to bind (default: $DBTASK_DASHBOARD_ADDRESS, else 127.0.0.1); any other than loopback needs --token or --basic-auth",
    )
    p.add_argument(
        "--token",
        help="require this token (at least 16 characters): open /?token=TOKEN once, or send Authorization: Bearer TOKEN "
        "(default: $DBTASK_DASHBOARD_TOKEN; prefer the variable, a flag shows in `ps`)",
    )
    p.add_argument("--basic-auth", metavar="USER:PASSWORD", help="require this user and password (default: $DBTASK_DASHBOARD_BASIC_AUTH)")
    p.add_argument("--max-tasks", type=int, default=10_000, help="recent tasks kept in memory for the list and the search (default: 10000)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        from . import _server
    except ImportError as e:
        if getattr(e, "name", None) == "aiohttp" or "aiohttp" in str(e):
            print(f"dbtask: the dashboard needs aiohttp, which is not installed: {INSTALL_HINT}", file=sys.stderr)
            return 1
        raise
    from .._client import NATS_SECURITY

    if args.max_tasks < 1:
        raise ValueError(f"--max-tasks must be at least 1, not {args.max_tasks}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535, not {args.port}")
    settings = _server.Settings(
        address=args.address,
        port=args.port,
        token=args.token if args.token is not None else os.environ.get("DBTASK_DASHBOARD_TOKEN") or None,
        basic_auth=args.basic_auth if args.basic_auth is not None else os.environ.get("DBTASK_DASHBOARD_BASIC_AUTH") or None,
        nats_url=args.nats_url,
        redis_url=args.redis_url,
        connect_timeout=args.timeout,
        max_tasks=args.max_tasks,
        security={name: getattr(args, name) for name in NATS_SECURITY},
    )
    try:
        return _server.run(settings)
    except _server.RefusedAddress as e:
        print(f"dbtask: error: {e}", file=sys.stderr)
        return 2
