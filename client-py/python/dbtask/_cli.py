"""The ``dbtask`` command line: dead letters and task results.

    dbtask dead list [--queue Q] [--limit N] [--json]
    dbtask dead show SEQ
    dbtask dead replay SEQ [SEQ ...]
    dbtask dead purge [--queue Q]
    dbtask result TASK_ID
    dbtask schedule list | add | remove | run     (``_cli_schedule.py``)
    dbtask events | inspect ... | control ... | purge QUEUE     (``_cli_inspect.py``)
    dbtask dashboard [--port 5555] [--address 127.0.0.1]     (``dashboard/``)

Servers: ``--nats-url`` / ``--redis-url``, else ``$DBTASK_NATS_URL`` / ``$DBTASK_REDIS_URL``,
else ``nats://127.0.0.1:4222`` / ``redis://127.0.0.1:6379``. NATS TLS and credentials:
``--nats-tls-ca``, ``--nats-tls-cert``, ``--nats-tls-key``, ``--nats-creds``, ``--nats-nkey``,
else ``$DBTASK_NATS_TLS_CA``... as for the worker (docs/security.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from ._client import DEFAULT_NATS_URL

# Header names written by the worker (protocol crate, `dead_headers`).
_REASON = "Dbtask-Dead-Reason"
_SUBJECT = "Dbtask-Dead-Subject"
_DELIVERIES = "Dbtask-Dead-Deliveries"
_AT = "Dbtask-Dead-At"


def _admin(args: argparse.Namespace) -> Any:
    from . import _client

    url = args.nats_url or os.environ.get("DBTASK_NATS_URL", DEFAULT_NATS_URL)
    security = _client._security({name: getattr(args, name) for name in _client.NATS_SECURITY})
    return _client._native().Admin.connect_sync(url, args.timeout, **security)


def _letter_dict(letter: tuple[int, str, dict[str, str], str]) -> dict[str, Any]:
    seq, subject, headers, body = letter
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = body
    return {
        "sequence": seq,
        "queue": subject.split(".", 2)[-1],
        "task_id": headers.get("Dbtask-Id"),
        "task": headers.get("Dbtask-Task"),
        "reason": headers.get(_REASON),
        "deliveries": int(headers[_DELIVERIES]) if headers.get(_DELIVERIES, "").isdigit() else None,
        "dead_at": float(headers[_AT]) if _AT in headers else None,
        "original_subject": headers.get(_SUBJECT),
        "headers": headers,
        "body": parsed,
    }


def _dead_list(args: argparse.Namespace) -> int:
    letters = [_letter_dict(x) for x in _admin(args).dead_list(args.queue, args.start, args.limit)]
    if args.json:
        print(json.dumps(letters, indent=2))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    print(f"{'SEQ':>6}  {'QUEUE':<16} {'TASK ID':<36}  {'TASK':<32} DELIVERIES")
    for x in letters:
        print(
            f"{x['sequence']:>6}  {x['queue']:<16} {x['task_id'] or '?':<36}  "
            f"{x['task'] or '?':<32} {x['deliveries'] if x['deliveries'] is not None else '?'}"
        )
    return 0


def _dead_show(args: argparse.Namespace) -> int:
    letter = _admin(args).dead_get(args.seq)
    if letter is None:
        print(f"dbtask: no dead letter {args.seq} (see `dbtask dead list`)", file=sys.stderr)
        return 1
    print(json.dumps(_letter_dict(letter), indent=2))
    return 0


def _dead_replay(args: argparse.Namespace) -> int:
    admin = _admin(args)
    failed = 0
    for seq in args.seq:
        try:
            subject, task_seq = admin.dead_replay(seq)
        except ValueError as e:
            print(f"dbtask: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"replayed dead letter {seq} to {subject} (task stream sequence {task_seq})")
    return 1 if failed else 0


def _dead_purge(args: argparse.Namespace) -> int:
    purged = _admin(args).dead_purge(args.queue)
    where = f" of queue {args.queue}" if args.queue else ""
    print(f"purged {purged} dead letter{'s' if purged != 1 else ''}{where}")
    return 0


def _result(args: argparse.Namespace) -> int:
    from . import _client

    security = {name: getattr(args, name) for name in _client.NATS_SECURITY}
    _client.init_sync(args.nats_url, args.redis_url, timeout=args.timeout, **security)
    try:
        record = _client.current().get_record_sync(args.task_id)
    finally:
        _client.close_sync()
    if record is None:
        record = {"id": args.task_id, "state": "PENDING"}
    print(json.dumps(record, indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbtask", description="dbtask operator commands: dead letters, task results, schedules, events, inspect and control, the dashboard.")
    parser.add_argument(
        "--nats-url",
        help="NATS server, or seed servers separated by commas (default: $DBTASK_NATS_URL, else nats://127.0.0.1:4222)",
    )
    parser.add_argument("--redis-url", help="Redis server (default: $DBTASK_REDIS_URL, else redis://127.0.0.1:6379)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a connection (default: 5)")
    for flag, what in [
        ("--nats-tls-ca", "CA certificate (PEM) that signed the NATS server's certificate"),
        ("--nats-tls-cert", "client certificate (PEM) for mutual TLS"),
        ("--nats-tls-key", "private key (PEM) of --nats-tls-cert"),
        ("--nats-creds", "NATS credentials file (user JWT and nkey seed)"),
        ("--nats-nkey", "file holding an nkey user seed (SU...)"),
    ]:
        env = "DBTASK_" + flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, metavar="FILE", help=f"{what} (default: ${env})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dead = commands.add_parser("dead", help="dead letters: tasks that exhausted their deliveries")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    p = dead_commands.add_parser("list", help="list dead letters (oldest first)")
    p.add_argument("--queue", help="only this queue's")
    p.add_argument("--start", type=int, default=1, help="first sequence to look at (default: 1)")
    p.add_argument("--limit", type=int, default=100, help="most dead letters shown (default: 100)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_dead_list)
    p = dead_commands.add_parser("show", help="show one dead letter: reason, headers and message")
    p.add_argument("seq", type=int, help="its sequence (from `dbtask dead list`)")
    p.set_defaults(run=_dead_show)
    p = dead_commands.add_parser("replay", help="send dead letters to their queue again, and remove them")
    p.add_argument("seq", type=int, nargs="+", help="their sequences")
    p.set_defaults(run=_dead_replay)
    p = dead_commands.add_parser("purge", help="delete dead letters")
    p.add_argument("--queue", help="only this queue's")
    p.set_defaults(run=_dead_purge)

    p = commands.add_parser("result", help="show a task's state and result (or error) as JSON")
    p.add_argument("task_id")
    p.set_defaults(run=_result)

    from ._cli_schedule import add_commands

    add_commands(commands)
    from ._cli_inspect import add_commands as add_inspect_commands

    add_inspect_commands(commands)
    from .dashboard import add_command as add_dashboard_command

    add_dashboard_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ConnectionError, ValueError, TimeoutError) as e:
        print(f"dbtask: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
