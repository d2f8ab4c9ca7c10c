"""Outcome: what a finished run returns, and which moments that never came are failures.

A point node whose moment never came fails the run (a module never called, a call it never
made), except in two cases that are the run's outcome rather than a mistake: a node of a call
range whose module ran (its value is the calls that ran, maybe none), and, in generation, a
node of a step that never ran (generation stopped early). A saved node kept from running by
such a step is returned as a :class:`~lazytensor.runtime.calls.NotRun`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.errors import GraphError, NodeFailure
from ..core.graph import Node
from . import calls
from .calls import NotRun
from .moments import describe
from .plan import GRAD

if TYPE_CHECKING:
    from .executor import Executor

#: A point read whose kwargs hold ``{IF_CALLED: True}`` (a cache of every module) is no failure
#: when its module is never called (a dropout a model skips): its saved value is left out.
IF_CALLED = "if_called"


def check_all_ran(ex: Executor) -> None:
    """Fail on the first point node whose moment never came, unless :func:`_tolerated`."""
    nodes = ex.graph.nodes
    for i in ex.key_of:  # the point nodes, in recording order
        node = nodes[i]
        if ex.done[i] or _tolerated(ex, node):
            continue
        made = ex.calls.get(ex.key_of[i], 0)
        side = ex.sides.side_of.get(i)
        if ex.key_of[i][1] == GRAD:
            what = (
                "no gradient reached this value in its backward pass: the loss does not "
                "depend on it (a slice or copy of a module's value is not on the loss's path: "
                "read .grad of the value itself), or it was computed before anything that "
                "requires a gradient"
            )
            raise NodeFailure(i, GraphError(what), "")
        if side is not None:
            target = ex.graph.nodes[side].target
            what = f"{describe(node)} never happened inside the call of {target!r}"
        elif made == 0:
            what = f"{describe(node)} never happened: the module was never called"
        else:
            what = (
                f"{describe(node)} at {calls.describe(node.call)} never happened: the "
                f"module ran {made} time(s)"
            )
        raise NodeFailure(i, GraphError(what), "check the module path and the iteration range")


def _tolerated(ex: Executor, node: Node) -> bool:
    """A point node of calls that never came although its module ran in the forward."""
    if node.kwargs and node.kwargs.get(IF_CALLED) is True:
        return True
    if node.id in ex.sides.side_of or ex.calls.get(ex.key_of[node.id], 0) == 0:
        return False
    return calls.is_many(node.call) or ex.batch.generate


def saved(ex: Executor) -> dict[int, Any]:
    """The saved values: one per call for a call range, a NotRun for a step never run."""
    nodes = ex.graph.nodes
    return {
        i: _saved(ex, i)
        for i in ex.graph.saved
        if ex.done[i] or i in ex.collected or nodes[i].kwargs.get(IF_CALLED) is not True
    }


def _saved(ex: Executor, i: int) -> Any:
    if i in ex.collected:
        return ex.collected[i]
    if ex.done[i]:
        return ex.values[i]
    missing = _missing_point(ex, i)
    return NotRun(missing.call, ex.forwards, describe(missing))


def _missing_point(ex: Executor, i: int) -> Node:
    """The point node that never ran and kept node ``i`` from running."""
    todo, seen = [i], set()
    while todo:
        j = todo.pop()
        if j in ex.key_of and not ex.done[j]:
            return ex.graph.nodes[j]
        seen.add(j)
        todo.extend(d for d in ex.deps[j] if not ex.done[d] and d not in seen)
    raise NodeFailure(i, GraphError("this node never ran, and no moment it waits for is missing"))
