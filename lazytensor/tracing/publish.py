"""Publish: once a trace has its values, the user's names hold real tensors, not proxies.

After ``with model.trace(...):`` ends, code expects ``h = ....save()`` to be the tensor itself:
``torch.save(h)``, ``np.asarray(h)``, ``pickle``, ``isinstance(h, torch.Tensor)``. So the trace
rebinds every name of the block's frame (module globals, a function's locals, a notebook cell)
that holds one of its saved proxies to that proxy's value, and fills in place the lists and
dicts the frame holds (at any depth; tuples are rebuilt) wherever they hold saved proxies:
containers saved with ``lt.save(...)``, filled before or after that call, and plain ones like
``logits[step] = ....save()``. Objects of other types are not searched: a proxy kept inside one
still answers ``.value``. A value saved once for several steps (:mod:`.steps`) becomes what the
body would have made had it run at each step: in a list, one value per step that ran, in place
of the proxy; in a name, the last step's.

CPython before 3.13 keeps a function's locals in fast slots that ``frame.f_locals`` only copies;
writing them back takes ``PyFrame_LocalsToFast``. From 3.13 on ``f_locals`` writes through.
"""

from __future__ import annotations

import ctypes
import inspect
import sys
from types import FrameType
from typing import Any

from .proxy import PROXIES, Proxy
from .steps import PerStep, published

_MAX_DEPTH = 16
#: How many container items one publish may visit: a frame holding a huge list of numbers
#: costs a bounded walk (names bound to proxies themselves are always rebound).
_BUDGET = 100_000
_ATOMS = frozenset((int, float, bool, str, bytes, type(None)))


def publish(frame: FrameType | None, values: dict[int, Any], trace: Any, extra: list) -> None:
    """Replace ``trace``'s saved proxies by their ``values`` in ``frame`` and in ``extra``.

    Args:
        frame: the frame whose names to rebind (the frame of the ``with`` block), or ``None``.
        values: node id -> value for the saved nodes.
        trace: whose proxies to replace (proxies of other traces stay).
        extra: containers saved with ``lt.save`` (filled in place wherever they are).
    """
    walk = _Walk(trace, values)
    for container in extra:
        walk.real(container, 0)
    if frame is None:
        return
    changed = {}
    for name, value in list(frame.f_locals.items()):
        new = walk.real(value, 0)
        if new is not value:
            changed[name] = new
    if changed:
        _rebind(frame, changed)
    _forget(frame)


class _Walk:
    """One publish's walk (a class, not a recursive closure: that would be a reference cycle
    holding the trace until the garbage collector runs)."""

    def __init__(self, trace: Any, values: dict[int, Any]) -> None:
        self.trace, self.values = trace, values
        self.seen: set[int] = set()
        self.budget = _BUDGET

    def real(self, value: Any, depth: int) -> Any:
        """``value`` with the trace's saved proxies replaced; lists and dicts in place."""
        if isinstance(value, Proxy):
            if value._trace is self.trace and value._node in self.values:
                ok, real = published(self.values[value._node])
                return real if ok else value  # a step that never ran: the proxy raises
            return value
        kind = type(value)
        if kind not in (list, dict, tuple) or depth > _MAX_DEPTH or id(value) in self.seen:
            return value
        self.budget -= len(value)
        if self.budget < 0:
            return value
        if kind is tuple:
            items = [self.real(item, depth + 1) for item in value]
            changed = any(new is not old for new, old in zip(items, value))
            return tuple(items) if changed else value
        self.seen.add(id(value))
        if kind is list and any(self._steps(item) is not None for item in value):
            value[:] = self._spliced(value, depth)
            return value
        keys = range(len(value)) if kind is list else list(value)
        for key in keys:
            item = value[key]
            if type(item) in _ATOMS:  # most items of a big list: nothing to do
                continue
            new = self.real(item, depth + 1)
            if new is not item:
                value[key] = new
        return value

    def _steps(self, item: Any) -> PerStep | None:
        """The per-step values of ``item`` if it is a saved proxy of several steps."""
        if type(item) in PROXIES and item._trace is self.trace:
            found = self.values.get(item._node)
            return found if isinstance(found, PerStep) else None
        return None

    def _spliced(self, items: list, depth: int) -> list:
        """``items`` with each proxy of several steps replaced by its values, one per step
        (what appending in a body run at every step would have made)."""
        out = []
        for item in items:
            steps = self._steps(item)
            if steps is not None:
                out.extend(steps)
            else:
                out.append(self.real(item, depth + 1))
        return out


def _rebind(frame: FrameType, changed: dict[str, Any]) -> None:
    names = frame.f_locals
    names.update(changed)
    if _snapshot(frame):
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


def _snapshot(frame: FrameType) -> bool:
    """Whether ``frame.f_locals`` is a copy of a function's fast locals (before 3.13)."""
    return sys.version_info < (3, 13) and bool(frame.f_code.co_flags & inspect.CO_OPTIMIZED)


def _forget(frame: FrameType) -> None:
    """Drop the copy of a function's locals that reading ``f_locals`` left on its frame: it
    would keep a name's old value alive after the function deletes or rebinds the name."""
    if _snapshot(frame):
        frame.f_locals.clear()  # the locals themselves are untouched
