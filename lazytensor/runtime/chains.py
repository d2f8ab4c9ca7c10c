"""Chains: runs of plain function nodes replayed as one unit, without the per-node scheduler.

Research code records long runs of small ops on a value (``h = h * 1.0001 + 0.0`` in a loop,
per-head arithmetic). The executor's scheduler pays, per node, a heap push and pop and the
bookkeeping of who waits for whom. A :class:`Chain` is a run of consecutive nodes
``start..stop`` that need none of it:

* each is a ``function`` node that writes into nothing, has no keyword arguments and whose
  positional arguments are node values or scalars (its :func:`~lazytensor.core.graph.pattern`
  has no ``OTHER``), and runs once (not at every call);
* each node after ``start`` reads an earlier node of the chain, so none of them can become
  ready before ``start`` runs.

When ``start`` is ready and every value the chain reads from outside is there (:meth:`ready`),
the whole chain runs in recording order, exactly as the scheduler would have run it, and the
scheduler's counters are updated once for the chain (:meth:`Executor._ran_chain`). Otherwise
its nodes run one by one as before. The chain's shape is part of the plan, so it is found
once per graph structure; the functions it calls are resolved on its first run.

A node's value that only the next node reads lives in a local variable, as it would in the
same loop written by hand; the others are stored with the executor's values. Scalar
arguments are read from the running graph's nodes, so one chain serves every graph of its
structure, whatever its constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core import ops
from ..core.graph import OTHER, Graph

#: The fewest nodes worth a chain (a single node gains nothing from one).
SHORTEST = 2

# Step kinds: where a node's call takes its arguments: V a stored value, L the previous node's
# value (a local), S a scalar of the node itself; ANY: a pattern of any length.
_LS, _L, _SL, _LV, _VL, _LL, _VS, _V, _SV, _VV, _ANY = range(11)


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
    scratch: tuple[int, ...] = ()
    gives_last: bool = True

    def ready(self, done: list[bool]) -> bool:
        """Whether every value the chain reads from outside exists."""
        for d in self.outside:
            if not done[d]:
                return False
        return True

    def run(self, graph: Graph, values: list, kept: set[int] | frozenset[int]) -> None:
        """Compute the chain into ``values``: afterwards they hold the chain nodes read after
        it and those in ``kept``. An error is a :class:`Failed` naming the node that raised."""
        if self.steps is None:
            self.steps, self.scratch = _steps(self, graph)
        start, stop = self.start, self.stop
        for k in kept:
            if start <= k < stop:  # a value inside the chain is saved: keep every value
                return self._run_keeping(graph, values, kept)
        nodes, v, i = graph.nodes, None, start
        try:
            for i, kind, fn, a, b, store in self.steps:
                if kind == _LS:
                    v = fn(v, nodes[i].args[1])
                elif kind == _L:
                    v = fn(v)
                elif kind == _SL:
                    v = fn(nodes[i].args[0], v)
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
                    v = fn(*[values[x] if x is not None else y
                             for x, y in zip(a, nodes[i].args)])  # fmt: skip
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
        nodes, i = graph.nodes, self.start
        try:
            for i, pattern, fn, dead in zip(
                range(self.start, self.stop + 1),
                (node.shape()[4] for node in nodes[self.start : self.stop + 1]),
                (step[2] for step in self.steps),
                self.last,
            ):
                values[i] = fn(*[values[x] if x is not None else y
                                 for x, y in zip(pattern, nodes[i].args)])  # fmt: skip
                for x in dead:
                    if x not in kept:
                        values[x] = None
        except Exception as exc:
            raise Failed(i, exc) from exc


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
        while (
            stop + 1 < n
            and _eligible(shapes[stop + 1], stop + 1, mutating, repeating)
            and any(d >= i for d in shapes[stop + 1][2])
        ):
            stop += 1
        if stop - i + 1 >= SHORTEST:
            chains[i] = _chain(i, stop, shapes, users)
        i = stop + 1
    return chains


def _eligible(shape: tuple, i: int, mutating: set[int], repeating: set[int]) -> bool:
    op, _, deps, _, pattern, kw = shape
    return (
        op == "function"
        and not kw
        and i not in mutating
        and i not in repeating
        and OTHER not in pattern
        and len(pattern) > 0
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
    patterns = [graph.nodes[i].shape()[4] for i in range(start, stop + 1)]
    stored = {i for i, _ in chain.gives} | {stop}
    kinds = []
    for i, pattern in zip(range(start, stop + 1), patterns):
        # an argument is the previous node's value (True), a stored one ("V") or a scalar
        where = tuple(
            False if p is None else True if p == i - 1 and i > start else "V" for p in pattern
        )
        kind = (_PAIRS if len(where) == 2 else _SINGLES).get(where, _ANY)
        if kind == _ANY:
            stored.update(p for p in pattern if p is not None and p >= start)
        else:
            stored.update(p for p, w in zip(pattern, where) if w == "V" and p >= start)
        kinds.append(kind)
    steps = []
    for i, pattern, kind in zip(range(start, stop + 1), patterns, kinds):
        try:
            fn = ops.runnable_function(graph.nodes[i].target)  # allow-listed names only
        except Exception as exc:
            raise Failed(i, exc) from exc
        refs = [p for p in pattern if p is not None]
        if kind == _ANY:
            a, b = pattern, None
        elif kind in (_SV, _SL):
            a, b = None, refs[0]
        else:
            a, b = refs[0], refs[-1]
        steps.append((i, kind, fn, a, b, i in stored))
    scratch = tuple(sorted(stored - {i for i, _ in chain.gives} - {stop}))
    return steps, scratch
