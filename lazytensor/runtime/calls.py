"""Calls: which invocations of a module (which generation steps) a point node means.

``Node.call`` is one of:

* ``n >= 0``: the module's ``n``-th call (in generation, the ``n``-th step);
* ``EVERY_CALL`` (``-1``): every call (``tracer.all()``, ``tracer.iter[:]``);
* ``(start, stop, step)`` with ``stop`` an int or ``None`` (no end): the calls of that range
  (``with tracer.iter[1:3]:``, ``for _ in tracer.iter[2:]:``).

A node recorded for several calls runs again at each of them; when it is saved, its value is
one value per call that ran, in order (a list). A node of one call in generation whose step
never ran (generation stopped early, at an end-of-sequence token) is no failure of the run: its
saved value is a :class:`NotRun`, which the trace turns into an error at the user's line when
the value is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..core.graph import EVERY_CALL, Graph


def is_many(call: Any) -> bool:
    """Whether ``call`` means several calls (a range, or every call)."""
    return call == EVERY_CALL or type(call) is tuple


def matches(call: Any, n: int) -> bool:
    """Whether a node of ``call`` runs at a module's ``n``-th call."""
    if type(call) is tuple:
        start, stop, step = call
        return n >= start and (stop is None or n < stop) and (n - start) % step == 0
    return call == n or call == EVERY_CALL


def fake_matches(call: Any, n: int) -> bool:
    """:func:`matches` in a shape-only generation pass, whose call 1 stands for every step
    after the prompt."""
    if type(call) is tuple:
        start, stop, step = call
        first = [s for s in (start, start + step) if stop is None or s < stop]
        return any(min(s, 1) == n for s in first)
    if call == EVERY_CALL:
        return True
    return min(call, 1) == n


def describe(call: Any) -> str:
    """``call`` in words, for errors."""
    if type(call) is tuple:
        start, stop, step = call
        every = "" if step == 1 else f" every {step}"
        return f"calls {start}..{'' if stop is None else stop - 1}{every}"
    return "every call" if call == EVERY_CALL else f"call {call}"


class NotRun(dict):
    """The value of a saved node whose generation step never ran.

    A dict (``{"call", "steps", "point"}``) so that it travels from a server as plain data.
    """

    def __init__(self, call: int, steps: int, point: str) -> None:
        super().__init__(call=call, steps=steps, point=point)

    @classmethod
    def of(cls, value: Any) -> NotRun | None:
        """``value`` as a :class:`NotRun` if it is one, also as a server sends it back."""
        if isinstance(value, NotRun):
            return value
        if isinstance(value, dict) and getattr(value, "cls_name", None) == cls.__name__:
            if set(value) == {"call", "steps", "point"}:
                return cls(value["call"], value["steps"], value["point"])
        return None

    def message(self) -> str:
        steps = self["steps"]
        return (
            f"{self['point']} at step {self['call']} never ran: generation stopped after "
            f"{steps} step{'' if steps == 1 else 's'}"
        )


def per_call(graph: Graph, repeating: frozenset[int], ids: Iterable[int]) -> set[int]:
    """Which of ``ids`` have one value per call: they read a point node of a call range.

    (A node under ``EVERY_CALL`` alone keeps its last call's value.)
    """
    wanted = {i for i in ids if i in repeating}
    ranged: set[int] = set()
    last = max(wanted, default=-1)
    for i in sorted(repeating):  # ids are a topological order
        if i > last:
            break
        node = graph.nodes[i]
        if node.is_point:  # a run has one result, whichever steps it was read at
            many = type(node.call) is tuple and node.op != "result"
        else:
            many = any(d in ranged for d in node.deps())
        if many:
            ranged.add(i)
    return wanted & ranged
