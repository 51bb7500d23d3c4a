"""``dbtask schedule ...``: periodic schedules from the command line (see docs/periodic.md).

    dbtask schedule list [--json]
    dbtask schedule add NAME TASK (--every 30s | --cron "0 * * * *") [--args JSON]
        [--kwargs JSON] [--queue Q] [--priority N] [--tz Europe/Paris] [--expires 60s]
        [--catch-up latest|all] [--skip-if-running]
    dbtask schedule remove NAME
    dbtask schedule run NAME        (fire one tick now; prints its task id)
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``30``, ``30s``, ``5m``, ``2h``, ``1d`` as seconds."""
    text = text.strip()
    unit = _UNITS.get(text[-1:].lower()) if text else None
    number = text[:-1] if unit else text
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use 30, 30s, 5m, 2h or 1d") from None
    return value * (unit or 1)


def _json(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"must be a JSON {'array' if kind is list else 'object'}")
        return value

    return parse


def _connected(args: argparse.Namespace) -> Any:
    from . import _client

    security = {name: getattr(args, name) for name in _client.NATS_SECURITY}
    _client.init_sync(args.nats_url, args.redis_url, timeout=args.timeout, **security)


def _run(action: Any) -> Any:
    """Runs ``action(args)`` connected, closing after; a too-old server is a clean error."""

    def command(args: argparse.Namespace) -> int:
        from . import _client

        _connected(args)
        try:
            return int(action(args))
        except RuntimeError as e:
            print(f"dbtask: error: {e}", file=sys.stderr)
            return 1
        finally:
            _client.close_sync()

    return command


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _list(args: argparse.Namespace) -> int:
    from ._periodic import schedules_sync

    found = schedules_sync()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("no schedules")
        return 0
    print(f"{'NAME':<24} {'RULE':<20} {'TZ':<16} {'TASK':<28} {'QUEUE':<12} {'NEXT RUN':<21} LAST RUN")
    for s in found:
        rule = f"every {s['every']}s" if s.get("every") else s.get("cron") or "?"
        print(
            f"{s['name']:<24} {rule:<20} {s['tz']:<16} {s['task']:<28} {s['queue']:<12} "
            f"{_when(s.get('next_run')):<21} {s.get('last_run_id') or '-'}"
        )
    return 0


def _add(args: argparse.Namespace) -> int:
    from ._canvas import Signature
    from ._periodic import schedule_sync

    options = {"queue": args.queue, "priority": args.priority}
    sig = Signature(args.task, args.args or [], args.kwargs or {}, {k: v for k, v in options.items() if v is not None})
    schedule_sync(
        args.name,
        sig,
        every=args.every,
        cron=args.cron,
        tz=args.tz,
        expires=args.expires,
        catch_up=args.catch_up,
        skip_if_running=args.skip_if_running,
    )
    print(f"schedule {args.name} saved")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from ._periodic import unschedule_sync

    if unschedule_sync(args.name):
        print(f"schedule {args.name} removed")
        return 0
    print(f"dbtask: no schedule named {args.name!r} (see `dbtask schedule list`)", file=sys.stderr)
    return 1


def _fire(args: argparse.Namespace) -> int:
    from ._periodic import run_schedule_sync

    print(run_schedule_sync(args.name).id)
    return 0


def add_commands(commands: Any) -> None:
    """Adds ``dbtask schedule ...`` to the command line's sub-commands."""
    sched = commands.add_parser("schedule", help="periodic schedules, fired by NATS (nats-server 2.14+)")
    actions = sched.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="list the schedules with their next run and last tick")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run(_list))
    p = actions.add_parser("add", help="create or replace a schedule")
    p.add_argument("name", help="the schedule's name (A-Z a-z 0-9 _ - and dots)")
    p.add_argument("task", help="the registered task name it sends")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--every", type=duration, help="interval: 30, 30s, 5m, 2h, 1d (whole seconds)")
    rule.add_argument("--cron", help='crontab line, 5 fields ("0 * * * *") or 6 with seconds first')
    p.add_argument("--args", type=_json(list), help="positional arguments as a JSON array")
    p.add_argument("--kwargs", type=_json(dict), help="keyword arguments as a JSON object")
    p.add_argument("--queue", help="queue (default: default)")
    p.add_argument("--priority", type=int, help="priority 0-9")
    p.add_argument("--tz", default="UTC", help="IANA time zone of --cron (default: UTC)")
    p.add_argument("--expires", type=duration, help="drop a tick this long after its time")
    p.add_argument("--catch-up", choices=["latest", "all"], default="latest", help="ticks missed while no worker ran: run only the latest (default) or all")
    p.add_argument("--skip-if-running", action="store_true", help="do not start a tick while the previous one runs")
    p.set_defaults(run=_run(_add))
    p = actions.add_parser("remove", help="delete a schedule (ticks already queued still run)")
    p.add_argument("name")
    p.set_defaults(run=_run(_remove))
    p = actions.add_parser("run", help="fire one tick of a schedule now and print its task id")
    p.add_argument("name")
    p.set_defaults(run=_run(_fire))
