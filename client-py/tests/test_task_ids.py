"""Task ids: random v4 UUIDs before and after ``init`` loads the compiled generator, never
repeated by a forked child, which must ``init`` again before it sends."""

from __future__ import annotations

import subprocess

from conftest import PY


def _initialized(nats, redis) -> str:
    """The start of a child script: a task `add` registered, the client connected, one task sent."""
    return (
        "import os, sys, dbtask\n"
        "@dbtask.task(name='t.add', queue='math')\n"
        "def add(x, y): return x + y\n"
        f"dbtask.init_sync({nats.url!r}, {redis.url!r})\n"
        "add.delay_sync(1, 2)\n"
    )


def test_forked_child_must_init_again(nats, redis):
    code = _initialized(nats, redis) + (
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        add.delay_sync(1, 2)\n"
        "        os._exit(3)\n"
        "    except RuntimeError as e:\n"
        "        assert 'fork' in str(e), e\n"
        f"    dbtask.init_sync({nats.url!r}, {redis.url!r})\n"
        "    add.delay_sync(1, 2)\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "add.delay_sync(1, 2)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    subprocess.run([PY, "-c", code], check=True, timeout=30)


def test_workflow_ids_are_distinct_v4_uuids_before_and_after_init(nats, redis):
    # freeze() names tasks with uuid4() until init loads the compiled module, then with its
    # buffered generator: both kinds must be canonical random UUIDs, never repeated.
    code = (
        "import sys, uuid, dbtask\n"
        "@dbtask.task(name='t.add', queue='math')\n"
        "def add(x, y): return x + y\n"
        "def ids():\n"
        "    g = dbtask.Group([add.s(i, i) for i in range(500)])\n"
        "    return [g.freeze().id] + [m.options['task_id'] for m in g.members]\n"
        "before = ids()\n"
        "loaded_before = 'dbtask._dbtask' in sys.modules\n"
        f"dbtask.init_sync({nats.url!r}, {redis.url!r})\n"
        "after = ids()\n"
        "ok = all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in before + after)\n"
        "print(loaded_before, 'dbtask._dbtask' in sys.modules, ok, len(set(before + after)))\n"
    )
    out = subprocess.run([PY, "-c", code], check=True, timeout=30, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "True", "True", "1002"], out.stdout


def test_a_forked_child_does_not_repeat_the_parents_task_ids(nats, redis):
    # Ids come from a per-thread buffer of random bytes; a child inherits the forking
    # thread's buffer, and must not hand out the ids the parent hands out next (JetStream
    # would drop one of two messages with the same id as a duplicate).
    code = _initialized(nats, redis) + (
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"    dbtask.init_sync({nats.url!r}, {redis.url!r})\n"
        "    ids = [add.delay_sync(1, 2).id for _ in range(3)]\n"
        "    os.write(w, ' '.join(ids).encode())\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "ids = [add.delay_sync(1, 2).id for _ in range(3)]\n"
        "child = os.read(r, 4096).decode().split()\n"
        "os.waitpid(pid, 0)\n"
        "print(len(child), len(set(ids) & set(child)))\n"
    )
    out = subprocess.run([PY, "-c", code], check=True, timeout=30, capture_output=True, text=True)
    assert out.stdout.split() == ["3", "0"], out.stdout

