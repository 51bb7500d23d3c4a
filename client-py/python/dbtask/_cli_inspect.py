"""``dbtask events``, ``dbtask inspect ...``, ``dbtask control ...`` and ``dbtask purge``
(see docs/operations.md).

    dbtask events [--json] [--task NAME]
    dbtask inspect ping | stats | active | reserved | registered | queues [--json] [--timeout S] [--worker ID]
    dbtask inspect scheduled [--json] [--limit N] [--start SEQ]
    dbtask control shutdown [--worker ID] [--timeout S]
    dbtask control rate-limit TASK RATE [--worker ID] [--timeout S]
    dbtask purge QUEUE [-f]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable

from ._control import DEFAULT_TIMEOUT

INSPECT_COMMANDS = ("ping", "stats", "active", "reserved", "registered", "queues")


def _admin(args: argparse.Namespace) -> Any:
    from . import _client
    from ._control import admin

    security = {name: getattr(args, name) for name in _client.NATS_SECURITY}
    return admin(args.nats_url, args.timeout, **security)


def _security(args: argparse.Namespace) -> dict[str, Any]:
    from . import _client

    return {name: getattr(args, name) for name in _client.NATS_SECURITY}


def _clock(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "?"
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "?"
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_line(event: dict[str, Any]) -> str:
    """One event as one line for people."""
    kind = str(event.get("event", "?"))
    head = f"{_clock(event.get('timestamp'))}  {kind:<19} "
    if kind.startswith("worker."):
        p = event.get("processed") or {}
        load = event.get("loadavg") or []
        return head + (
            f"{event.get('worker')}  running={event.get('running')} prefetched={event.get('prefetched')} "
            f"processed={p.get('total', '?')} load={','.join(f'{x:.2f}' for x in load)} "
            f"rss={int(event.get('rss_bytes') or 0) // (1 << 20)}MiB"
        )
    text = head + f"{event.get('task')}[{event.get('id')}]  queue={event.get('queue')} worker={event.get('worker')}"
    if event.get("attempt", 1) != 1:
        text += f" attempt={event.get('attempt')}"
    if event.get("runtime") is not None:
        text += f" runtime={event['runtime']:.6f}s"
    if event.get("error_type"):
        text += f" error={event['error_type']}: {event.get('error', '')}"
    if event.get("retry_in") is not None:
        text += f" retry_in={event['retry_in']:.3f}s"
    if event.get("reason"):
        text += f" reason={event['reason']}"
    return text


def _events(args: argparse.Namespace) -> int:
    subscription = _admin(args).events()
    print("listening for events on dbtask.events.> (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            got = subscription.next_sync(None)
            if got is None:
                continue
            _, text = got
            try:
                event = json.loads(text)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if args.task is not None and event.get("task") != args.task:
                continue
            print(json.dumps(event) if args.json else event_line(event), flush=True)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0


def _print_tasks(reply: dict[str, Any], running: bool) -> None:
    tasks = reply.get("tasks") or []
    print(f"{reply.get('worker')}: {len(tasks)} {'running' if running else 'waiting'}")
    for t in tasks:
        extra = f"runtime {t.get('runtime', 0):.3f}s" if running else f"received {_when(t.get('received'))}"
        print(f"  {t.get('id')}  {t.get('task')}  queue={t.get('queue')}  {extra}")


def _print_reply(command: str, reply: dict[str, Any]) -> None:
    worker = reply.get("worker")
    if "error" in reply:
        print(f"{worker}: error: {reply['error']}")
    elif command == "ping":
        print(f"{worker}: pong")
    elif command == "stats":
        print(f"{worker}:")
        for key in sorted(reply):
            if key != "worker":
                print(f"  {key}: {json.dumps(reply[key])}")
    elif command in ("active", "reserved"):
        _print_tasks(reply, command == "active")
    elif command == "registered":
        print(f"{worker}:")
        for name in reply.get("tasks") or []:
            print(f"  {name}")
    elif command == "queues":
        print(f"{worker}:")
        for q in reply.get("queues") or []:
            levels = " ".join(f"p{lv['priority']}={lv['pending']}" for lv in q.get("levels") or [] if lv.get("pending"))
            print(f"  {q.get('queue')}: {q.get('pending')} pending{'  ' + levels if levels else ''}")
            for e in q.get("errors") or []:
                print(f"    error: {e}")
    else:
        print(json.dumps(reply))


def _inspect(command: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from ._control import gather

        _admin(args)  # connect with the global --timeout
        replies = gather(command, {}, timeout=args.reply_timeout, worker=args.worker, nats_url=args.nats_url, security=_security(args))
        if args.json:
            print(json.dumps(replies, indent=2))
        else:
            for reply in replies:
                _print_reply(command, reply)
        if not replies:
            who = f"worker {args.worker}" if args.worker else "no worker"
            print(f"dbtask: {who} answered within {args.reply_timeout} s", file=sys.stderr)
            return 1
        return 0

    return run


def _scheduled(args: argparse.Namespace) -> int:
    from .inspect import scheduled_sync

    _admin(args)
    tasks = scheduled_sync(limit=args.limit, start=args.start, nats_url=args.nats_url, **_security(args))
    if args.json:
        print(json.dumps(tasks, indent=2))
        return 0
    if not tasks:
        print("no scheduled tasks")
        return 0
    print(f"{'SEQ':>8}  {'ETA (UTC)':<24}  {'QUEUE':<16} {'TASK':<32} ID")
    for t in tasks:
        print(f"{t['sequence']:>8}  {_when(t['eta']):<24}  {t['queue'] or '?':<16} {t['task'] or '?':<32} {t['id']}")
    return 0


def _control_command(command: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from ._control import gather

        _admin(args)
        body: dict[str, Any] = {}
        if command == "rate_limit":
            body = {"task": args.task, "rate": args.rate}
        replies = gather(command, body, timeout=args.reply_timeout, worker=args.worker, nats_url=args.nats_url, security=_security(args))
        if args.json:
            print(json.dumps(replies, indent=2))
        failed = not replies
        for reply in replies:
            if "error" in reply:
                failed = True
                if not args.json:
                    print(f"{reply.get('worker')}: error: {reply['error']}")
            elif not args.json:
                if command == "shutdown":
                    print(f"{reply.get('worker')}: shutting down")
                else:
                    print(f"{reply.get('worker')}: rate limit of {reply.get('task')} set to {reply.get('rate')}")
        if not replies:
            who = f"worker {args.worker}" if args.worker else "no worker"
            print(f"dbtask: {who} answered within {args.reply_timeout} s", file=sys.stderr)
        return 1 if failed else 0

    return run


def _purge(args: argparse.Namespace) -> int:
    if not args.force:
        try:
            answer = input(f"Delete every task waiting in queue {args.queue!r}? This cannot be undone. [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("dbtask: nothing purged", file=sys.stderr)
            return 1
    started = time.monotonic()
    purged = _admin(args).purge_queue(args.queue)
    print(f"purged {purged} task{'s' if purged != 1 else ''} from queue {args.queue} ({time.monotonic() - started:.2f} s)")
    return 0


def _replies_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the replies as JSON")
    p.add_argument("--timeout", dest="reply_timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S", help=f"seconds to wait for the workers' replies (default: {DEFAULT_TIMEOUT})")
    p.add_argument("--worker", metavar="ID", help="only this worker (its id, host:pid, as `dbtask inspect ping` shows)")


def add_commands(commands: Any) -> None:
    p = commands.add_parser("events", help="print the workers' events live (workers started with --events)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--task", metavar="NAME", help="only the events of this task name")
    p.set_defaults(run=_events)

    inspect = commands.add_parser("inspect", help="ask every worker what it is doing")
    actions = inspect.add_subparsers(dest="inspect_command", required=True, metavar="WHAT")
    helps = {
        "ping": "which workers answer",
        "stats": "uptime, processed tasks by state, pool, concurrency, memory",
        "active": "running tasks with their runtime so far",
        "reserved": "tasks received and waiting for a free slot (prefetched)",
        "registered": "the task names each worker runs",
        "queues": "consumed queues with pending tasks per priority level (JetStream)",
    }
    for command in INSPECT_COMMANDS:
        p = actions.add_parser(command, help=helps[command])
        _replies_options(p)
        p.set_defaults(run=_inspect(command))
    p = actions.add_parser("scheduled", help="tasks waiting for their eta in the task stream (read from the server)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--limit", type=int, default=100, help="most tasks shown (default: 100)")
    p.add_argument("--start", type=int, default=1, help="first stream sequence to look at (default: 1)")
    p.set_defaults(run=_scheduled)

    control = commands.add_parser("control", help="tell workers what to do")
    actions = control.add_subparsers(dest="control_command", required=True, metavar="ACTION")
    p = actions.add_parser("shutdown", help="stop workers gracefully, as SIGTERM (all, or --worker ID)")
    _replies_options(p)
    p.set_defaults(run=_control_command("shutdown"))
    p = actions.add_parser("rate-limit", help="set a task's cluster-wide rate limit (e.g. 10/s; 0 for none)")
    p.add_argument("task", help="the task name")
    p.add_argument("rate", help="10/s, 100/m, 1000/h, or 0 for no limit")
    _replies_options(p)
    p.set_defaults(run=_control_command("rate_limit"))

    p = commands.add_parser("purge", help="delete every task waiting in a queue (asks first)")
    p.add_argument("queue")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.set_defaults(run=_purge)
