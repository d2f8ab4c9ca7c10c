"""Chains: runs of compute nodes replayed as one unit, without the per-node scheduler.

Research code records long runs of small ops (``h = h * 1.0001 + 0.0`` in a loop, per-head
slices and sums). The executor's scheduler pays, per node, a heap push and pop and the
bookkeeping of who waits for whom. A :class:`Chain` is a run of consecutive nodes
``start..stop``, each a ``function`` or ``method`` node that writes into nothing and runs once
(not at every call), found once per graph structure with the plan.

When ``start`` is ready, every value the chain reads from before it exists and none of its
nodes has run on its own yet (:meth:`Chain.ready`), the whole chain runs in recording order,
which is the order the scheduler would have run it in (nothing outside the chain has an id
between its nodes), and the scheduler's counters are updated once for the chain
(:meth:`Executor._ran_chain`). Otherwise its nodes run one by one as before.

Each step is specialized on where its arguments come from (:data:`_PAIRS`): a value only the
next node reads lives in a local variable, as in the same loop written by hand, and scalars
are read from the running graph's nodes, so one chain serves every graph of its structure.
Anything else (slices, containers, constants, keywords) is resolved as the executor resolves
it (:func:`_call`). Consecutive steps of one kind that store nothing (the ``h * a + b`` loop is
one such run) form a segment, run by a loop of its own: a chain dispatches on the kind once
per segment rather than once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import ops
from ..core.graph import OTHER, Graph, Node
from . import bounds
from .evaluate import call_method, resolve

#: The fewest nodes worth a chain (a single node gains nothing from one).
SHORTEST = 2

# Step kinds: where a node's call takes its arguments: V a stored value, L the previous node's
# value (a local), S a scalar of the node itself, O anything else of the node's (an index such
# as ``(..., slice(1, None))``, resolved as the executor resolves it); ANY: a pattern of any
# length.
_LS, _L, _SL, _LV, _VL, _LL, _VS, _V, _SV, _VV, _ANY, _LO = range(12)


@dataclass(slots=True)
class Chain:
    """Nodes ``start..stop`` (inclusive) replayed as one unit; see the module docstring.

    Attributes:
        outside: the distinct nodes before ``start`` that the chain reads.
        reads: ``(node, edges)``: how many reads of each outside node the chain makes.
        feeds: ``(node, edges)``: how many reads of each chain node come from later nodes.
        gives: ``(chain node, readers after the chain)``, for chain nodes read later.
        last: per chain node, the chain nodes read for the last time by it (itself included
            when nothing reads it), none of them read after the chain: their values are
            dropped once it has run, as the scheduler drops them.
        steps: per node ``(id, kind, function, a, b, store)`` (resolved on the first run):
            ``a``/``b`` the stored values read, ``store`` whether a later node reads the
            value from the stored ones; for ``_ANY``, ``a`` is the node's whole pattern.
        segments: the steps again, as ``(kind, items)``: a run of steps of one of the kinds
            in :data:`_LOOPED` that store nothing has items ``(id, function)``; any other
            step is a segment of its own, ``(None, step)``.
        scratch: nodes stored only for a later node of the chain: dropped after the run.
        gives_last: whether a node after the chain reads its last node.
    """

    start: int
    stop: int
    outside: tuple[int, ...]
    reads: tuple[tuple[int, int], ...]
    feeds: tuple[tuple[int, int], ...]
    gives: tuple[tuple[int, int], ...]
    last: tuple[tuple[int, ...], ...]
    steps: list | None = field(default=None, repr=False)
    segments: list | None = field(default=None, repr=False)
    scratch: tuple[int, ...] = ()
    gives_last: bool = True

    def ready(self, done: list[bool]) -> bool:
        """Whether every value the chain reads from outside exists, and none of its nodes
        has run yet (one that reads only outside values may have run on its own)."""
        for d in self.outside:
            if not done[d]:
                return False
        return not any(done[self.start : self.stop + 1])

    def run(self, graph: Graph, values: list, kept: set[int] | frozenset[int]) -> None:
        """Compute the chain into ``values``: afterwards they hold the chain nodes read after
        it and those in ``kept``. An error is a :class:`Failed` naming the node that raised."""
        if self.segments is None:  # set last: another thread replaying it sees all or none
            self.steps, self.scratch = _steps(self, graph)
            self.segments = _segments(self.steps)
        start, stop = self.start, self.stop
        for k in kept:
            if start <= k < stop:  # a value inside the chain is saved: keep every value
                return self._run_keeping(graph, values, kept)
        nodes, consts, v, i = graph.nodes, graph.constants, None, start
        try:
            for looped, items in self.segments:
                if looped == _LS:
                    for i, fn in items:
                        v = fn(v, nodes[i].args[1])
                    continue
                if looped == _SL:
                    for i, fn in items:
                        v = fn(nodes[i].args[0], v)
                    continue
                if looped == _L:
                    for i, fn in items:  # noqa: B007 - `i` names the node if one fails
                        v = fn(v)
                    continue
                if looped == _LO:
                    for i, fn in items:
                        v = fn(v, resolve(nodes[i].args[1], values, consts))
                    continue
                i, kind, fn, a, b, store = items
                if kind == _LS:
                    v = fn(v, nodes[i].args[1])
                elif kind == _L:
                    v = fn(v)
                elif kind == _SL:
                    v = fn(nodes[i].args[0], v)
                elif kind == _LO:
                    v = fn(v, resolve(nodes[i].args[1], values, consts))
                elif kind == _LV:
                    v = fn(v, values[b])
                elif kind == _VL:
                    v = fn(values[a], v)
                elif kind == _LL:
                    v = fn(v, v)
                elif kind == _VS:
                    v = fn(values[a], nodes[i].args[1])
                elif kind == _V:
                    v = fn(values[a])
                elif kind == _VV:
                    v = fn(values[a], values[b])
                elif kind == _SV:
                    v = fn(nodes[i].args[0], values[b])
                else:
                    v = _call(fn, a, nodes[i], values, consts)
                if store:
                    values[i] = v
        except Exception as exc:
            raise Failed(i, exc) from exc
        for i in self.scratch:
            values[i] = None
        if self.gives_last is False and stop not in kept:
            values[stop] = None  # nothing reads it and it is not saved: the scheduler drops it

    def _run_keeping(self, graph: Graph, values: list, kept: set[int] | frozenset[int]) -> None:
        """:meth:`run` storing every value, and dropping each after its last reader unless
        ``kept``: what the scheduler does, node by node."""
        nodes, consts, i = graph.nodes, graph.constants, self.start
        try:
            for (i, _, fn, _, _, _), dead in zip(self.steps, self.last):
                node = nodes[i]
                values[i] = _call(fn, node.shape()[4], node, values, consts)
                for x in dead:
                    if x not in kept:
                        values[x] = None
        except Exception as exc:
            raise Failed(i, exc) from exc


def _call(fn: Callable, pattern: tuple, node: Node, values: list, consts: list) -> Any:
    """``fn`` on any node's arguments: values, scalars, and (``OTHER``) anything else,
    resolved as the executor resolves it (slices, containers, constants)."""
    args = [
        y if x is None else values[x] if x >= 0 else resolve(y, values, consts)
        for x, y in zip(pattern, node.args)
    ]
    if node.kwargs:
        return fn(*args, **resolve(node.kwargs, values, consts))
    return fn(*args)


class Failed(Exception):
    """Node ``node`` of a chain raised ``error``."""

    def __init__(self, node: int, error: Exception) -> None:
        super().__init__(node, error)
        self.node, self.error = node, error


def find(
    shapes: list[tuple],
    users: list[list[int]],
    mutating: set[int],
    repeating: set[int],
) -> dict[int, Chain]:
    """The chains of a graph whose nodes have ``shapes`` (:meth:`Node.shape`), by start."""
    chains: dict[int, Chain] = {}
    n, i = len(shapes), 0
    while i < n:
        if not _eligible(shapes[i], i, mutating, repeating):
            i += 1
            continue
        stop = i
        while stop + 1 < n and _eligible(shapes[stop + 1], stop + 1, mutating, repeating):
            stop += 1
        if stop - i + 1 >= SHORTEST:
            chains[i] = _chain(i, stop, shapes, users)
        i = stop + 1
    return chains


def _eligible(shape: tuple, i: int, mutating: set[int], repeating: set[int]) -> bool:
    op, _, _, _, pattern, _ = shape
    return (
        (op == "function" or op == "method")
        and bool(pattern)
        and i not in mutating
        and (i not in repeating)
    )


def _chain(start: int, stop: int, shapes: list[tuple], users: list[list[int]]) -> Chain:
    reads: dict[int, int] = {}
    last_reader: dict[int, int] = {}
    for i in range(start, stop + 1):
        for d in shapes[i][2]:  # distinct: the scheduler counts one read per reader
            if d < start:
                reads[d] = reads.get(d, 0) + 1
            else:
                last_reader[d] = i
    feeds: dict[int, int] = {}
    gives = []
    last: list[list[int]] = [[] for _ in range(start, stop + 1)]
    for i in range(start, stop + 1):
        later = [u for u in users[i] if u > stop]
        if later:
            gives.append((i, len(later)))
            for u in later:
                feeds[u] = feeds.get(u, 0) + 1
        else:
            last[last_reader.get(i, i) - start].append(i)
    return Chain(
        start,
        stop,
        tuple(sorted(reads)),
        tuple(reads.items()),
        tuple(feeds.items()),
        tuple(gives),
        tuple(map(tuple, last)),
        gives_last=any(i == stop for i, _ in gives),
    )


#: Step kind by where each of two arguments comes from (see :func:`_steps`).
_PAIRS = {(True, False): _LS, (False, True): _SL, (True, "V"): _LV, ("V", True): _VL,
          (True, True): _LL, ("V", False): _VS, (False, "V"): _SV, ("V", "V"): _VV}  # fmt: skip
_SINGLES = {(True,): _L, ("V",): _V}


def _steps(chain: Chain, graph: Graph) -> tuple[list[tuple], tuple[int, ...]]:
    """The chain's steps and scratch values (see :class:`Chain`)."""
    start, stop = chain.start, chain.stop
    nodes = graph.nodes[start : stop + 1]
    stored = {i for i, _ in chain.gives} | {stop}
    kinds = []
    for i, node in enumerate(nodes, start):
        _, _, deps, _, pattern, keywords = node.shape()
        top = {p for p in pattern if p is not None and p >= 0}
        stored.update(d for d in deps if d >= start and d not in top)  # read inside arguments
        # an argument is the previous node's value (True), a stored one ("V") or a scalar
        where = tuple(False if p is None else True if p == i - 1 and i > start else "V"
                      for p in pattern)  # fmt: skip
        plain = OTHER not in pattern and not keywords
        kind = (_PAIRS if len(where) == 2 else _SINGLES).get(where, _ANY) if plain else _ANY
        if kind == _ANY and not keywords and len(pattern) == 2 and pattern[1] == OTHER:
            kind = _LO if where[0] is True else _ANY  # h[..., 1:] on the previous value
        if kind == _LO:
            pass  # the previous value, and what the index reads (stored above)
        elif kind == _ANY:
            stored.update(top)
        else:
            stored.update(p for p, w in zip(pattern, where) if w == "V")
        kinds.append(kind)
    steps = []
    for i, node, kind in zip(range(start, stop + 1), nodes, kinds):
        try:
            fn = _function(node)  # allow-listed names only: raises otherwise
        except Exception as exc:
            raise Failed(i, exc) from exc
        pattern = node.shape()[4]
        refs = [p for p in pattern if p is not None]
        if kind == _ANY:
            a, b = pattern, None
        elif kind in (_SV, _SL):
            a, b = None, refs[0]
        else:
            a, b = refs[0], refs[-1]
        steps.append((i, kind, fn, a, b, i in stored))
    given = {i for i, _ in chain.gives}
    scratch = tuple(sorted(d for d in stored if start <= d < stop and d not in given))
    return steps, scratch


