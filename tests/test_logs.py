"""The worker's text log under a flood of hostile messages: what a message carries cannot forge
a log line or drive the terminal, and repeated errors are summarised instead of written once
per message."""

from __future__ import annotations

import asyncio
import re
import time

import nats as nats_py

from e2e_tasks import add

FLOOD = 200
FIRST_LINE = "a message without a task id: nothing to record its failure under; dead-lettering it"
SUMMARY = re.compile(r"(\d+) more like this in the last \d+ s: " + re.escape(FIRST_LINE))
# A body that tries to end the worker's line, write one of its own, and colour the terminal.
FORGED = b"not json\n2026-12-07T00:00:00.000000Z ERROR forged line: all tasks lost\r\x1b[31mred\x1b[0m\x07"


def _accounted(text: str) -> tuple[int, int]:
    """Bad messages logged in full, and counted in summaries."""
    written = sum(FIRST_LINE in line for line in text.splitlines())
    counted = sum(int(m.group(1)) for m in SUMMARY.finditer(text))
    return written, counted


async def _wait_accounted(worker, count: int, timeout: float = 60.0) -> str:
    """The worker's log once `count` bad messages are in it, in full or in summaries."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = worker.stderr
        if sum(_accounted(text)) >= count:
            return text
        await asyncio.sleep(0.2)
    raise AssertionError(f"{_accounted(worker.stderr)} of {count} bad messages in the log after {timeout} s")


async def test_a_flood_of_forged_bodies_is_escaped_and_summarised(worker, client, nats):
    nc = await nats_py.connect(nats.url)
    try:
        js = nc.jetstream()
        # No Dbtask-Id header: nothing to record a failure under, so each one is logged as an
        # ERROR with the start of its body, then dead-lettered.
        for i in range(FLOOD):
            await js.publish("dbtask.tasks.default", FORGED + str(i).encode())
    finally:
        await nc.close()

    # The first line of the flood is written, the rest counted until the window ends, then
    # summarised: every bad message is accounted for.
    text = await _wait_accounted(worker, FLOOD)
    assert await (await add.delay(20, 22)).get(timeout=15) == 42
    assert worker.proc.poll() is None

    # Nothing from a body reaches the terminal raw, and no body starts a line of its own.
    for control in ("\x1b", "\x07", "\r"):
        assert control not in text, f"raw {control!r} in the worker's log"
    lines = text.splitlines()
    forged = [line for line in lines if "forged line" in line]
    assert forged, "the body's start is logged (escaped)"
    for line in forged:
        assert FIRST_LINE in line and "not json\\n2026-12-07" in line and "\\x1b[31m" in line, line

    written, counted = _accounted(text)
    assert counted > 0 and written < FLOOD / 10, f"{written} lines for {FLOOD} bad messages: not summarised"
