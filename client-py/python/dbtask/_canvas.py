"""Workflows: signatures, chains, groups and chords (as in Celery's canvas).

A signature is plain JSON data (a ``dict``): ``dict(sig)`` can be stored or sent anywhere and
``Signature.from_dict(d)`` brings it back. Publishing a workflow first assigns every id
("freezes" it), so every result handle is known before anything runs; then the compiled client
expands it into the task messages to publish now, and the rest of the workflow rides inside
those messages: the worker that finishes a step publishes what follows.

- ``task.s(*args, **kwargs)``: a partial call; in a chain the parent's result is prepended to
  its arguments. ``task.si(...)``: immutable, the parent's result is not passed.
- ``sig1 | sig2`` or ``Chain([...])``: one after the other; the result handle is the last
  step's; a failing step stops the chain and its error is recorded on the last step's result.
- ``Group([...])``: in parallel; a :class:`GroupResult` (ordered), restorable from its id.
- ``Chord([...], callback)``: a group, then the callback with the ordered list of results,
  exactly once; if a member fails the callback does not run and the chord's result raises
  :class:`dbtask.ChordError`. In a chain, a group followed by a step becomes a chord.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn, Union

from . import _client, _options
from ._result import READY_STATES, AsyncResult

__all__ = ["Signature", "Chain", "Group", "Chord", "GroupResult", "signature", "GROUP_TTL"]

#: How long Redis keeps a group's member ids (``GroupResult.restore``), in seconds: the
#: worker's default ``result_ttl``.
GROUP_TTL = 86_400.0

ResultHandle = Union[AsyncResult[Any], "GroupResult"]


def _new_id() -> str:
    """A new task id. The compiled module's generator (buffered OS randomness) once `init`
    has loaded it, else `uuid4()`: a 1,000-member chord names 1,001 tasks, and `uuid4()`
    costs about 5 µs each. (``import dbtask`` alone never loads the compiled module.)"""
    native = _client._native_if_loaded()
    return native.new_task_id() if native is not None else str(uuid.uuid4())


def signature(data: Mapping[str, Any]) -> "Signature":
    """A signature of the right class (task, Chain, Group, Chord) from its dict form."""
    return Signature.from_dict(data)


class Signature(dict):  # type: ignore[type-arg]
    """A task call as data: ``{"task": name, "args": [...], "kwargs": {...}, "options": {...}}``.

    Made by ``task.s(...)`` / ``task.si(...)``; ``dict(sig)`` is its JSON form. Async methods
    have a blocking twin with the suffix ``_sync``.
    """

    kind = "task"

    def __init__(
        self,
        task: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        link: Iterable[Mapping[str, Any]] = (),
        link_error: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__()
        if task is not None:
            self["task"] = _options.check_task_name(task)
        # Tuples and lists first: isinstance(a_tuple, Sequence) is slow (CPython caches no
        # result for a class registered directly on the ABC, as tuple is).
        if not isinstance(args, (tuple, list)) and (
            isinstance(args, (str, bytes)) or not isinstance(args, Sequence)
        ):
            raise TypeError(f"args must be a tuple or a list, not {type(args).__name__}")
        self["args"] = list(args)
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
        self["kwargs"] = dict(kwargs or {})
        self["options"] = _options.signature_options(options or {})
        links = [Signature.from_dict(s) for s in link]
        errbacks = [Signature.from_dict(s) for s in link_error]
        if links:
            self["link"] = links
        if errbacks:
            self["link_error"] = errbacks

    # -- data -----------------------------------------------------------------------------

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Signature":
        """Restores a signature (of any kind) from ``dict(sig)`` or its JSON decoded."""
        if isinstance(data, Signature):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"a signature is a dict, not {type(data).__name__}")
        kind = data.get("kind", "task")
        options = dict(data.get("options") or {})
        if kind == "task":
            if "task" not in data:
                raise ValueError(f"a task signature needs a 'task' name: {dict(data)!r}")
            return Signature(
                data["task"],
                data.get("args") or (),
                data.get("kwargs") or {},
                options,
                link=data.get("link") or (),
                link_error=data.get("link_error") or (),
            )
        if kind == "chain":
            return Chain(data.get("steps") or [], **options)
        if kind == "group":
            return Group(data.get("members") or [], **options)
        if kind == "chord":
            if data.get("body") is None:
                raise ValueError("a chord signature needs a 'body' (its callback)")
            return Chord(data.get("members") or [], data["body"], **options)
        raise ValueError(f"unknown signature kind {kind!r}: use task, chain, group or chord")

    @property
    def name(self) -> str:
        return str(self.get("task", self.kind))

    @property
    def args(self) -> list[Any]:
        return self.get("args", [])  # type: ignore[no-any-return]

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.get("kwargs", {})  # type: ignore[no-any-return]

    @property
    def options(self) -> dict[str, Any]:
        return self["options"]  # type: ignore[no-any-return]

    @property
    def immutable(self) -> bool:
        return bool(self.options.get("immutable"))

    @property
    def id(self) -> str | None:
        """The task (group, chord) id once assigned: ``freeze()`` or ``set(task_id=...)``."""
        return self.options.get("task_id")

    def __repr__(self) -> str:
        args = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(args)}){'!' if self.immutable else ''}"

    def clone(self) -> "Signature":
        """A deep copy (ids included)."""
        return Signature.from_dict(json.loads(_dumps(self)))

    def _copy(self) -> "Signature":
        """A copy to send: new containers for all that sending changes or extends (options,
        argument lists, nested signatures), the argument values themselves shared, since they
        are only serialized. Much cheaper than :meth:`clone` for a large workflow: no JSON
        round trip and no second validation of what was validated when it was built."""
        new = dict.__new__(type(self))
        for key, value in self.items():
            if isinstance(value, Signature):
                value = value._copy()
            elif isinstance(value, list):
                value = [v._copy() if isinstance(v, Signature) else v for v in value]
            elif isinstance(value, dict):
                value = dict(value)
            dict.__setitem__(new, key, value)
        return new

    def set(
        self,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        priority: int | None = None,
        task_id: str | None = None,
        immutable: bool | None = None,
        **unknown: NoReturn,
    ) -> "Signature":
        """Sets options on this signature (in place) and returns it; ``None`` leaves an option
        as it is. On a chain, a group or a chord, the options apply to every task in it, and
        ``task_id`` names its result. Another keyword is a ``TypeError`` naming the valid ones
        (``dbtask._options.SIGNATURE_OPTIONS``)."""
        if unknown:
            _options.refuse_unknown("set()", unknown, _options.SIGNATURE_OPTIONS, kind="signature option")
        given = {"queue": queue, "countdown": countdown, "priority": priority, "task_id": task_id, "immutable": immutable}
        self._set({k: v for k, v in given.items() if v is not None})
        return self

    def _set(self, options: dict[str, Any]) -> None:
        """Sets ``options`` (known names, no ``None``), checking their values."""
        self["options"] = _options.signature_options({**self.options, **options}, "set()")

    def on_success(self, callback: Mapping[str, Any]) -> "Signature":
        """Adds a ``link`` callback: published with this task's result when it succeeds."""
        self._task_only("link").setdefault("link", []).append(Signature.from_dict(callback))
        return self

    def on_error(self, callback: Mapping[str, Any]) -> "Signature":
        """Adds a ``link_error`` callback: published with ``(task_id, error)`` when it fails
        (``error`` is ``{"type", "message", "traceback"}``)."""
        self._task_only("link_error").setdefault("link_error", []).append(Signature.from_dict(callback))
        return self

    def _task_only(self, what: str) -> "Signature":
        if self.kind != "task":
            raise TypeError(f"{what} callbacks attach to a task signature, not a {self.kind}")
        return self

    def __or__(self, other: Any) -> "Chain":
        if not isinstance(other, Mapping):
            return NotImplemented
        return Chain([self, Signature.from_dict(other)])

    # -- ids and results ------------------------------------------------------------------

    def freeze(self) -> ResultHandle:
        """Assigns every missing id (in place) and returns the result handle."""
        if "task_id" not in self.options:
            self.options["task_id"] = _new_id()
        for key in ("link", "link_error"):
            for s in self.get(key, []):
                s.freeze()
        return AsyncResult(self.options["task_id"])

    def _partial(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> "Signature":
        """A copy with ``args`` prepended and ``kwargs`` merged (as Celery's ``delay``)."""
        sig = self._copy()
        if args or kwargs:
            sig["args"] = list(args) + sig.args
            sig["kwargs"] = {**sig.kwargs, **kwargs}
        return sig

    # -- sending --------------------------------------------------------------------------

    def _prepare(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> tuple[str, ResultHandle]:
        sig = self._partial(tuple(args or ()), dict(kwargs or {}))
        opts = {k: v for k, v in options.items() if v is not None}
        link = opts.pop("link", None)
        link_error = opts.pop("link_error", None)
        if opts:
            sig.set(**opts)
        for s in _as_list(link):
            sig.on_success(s)
        for s in _as_list(link_error):
            sig.on_error(s)
        handle = sig.freeze()
        return _dumps(sig), handle

    async def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Publishes the workflow (``args`` prepended to the first task's, ``kwargs`` merged)
        and returns its result handle once JetStream has every message."""
        return await self.apply_async(args, kwargs)

    def delay_sync(self, *args: Any, **kwargs: Any) -> Any:
        """Blocking form of :meth:`delay`."""
        return self.apply_async_sync(args, kwargs)

    async def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        priority: int | None = None,
        task_id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        **unknown: NoReturn,
    ) -> Any:
        """Publishes with options; ``link`` / ``link_error``: a signature or a list of them.
        Another keyword is a ``TypeError`` (``dbtask._options.SIGNATURE_APPLY_OPTIONS``)."""
        if unknown:
            _options.refuse_unknown("apply_async()", unknown, _options.SIGNATURE_APPLY_OPTIONS)
        body, handle = self._prepare(
            args,
            kwargs,
            {"queue": queue, "countdown": countdown, "priority": priority, "task_id": task_id, "link": link, "link_error": link_error},
        )
        await _client.current().publish_workflow(body, GROUP_TTL)
        return handle

    def apply_async_sync(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        priority: int | None = None,
        task_id: str | None = None,
        link: Any = None,
        link_error: Any = None,
        **unknown: NoReturn,
    ) -> Any:
        """Blocking form of :meth:`apply_async`."""
        if unknown:
            _options.refuse_unknown("apply_async_sync()", unknown, _options.SIGNATURE_APPLY_OPTIONS)
        body, handle = self._prepare(
            args,
            kwargs,
            {"queue": queue, "countdown": countdown, "priority": priority, "task_id": task_id, "link": link, "link_error": link_error},
        )
        _client.current().publish_workflow_sync(body, GROUP_TTL)
        return handle


def _as_list(value: Any) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value]
    return list(value)


def _dumps(sig: Mapping[str, Any]) -> str:
    try:
        return json.dumps(sig, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"workflow arguments must be JSON-serializable: {e}") from None


def _sigs(items: Iterable[Mapping[str, Any]], what: str) -> list[Signature]:
    if isinstance(items, Mapping):
        raise TypeError(f"{what} takes a list of signatures, not one signature")
    return [Signature.from_dict(s) for s in items]


class Chain(Signature):
    """Steps run one after the other, each result prepended to the next step's arguments
    (unless the step is immutable). ``Chain([a.s(1), b.s()])``, ``Chain(a.s(1), b.s())`` or
    ``a.s(1) | b.s()``. Nested chains are flattened; a group followed by a step becomes a
    chord. The result handle is the last step's."""

    kind = "chain"

    def __init__(self, *steps: Any, **options: Any) -> None:
        dict.__init__(self)
        if len(steps) == 1 and not isinstance(steps[0], Mapping):
            steps = tuple(steps[0])
        flat: list[Signature] = []
        for s in _sigs(steps, "Chain"):
            flat.extend(s.steps if isinstance(s, Chain) else [s])
        # A group followed by a step is a chord whose callback is that step (as in Celery).
        merged: list[Signature] = []
        for s in flat:
            group = merged[-1] if merged else None
            if isinstance(group, Group) and not isinstance(group, Chord):
                merged.pop()
                s = Chord(group.members, s, **{k: v for k, v in group.options.items() if k == "task_id"})
            merged.append(s)
        self["kind"] = "chain"
        self["steps"] = merged
        self["options"] = _options.signature_options(options, "Chain()")

    @property
    def steps(self) -> list[Signature]:
        return self["steps"]  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return " | ".join(repr(s) for s in self.steps) or "Chain([])"

    def __or__(self, other: Any) -> "Chain":
        if not isinstance(other, Mapping):
            return NotImplemented
        return Chain(self.steps + [Signature.from_dict(other)])

    def freeze(self) -> ResultHandle:
        if not self.steps:
            raise ValueError("an empty chain has nothing to run")
        handles = [s.freeze() for s in self.steps]
        return handles[-1]

    def _partial(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> "Signature":
        chain = self._copy()
        assert isinstance(chain, Chain)
        if (args or kwargs) and chain.steps:
            chain.steps[0] = chain.steps[0]._partial(args, kwargs)
        return chain

    def _set(self, options: dict[str, Any]) -> None:
        """Options given to a chain apply to every step (``task_id`` to the last one)."""
        task_id = options.pop("task_id", None)
        for s in self.steps:
            s._set(dict(options))
        if task_id is not None and self.steps:
            self.steps[-1]._set({"task_id": task_id})

    def on_success(self, callback: Mapping[str, Any]) -> "Signature":
        """Links ``callback`` to the chain's last step."""
        self._last().on_success(callback)
        return self

    def on_error(self, callback: Mapping[str, Any]) -> "Signature":
        """Links the error ``callback`` to every step (the one that fails calls it, once: the
        chain stops there)."""
        if any(s.kind != "task" for s in self.steps):
            raise TypeError("link_error on a chain needs every step to be a task: link it to the steps themselves")
        for s in self.steps:
            s.on_error(callback)
        return self

    def _last(self) -> Signature:
        if not self.steps:
            raise ValueError("an empty chain has nothing to run")
        return self.steps[-1]


class Group(Signature):
    """Members run in parallel, all published at once. The result is a :class:`GroupResult`
    whose ``get()`` gives the members' results in order."""

    kind = "group"

    def __init__(self, *members: Any, **options: Any) -> None:
        dict.__init__(self)
        if len(members) == 1 and not isinstance(members[0], Mapping):
            members = tuple(members[0])
        self["kind"] = self.kind
        self["members"] = _sigs(members, type(self).__name__)
        self["options"] = _options.signature_options(options, f"{type(self).__name__}()")

    @property
    def members(self) -> list[Signature]:
        return self["members"]  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"{type(self).__name__}([{', '.join(repr(m) for m in self.members)}])"

    def freeze(self) -> ResultHandle:
        if "task_id" not in self.options:
            self.options["task_id"] = _new_id()
        return GroupResult(self.options["task_id"], [m.freeze() for m in self.members])

    def _partial(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> "Signature":
        group = self._copy()
        assert isinstance(group, Group)
        if args or kwargs:
            group["members"] = [m._partial(args, kwargs) for m in group.members]
        return group

    def _set(self, options: dict[str, Any]) -> None:
        """``task_id`` names the group; other options apply to every member."""
        task_id = options.pop("task_id", None)
        for m in self.members:
            m._set(dict(options))
        if task_id is not None:
            self["options"] = _options.signature_options({**self.options, "task_id": task_id}, "set()")


class Chord(Group):
    """A header group, then ``body`` with the ordered list of the header's results, published
    exactly once by the worker that completes the header. The result handle is the body's.
    A member failing (after its retries) means the body never runs and the result raises
    :class:`dbtask.ChordError` naming that member. An empty header runs the body with ``[]``."""

    kind = "chord"

    def __init__(self, header: Iterable[Mapping[str, Any]], body: Mapping[str, Any], **options: Any) -> None:
        Group.__init__(self, list(_sigs(header, "Chord")), **options)
        for i, m in enumerate(self.members):
            if isinstance(m, Group) and not isinstance(m, Chord):
                raise ValueError(f"member {i} of a chord header is a group: put its members in the header instead")
        self["body"] = Signature.from_dict(body)

    @property
    def body(self) -> Signature:
        return self["body"]  # type: ignore[no-any-return]

    def _set(self, options: dict[str, Any]) -> None:
        """``task_id`` names the chord's result (its callback's id); other options apply to
        every member and to the callback."""
        task_id = options.pop("task_id", None)
        Group._set(self, dict(options))
        self.body._set(options)
        if task_id is not None:
            self.body._set({"task_id": task_id})

    def __repr__(self) -> str:
        return f"Chord([{', '.join(repr(m) for m in self.members)}], {self.body!r})"

    def freeze(self) -> ResultHandle:
        if "task_id" not in self.options:
            self.options["task_id"] = _new_id()
        for m in self.members:
            m.freeze()
        return self.body.freeze()


class GroupResult:
    """The results of a group's members, in order. ``GroupResult.restore(id)`` rebuilds it in
    any process (while Redis keeps the group: ``GROUP_TTL``). Async methods have a blocking twin
    with the suffix ``_sync``."""

    __slots__ = ("id", "results")

    def __init__(self, id: str, results: Sequence[ResultHandle]) -> None:
        self.id = id
        self.results: list[ResultHandle] = list(results)

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{len(self.results)} results]>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Any:
        return iter(self.results)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupResult) and other.id == self.id and other.results == self.results

    def __hash__(self) -> int:
        return hash(self.id)

    @staticmethod
    def _from_ids(group_id: str, ids: Sequence[Any]) -> "GroupResult":
        results: list[ResultHandle] = []
        for i, item in enumerate(ids):
            if isinstance(item, list):
                results.append(GroupResult._from_ids(f"{group_id}.{i}", item))
            else:
                results.append(AsyncResult(str(item)))
        return GroupResult(group_id, results)

    @classmethod
    async def restore(cls, group_id: str) -> "GroupResult":
        """The group published under ``group_id``; ``LookupError`` when Redis does not know it."""
        raw = await _client.current().get_group(group_id)
        return cls._restored(group_id, raw)

    @classmethod
    def restore_sync(cls, group_id: str) -> "GroupResult":
        """Blocking form of :meth:`restore`."""
        return cls._restored(group_id, _client.current().get_group_sync(group_id))

    @classmethod
    def _restored(cls, group_id: str, raw: str | None) -> "GroupResult":
        if raw is None:
            raise LookupError(f"no group {group_id} in Redis (never published, or expired after {GROUP_TTL:.0f} s)")
        return cls._from_ids(group_id, json.loads(raw))

    async def get(self, timeout: float | None = None) -> list[Any]:
        """The members' results in order; raises the first failed member's error.
        ``timeout``: seconds for the whole group (``TimeoutError``)."""
        return list(await asyncio.gather(*(r.get(timeout=timeout) for r in self.results)))

    def get_sync(self, timeout: float | None = None) -> list[Any]:
        """Blocking form of :meth:`get`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for r in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(r.get_sync(timeout=left))
        return out

    async def _states(self) -> list[str]:
        states: list[str] = []
        for r in self.results:
            if isinstance(r, GroupResult):
                sub = await r._states()
                states.append(_group_state(sub))
            else:
                states.append(await r.state())
        return states

    def _states_sync(self) -> list[str]:
        states: list[str] = []
        for r in self.results:
            if isinstance(r, GroupResult):
                states.append(_group_state(r._states_sync()))
            else:
                states.append(r.state_sync())
        return states

    async def ready(self) -> bool:
        """True once every member is ready (succeeded, failed or revoked)."""
        return all(s in READY_STATES for s in await self._states())

    def ready_sync(self) -> bool:
        return all(s in READY_STATES for s in self._states_sync())

    async def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(s == "SUCCESS" for s in await self._states())

    def completed_count_sync(self) -> int:
        return sum(s == "SUCCESS" for s in self._states_sync())

    async def successful(self) -> bool:
        """True when every member succeeded."""
        return all(s == "SUCCESS" for s in await self._states())

    def successful_sync(self) -> bool:
        return all(s == "SUCCESS" for s in self._states_sync())

    async def failed(self) -> bool:
        """True when any member failed (or was revoked)."""
        return any(s in ("FAILURE", "REVOKED") for s in await self._states())

    def failed_sync(self) -> bool:
        return any(s in ("FAILURE", "REVOKED") for s in self._states_sync())


def _group_state(states: list[str]) -> str:
    if any(s in ("FAILURE", "REVOKED") for s in states):
        return "FAILURE"
    if all(s == "SUCCESS" for s in states):
        return "SUCCESS"
    return "PENDING"