#: Step kinds a segment runs in a loop of its own (see :class:`Chain`): those that read only
#: the previous value and the node's own arguments.
_LOOPED = frozenset((_LS, _SL, _L, _LO))


def _segments(steps: list[tuple]) -> list[tuple]:
    """``steps`` as :attr:`Chain.segments`."""
    segments: list[tuple] = []
    for step in steps:
        i, kind, fn, _, _, store = step
        if kind not in _LOOPED or store:
            segments.append((None, step))
        elif segments and segments[-1][0] == kind:
            segments[-1][1].append((i, fn))
        else:
            segments.append((kind, [(i, fn)]))
    return segments


def _function(node: Node) -> Callable:
    """What a step calls: the allow-listed function, or a call of the tensor method."""
    if node.op == "function":
        return ops.runnable_function(node.target)
    named = Node(-1, "method", node.target)
    name = ops.runnable_method(node.target)  # refuses a name outside the allow-list now

    def method(*args: Any, **kwargs: Any) -> Any:
        # what call_method does when no --max-memory holds the run: its checks of sizes
        # (bounds) are then none, and their three frames cost more than most methods
        if type(args[0]) is _TENSOR and _MAX_BYTES.get() is None:
            return getattr(args[0], name)(*args[1:], **kwargs)
        return call_method(named, args, kwargs)

    return method


_TENSOR = torch.Tensor
_MAX_BYTES = bounds.MAX_BYTES
