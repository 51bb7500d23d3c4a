"""Eager mode: ``dbtask.init(eager=True)`` runs tasks in this process instead of sending them
(docs/testing.md, "Eager mode"). No server is contacted.

:class:`EagerClient` stands in for the compiled client: ``delay()``, ``apply_async()``,
workflows and ``AsyncResult`` call the same methods on it as on a connected client, so they
take the same paths up to the wire. A task message is checked and encoded by the compiled
client's own encoder (``_dbtask.encode_task``: the same errors for arguments that cannot be
sent), decoded again as the worker decodes it, and run here the way the worker runs it:

- the task is looked up by name in the registry (``dbtask.UnknownTask`` otherwise), its
  arguments are checked against the function (``dbtask.InvalidArguments``), it runs with its
  class hooks and the task signals, ``current_task()`` and ``self.request`` (``bind=True``);
- its return value is encoded as JSON (``dbtask.UnserializableResult`` otherwise) and the
  record stored is the worker's (state, result or error with type, message and traceback), so
  ``get()`` returns the decoded value or raises what a real ``get()`` raises;
- retries (``Retry``, ``autoretry_for``) run again at once, up to ``max_retries``, without
  waiting for their countdown;
- workflows are expanded as the protocol crate does, and what follows a task (the next step of
  a chain, a chord's callback once every member succeeded, ``link`` / ``link_error``) is run
  after it, in order, as the worker publishes it.

Messages are run in the order they are sent, one at a time. A task sent from inside a running
task runs after it (as on a worker with one slot), unless something waits for its result
first: ``get()`` of a task still queued runs the queue up to it. ``async def`` tasks run on an
asyncio loop of their own on a helper thread, as the worker runs them on its own loop, so
they work from sync and async callers alike.

Not emulated: time limits, rate limits, priorities, concurrency, countdown/eta (the task runs
at once), revocation of a task that already ran. ``expires`` in the past at run time gives
REVOKED (``dbtask.Expired``), as on a worker.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping
from typing import Any, Callable, Optional

from . import _client, _context, _registry, _trace
from ._retry import Retry, bound

__all__ = ["EagerClient"]

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

# The worker's defaults (worker/src/retry) and error type names (protocol::error_types).
_DEFAULT_MAX_RETRIES = 3
UNKNOWN_TASK = "dbtask.UnknownTask"
BAD_ARGUMENTS = "dbtask.InvalidArguments"
UNSERIALIZABLE_RESULT = "dbtask.UnserializableResult"
MALFORMED = "dbtask.MalformedMessage"
EXPIRED = "dbtask.Expired"
REVOKED = "dbtask.TaskRevoked"
MAX_RETRIES_EXCEEDED = "dbtask.MaxRetriesExceeded"
CHORD_ERROR = "dbtask.ChordError"
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
WORKER = "eager"

_NOTHING = object()


def _type_name(cls: type) -> str:
    """``ValueError`` for builtins, ``module.QualName`` otherwise (the worker's rule)."""
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", None) or getattr(cls, "__name__", "<unknown type>")
    return qualname if module in (None, "builtins") else f"{module}.{qualname}"


def _error_of(exc: BaseException) -> dict[str, Any]:
    try:
        message = str(exc)
    except Exception as e:  # noqa: BLE001 - the worker records this too
        message = f"<str() of the exception failed: {type(e).__name__}>"
    return {
        "type": _type_name(type(exc)),
        "message": message,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def _error(exc_type: str, message: str) -> dict[str, Any]:
    return {"type": exc_type, "message": message}


class EagerClient:
    """The client of eager mode: the compiled client's methods that tasks, workflows and
    results use, run in this process."""

    stream_replicas = 1

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._queue: deque[dict[str, Any]] = deque()
        self._records: dict[str, dict[str, Any]] = {}
        self._groups: dict[str, str] = {}
        self._chords: dict[str, dict[int, Any]] = {}
        self._fired: set[str] = set()
        self._revoked: set[str] = set()
        self._running: list[str] = []
        self._closed = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._previous_writer = _context.state_writer
        if _context.state_writer is None:
            _context.state_writer = self._write_state

    def __repr__(self) -> str:
        return "<dbtask eager client: tasks run in this process>"

    def __getattr__(self, name: str) -> Any:
        # What needs the servers (inspect, control, periodic schedules, dead letters...).
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(
            f"dbtask is in eager mode (init(eager=True)): {name} needs the servers; "
            "call dbtask.init(...) with them, or test it with the dbtask_worker fixture"
        )

    # -- what dbtask._client asks --------------------------------------------------------

    def connected_to(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def closed(self) -> bool:
        return self._closed

    @property
    def eager(self) -> bool:
        return True

    async def close(self) -> None:
        self.close_sync()

    def close_sync(self) -> None:
        self._closed = True
        if _context.state_writer == self._write_state:
            _context.state_writer = self._previous_writer
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    # -- publishing ----------------------------------------------------------------------

    def _message(self, queue: str, task: str, args: Any, kwargs: Any, options: Any) -> dict[str, Any]:
        body = _client._native().encode_task(queue, task, args, kwargs, options)
        return json.loads(body)  # type: ignore[no-any-return]

    def publish(self, queue: str, task: str, args: Any, kwargs: Any = None, options: Any = None, wrap: Any = None) -> Any:
        loop = asyncio.get_running_loop()
        msg = self._message(queue, task, args, kwargs, options)
        self._submit([msg])
        future = loop.create_future()
        future.set_result(wrap(msg["id"]) if wrap is not None else msg["id"])
        return future

    def publish_sync(self, queue: str, task: str, args: Any, kwargs: Any = None, options: Any = None) -> str:
        msg = self._message(queue, task, args, kwargs, options)
        self._submit([msg])
        return msg["id"]  # type: ignore[no-any-return]

    def _many(self, queue: str, task: str, calls: Any, eta: Any, expires: Any, priority: Any) -> list[str]:
        options = _client._native().PublishOptions(eta=eta, expires=expires, priority=priority)
        msgs = []
        for i, call in enumerate(calls):
            try:
                args, kwargs = call
            except (TypeError, ValueError):
                raise ValueError(f"publish_many: item {i} must be an (args, kwargs) pair") from None
            msgs.append(self._message(queue, task, args, kwargs, options))
        self._submit(msgs)
        return [m["id"] for m in msgs]

    async def publish_many(self, queue: str, task: str, calls: Any, eta: Any = None, expires: Any = None, priority: Any = None) -> list[str]:
        return self._many(queue, task, calls, eta, expires, priority)

    def publish_many_sync(self, queue: str, task: str, calls: Any, eta: Any = None, expires: Any = None, priority: Any = None) -> list[str]:
        return self._many(queue, task, calls, eta, expires, priority)

    def _workflow(self, signature: str) -> None:
        try:
            sig = json.loads(signature)
        except ValueError as e:
            raise ValueError(f"not a dbtask signature: {e}") from None
        out: list[dict[str, Any]] = []
        groups: list[tuple[str, str]] = []
        _expand(sig, _NOTHING, [], None, time.time(), out, groups)
        with self._lock:
            self._groups.update(groups)
        self._submit(out)

    async def publish_workflow(self, signature: str, group_ttl: float) -> None:
        self._workflow(signature)

    def publish_workflow_sync(self, signature: str, group_ttl: float) -> None:
        self._workflow(signature)

    # -- results -------------------------------------------------------------------------

    async def get_group(self, group_id: str) -> Optional[str]:
        return self.get_group_sync(group_id)

    def get_group_sync(self, group_id: str) -> Optional[str]:
        with self._lock:
            return self._groups.get(group_id)

    async def get_record(self, task_id: str) -> Optional[dict[str, Any]]:
        return self.get_record_sync(task_id)

    def get_record_sync(self, task_id: str) -> Optional[dict[str, Any]]:
        with self._lock:
            record = self._records.get(task_id)
            return dict(record) if record is not None else None

    async def wait(self, task_id: str, timeout: Optional[float] = None) -> dict[str, Any]:
        return self.wait_sync(task_id, timeout)

    def wait_sync(self, task_id: str, timeout: Optional[float] = None) -> dict[str, Any]:
        """The task's final record: at once when it ran; when it is still queued (sent from
        inside a running task), the queue runs up to it first."""
        while True:
            with self._lock:
                record = self._records.get(task_id)
                if record is not None and record["state"] in READY:
                    return dict(record)
                if task_id in self._running:
                    raise RuntimeError(
                        f"eager mode: task {task_id} waits for its own result (or for a task "
                        "running below it): it would wait for ever on a worker too"
                    )
                msg = self._queue.popleft() if self._queue else None
            if msg is None:
                raise TimeoutError(
                    f"eager mode: task {task_id} has no result and no queued task will give "
                    "it one (was it sent through this client, after init(eager=True)?)"
                )
            self._run(msg)

    def progress(self, task_id: str) -> "_Progress":
        return _Progress(self, task_id)

    async def forget(self, task_id: str) -> None:
        self.forget_sync(task_id)

    def forget_sync(self, task_id: str) -> None:
        with self._lock:
            self._records.pop(task_id, None)

    async def revoke(self, task_id: str, terminate: bool, ttl: float) -> None:
        self.revoke_sync(task_id, terminate, ttl)

    def revoke_sync(self, task_id: str, terminate: bool, ttl: float) -> None:
        """A task still queued is recorded REVOKED instead of running; one that ran keeps
        its record (it cannot be stopped: it finished)."""
        with self._lock:
            self._revoked.add(task_id)

    # -- running -------------------------------------------------------------------------

    def _submit(self, msgs: list[dict[str, Any]]) -> None:
        """Queues `msgs` and, unless a task is running (which sent them), runs the queue."""
        with self._lock:
            self._queue.extend(msgs)
            if self._running:
                return
        while True:
            with self._lock:
                if not self._queue:
                    return
                msg = self._queue.popleft()
            self._run(msg)

    def _store(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records[record["id"]] = record

    def _write_state(self, task_id: str, task: str, state: str, meta_json: str, ttl: Any) -> None:
        self._store({"id": task_id, "state": state, "task": task, "meta": json.loads(meta_json), "worker": WORKER})

    def _record(self, msg: dict[str, Any], state: str, **fields: Any) -> dict[str, Any]:
        record = {
            "id": msg["id"],
            "state": state,
            "task": msg["task"],
            "queue": msg.get("queue"),
            "worker": WORKER,
            "attempts": 1,
            "date_done": time.time(),
        }
        retries = msg.get("retries", 0)
        if retries:
            record["retries"] = retries
        record.update(fields)
        return record

    def _run(self, msg: dict[str, Any]) -> None:
        """Runs one message as the worker does, stores its record, then what follows it."""
        with self._lock:
            self._running.append(msg["id"])
        try:
            record, keep = self._outcome(msg)
        finally:
            with self._lock:
                self._running.remove(msg["id"])
        if keep:  # else an ignored result: nothing stored, the workflow still goes on
            self._store(record)
        self._after(msg, record)

    def _outcome(self, msg: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The record of the message's run, and whether to store it (``ignore_result``)."""
        tid, name = msg["id"], msg["task"]
        if tid in self._revoked:
            return self._record(msg, "REVOKED", error=_error(REVOKED, f"task {tid} was revoked")), True
        expires = msg.get("expires")
        if expires is not None and time.time() > expires:
            error = _error(EXPIRED, f"task {tid} expired at {expires:.3f} before it could run")
            return self._record(msg, "REVOKED", error=error), True
        task = _registry.TASKS.get(name)
        if task is None:
            known = ", ".join(sorted(_registry.TASKS)[:20])
            error = _error(
                UNKNOWN_TASK,
                f"no task named {name!r} is registered in this process "
                f"({len(_registry.TASKS)} registered: {known}): import the module that declares it",
            )
            return self._record(msg, "FAILURE", error=error), True
        retries = int(msg.get("retries", 0))
        while True:
            kind, value = self._call(task, msg, retries)
            if kind == "ok":
                try:
                    text = _encode(value)
                except (TypeError, ValueError) as e:
                    error = _error(
                        UNSERIALIZABLE_RESULT,
                        f"the return value of {name} (of type {_type_name(type(value))}) is not "
                        f"JSON-serializable: {type(e).__name__}: {e}",
                    )
                    return self._failed(task, msg, error)
                return self._record(msg, "SUCCESS", result=json.loads(text)), not _ignored(task, msg)
            if kind == "retry":
                limit, error, explicit = value
                if retries >= limit:
                    if explicit:
                        error = _error(
                            MAX_RETRIES_EXCEEDED,
                            f"the task asked for a retry after {retries} retries, its max_retries is {limit}",
                        )
                    msg["retries"] = retries
                    return self._failed(task, msg, error)
                # Run again at once: the countdown is not waited for.
                retries += 1
                msg["retries"] = retries
                self._store(self._record(msg, "RETRY", error=error))
                continue
            return self._failed(task, msg, value)

    def _failed(self, task: Any, msg: dict[str, Any], error: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        keep = not _ignored(task, msg) or task.options.get("store_errors_even_if_ignored", True)
        return self._record(msg, "FAILURE", error=error), keep

    def _call(self, task: Any, msg: dict[str, Any], retries: int) -> tuple[str, Any]:
        """Runs the function once: ("ok", value), ("retry", (max_retries, error, explicit))
        or ("fail", error)."""
        args = list(msg.get("args") or [])
        kwargs = dict(msg.get("kwargs") or {})
        me = bound(
            task,
            msg["id"],
            retries,
            retries + 1,
            msg.get("queue"),
            msg.get("eta"),
            msg.get("parent_id"),
            msg.get("root_id"),
        )
        call_args = [me, *args] if task.options.get("bind") else args
        try:
            inspect.signature(task.fn).bind(*call_args, **kwargs)
        except TypeError as e:
            return "fail", _error(BAD_ARGUMENTS, f"arguments do not fit {task.name}: {e}")
        except ValueError:
            pass  # no signature to check against: the call says
        run = _trace.traced(task)
        token = _context.CURRENT.set(me)
        try:
            if task.is_async:
                value = self._run_async(run, call_args, kwargs, me)
            else:
                value = run(*call_args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the task's failure, recorded
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return self._raised(task, exc)
        finally:
            _context.CURRENT.reset(token)
        return "ok", value

    def _raised(self, task: Any, exc: BaseException) -> tuple[str, Any]:
        """As the worker's ``retry::outcome_of``: an explicit ``Retry``, an ``autoretry_for``
        type, or a failure."""
        limit = task.options.get("max_retries", _DEFAULT_MAX_RETRIES)
        if isinstance(exc, Retry):
            cause = exc.exc
            error = _error_of(cause if cause is not None else exc)
            return "retry", (exc.max_retries if exc.max_retries is not None else limit, error, cause is None)
        kinds = task.options.get("autoretry_for")
        if kinds:
            types = tuple(kinds) if isinstance(kinds, (list, tuple)) else (kinds,)
            if isinstance(exc, types):
                return "retry", (limit, _error_of(exc), False)
        return "fail", _error_of(exc)

    # -- async tasks ---------------------------------------------------------------------

    def _run_async(self, run: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], me: Any) -> Any:
        async def call() -> Any:
            _context.CURRENT.set(me)
            return await run(*args, **kwargs)

        loop = self._async_loop()
        if threading.current_thread() is self._loop_thread:
            # A task on the eager loop waits for another async task: run that one apart.
            box: dict[str, Any] = {}

            def apart() -> None:
                try:
                    box["value"] = asyncio.run(call())
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    box["error"] = e

            t = threading.Thread(target=apart, name="dbtask-eager-nested")
            t.start()
            t.join()
            if "error" in box:
                raise box["error"]
            return box["value"]
        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    def _async_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=serve, name="dbtask-eager-asyncio", daemon=True)
                thread.start()
                started.wait()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    # -- workflows: what the worker does after a task (worker/src/canvas) -----------------

    def _after(self, msg: dict[str, Any], record: dict[str, Any]) -> None:
        chain = msg.get("chain") or []
        chord = msg.get("chord")
        links = msg.get("link") or []
        errbacks = msg.get("link_error") or []
        if not (chain or chord or links or errbacks):
            return
        now = time.time()
        out: list[dict[str, Any]] = []
        groups: list[tuple[str, str]] = []
        failures: list[dict[str, Any]] = []
        state = record["state"]
        if state == "SUCCESS":
            result = record.get("result")
            if chain:
                try:
                    _expand(chain[0], result, chain[1:], chord, now, out, groups)
                except ValueError as e:
                    err = _error(MALFORMED, f"the next step of the chain cannot be published: {e}")
                    self._fail_chain(chain, chord, record, err, failures)
            elif chord is not None:
                results = self._count_member(chord, result)
                if results is not None:
                    try:
                        _expand(chord["callback"], results, [], chord.get("outer"), now, out, groups)
                    except ValueError as e:
                        err = _error(MALFORMED, f"the chord callback cannot be published: {e}")
                        _fail_chord(chord, record, err, failures)
            for link in links:
                try:
                    _expand(link, result, [], None, now, out, groups)
                except ValueError:
                    pass  # the worker drops it with a warning
        elif state in ("FAILURE", "REVOKED"):
            error = record.get("error") or _error(REVOKED, f"task {record['id']} was revoked")
            self._fail_chain(chain, chord, record, error, failures)
            if chord is not None:
                _fail_chord(chord, record, error, failures)
            for callback in errbacks:
                callback = dict(callback)
                options = dict(callback.get("options") or {})
                if not options.get("immutable"):
                    callback["args"] = [record["id"], error, *(callback.get("args") or [])]
                    options["immutable"] = True
                    callback["options"] = options
                try:
                    _expand(callback, _NOTHING, [], None, now, out, groups)
                except ValueError:
                    pass
        else:
            return
        root = msg.get("root_id") or record["id"]
        for nxt in out:
            nxt["parent_id"] = record["id"]
            nxt["root_id"] = root
        for failure in failures:
            self._store(failure)
        with self._lock:
            self._groups.update(groups)
            self._queue.extend(out)

    def _fail_chain(
        self,
        chain: list[Any],
        chord: Any,
        record: dict[str, Any],
        error: dict[str, Any],
        failures: list[dict[str, Any]],
    ) -> None:
        if not chain:
            return
        for tid in _final_ids(chain[-1]):
            failures.append(_ended(tid, error))
        if chord is not None:
            _fail_chord(chord, record, error, failures)

    def _count_member(self, chord: Mapping[str, Any], result: Any) -> Optional[list[Any]]:
        cid, index, size = chord["id"], int(chord["index"]), int(chord["size"])
        if index >= size:
            return None
        with self._lock:
            slots = self._chords.setdefault(cid, {})
            slots[index] = result
            if len(slots) < size or cid in self._fired:
                return None
            self._fired.add(cid)
            return [slots[i] for i in range(size)]


def _ignored(task: Any, msg: Mapping[str, Any]) -> bool:
    """``apply_async(ignore_result=...)``, else the task's option."""
    ignored = msg.get("ignore_result")
    return bool(task.options.get("ignore_result", False) if ignored is None else ignored)


def _ended(task_id: str, error: dict[str, Any]) -> dict[str, Any]:
    return {"id": task_id, "state": "FAILURE", "error": error, "worker": WORKER, "date_done": time.time()}


def _fail_chord(chord: Mapping[str, Any], record: dict[str, Any], error: dict[str, Any], failures: list[dict[str, Any]]) -> None:
    message = (
        f"chord {chord['id']} failed: member {chord['index']} (task {record.get('task') or '?'}, "
        f"id {record['id']}) raised {error.get('type')}: {error.get('message')}"
    )
    current: Any = chord
    while current is not None:
        for tid in _final_ids(current["callback"]):
            failures.append(
                _ended(tid, {"type": CHORD_ERROR, "message": message, "traceback": error.get("traceback")})
            )
        current = current.get("outer")


def _final_ids(sig: Mapping[str, Any]) -> list[str]:
    """The ids whose records hold a signature's outcome (``Signature::final_ids``)."""
    kind = sig.get("kind", "task")
    if kind == "task":
        tid = (sig.get("options") or {}).get("task_id")
        return [tid] if tid else []
    if kind == "chain":
        steps = sig.get("steps") or []
        return _final_ids(steps[-1]) if steps else []
    if kind == "group":
        return [i for m in sig.get("members") or [] for i in _final_ids(m)]
    body = sig.get("body")
    return _final_ids(body) if body else []


def _result_ref(sig: Mapping[str, Any]) -> Any:
    kind = sig.get("kind", "task")
    if kind == "task":
        return (sig.get("options") or {}).get("task_id") or ""
    if kind == "chain":
        steps = sig.get("steps") or []
        return _result_ref(steps[-1]) if steps else None
    if kind == "group":
        return [_result_ref(m) for m in sig.get("members") or []]
    body = sig.get("body")
    return _result_ref(body) if body else None


def _expand(
    sig: Mapping[str, Any],
    parent: Any,
    chain: list[Any],
    chord: Optional[dict[str, Any]],
    now: float,
    out: list[dict[str, Any]],
    groups: list[tuple[str, str]],
) -> None:
    """The messages a signature becomes (the protocol crate's ``canvas::expand``): ``parent``
    is the result prepended to the first task(s) (``_NOTHING``: none), ``chain`` and
    ``chord`` what follows it. ValueError for a malformed signature."""
    kind = sig.get("kind", "task")
    options = sig.get("options") or {}
    sid = options.get("task_id")
    if kind == "task":
        if not sid:
            raise ValueError(f"signature of task {sig.get('task')} has no options.task_id")
        args = list(sig.get("args") or [])
        if parent is not _NOTHING and not options.get("immutable"):
            args = [parent, *args]
        countdown = options.get("countdown")
        out.append(
            {
                "id": sid,
                "task": sig.get("task"),
                "args": args,
                "kwargs": dict(sig.get("kwargs") or {}),
                "queue": options.get("queue") or "default",
                "eta": now + max(0.0, countdown) if countdown is not None else None,
                "priority": options.get("priority"),
                "chain": list(chain),
                "chord": chord,
                "link": list(sig.get("link") or []),
                "link_error": list(sig.get("link_error") or []),
            }
        )
        return
    if kind == "chain":
        steps = sig.get("steps") or []
        if not steps:
            raise ValueError("a chain needs at least one step")
        _expand(steps[0], parent, [*steps[1:], *chain], chord, now, out, groups)
        return
    if kind == "group":
        if not sid:
            raise ValueError("a group has no options.task_id (its group id)")
        if chain:
            raise ValueError(f"group {sid} is followed by more steps: a group followed by a task is a chord")
        if chord is not None:
            raise ValueError(f"group {sid} is a member of a chord header: put its members in the header instead")
        members = sig.get("members") or []
        groups.append((sid, json.dumps([_result_ref(m) for m in members], separators=(",", ":"))))
        for member in members:
            _expand(member, parent, [], None, now, out, groups)
        return
    if kind == "chord":
        if not sid:
            raise ValueError("a chord has no options.task_id (its chord id)")
        body = sig.get("body")
        if body is None:
            raise ValueError(f"chord {sid} has no body (callback)")
        callback = body if not chain else {"kind": "chain", "steps": [body, *chain], "options": {}}
        members = sig.get("members") or []
        if not members:
            _expand(callback, [], [], chord, now, out, groups)
            return
        for index, member in enumerate(members):
            if member.get("kind", "task") == "group":
                raise ValueError(f"member {index} of chord {sid} is a group: put its members in the header instead")
            ref = {"id": sid, "index": index, "size": len(members), "callback": callback}
            if chord is not None:
                ref["outer"] = chord
            _expand(member, parent, [], ref, now, out, groups)
        return
    raise ValueError(f"unknown signature kind {kind!r}")


class _Progress:
    """``AsyncResult.progress()`` in eager mode: the task ran already, so its current record
    (when it has one) is the only update."""

    def __init__(self, client: EagerClient, task_id: str) -> None:
        self._client = client
        self._task_id = task_id
        self._done = False

    async def next(self, timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
        return self.next_sync(timeout)

    def next_sync(self, timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
        if self._done:
            return None
        self._done = True
        return self._client.get_record_sync(self._task_id)

    def close(self) -> None:
        self._done = True
