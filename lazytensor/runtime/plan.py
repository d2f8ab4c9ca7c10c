"""Plan: what a replay needs to know about a graph's shape, computed once per structure.

A :class:`Plan` is the data flow of a graph and where its point nodes wait in the forward pass.
It depends only on the graph's *structure* (what each node is and reads, not its constants or
scalar arguments), so :meth:`Plan.of` keeps plans in a small cache keyed by the nodes'
:meth:`~lazytensor.core.graph.Node.shape`: a trace repeated in a loop, or a server answering the
same experiment for many users, plans it once; and a graph remembers its own plan.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

from ..core import ops
from ..core.graph import EVERY_CALL, Graph, Ref
from . import chains as chains_

PRE, POST, RESULT, TOKENS, GRAD = "pre", "post", "result", "tokens", "grad"
#: The hook kind each point op waits for.
KIND = {"input": PRE, "inputs": PRE, "set_input": PRE, "set_inputs": PRE, "skip": PRE,
        "output": POST, "set_output": POST, "result": RESULT, "tokens": TOKENS,
        "grad": GRAD, "set_grad": GRAD}  # fmt: skip
READS = frozenset(("input", "inputs", "output", "result", "tokens", "grad"))

Key = tuple[str, str]  # (module path, PRE | POST | RESULT | TOKENS), or ("#<node>", GRAD)


def grad_key(node_id: int) -> Key:
    """The moment the gradient of node ``node_id`` reaches it in a backward pass."""
    return (f"#{node_id}", GRAD)


@dataclass(frozen=True, slots=True)
class Plan:
    """The data flow and hook points of a graph (recording order is a topological order).

    Attributes:
        deps: per node, the distinct ids it reads (ascending).
        users: per node, the ids that read it.
        points: per hook point, the point nodes waiting for it, in recording order.
        key_of: the hook point of each point node.
        home: per node, the point read whose memory it aliases (``None``: its own memory), for
            the check that an in-place write happens while its module still runs.
        repeating: nodes that run again at each of several calls (``tracer.all()``, a range).
        held: nodes that run once and are read by repeating ones (a vector read at the
            prompt, added at every generation step): their values stay for the whole run.
        mutating: nodes that write into their first argument.
        modules: module paths called by ``module`` nodes.
        backwards: per ``backward`` node, the nodes whose gradients it reads or replaces.
        weights: ``weight`` nodes (model parameters and buffers: never written).
        roots: the nodes that read nothing and wait for no moment (factories): they run
            before the forward starts.
        counts: per node, ``(len(deps), len(users))``, as two tuples: what a run's counters of
            inputs still missing and of readers still to come start from.
        chains: runs of plain function nodes replayed as one unit, by first node
            (:mod:`.chains`).
        stale_of: :meth:`stale` of each repeating node asked for so far.
    """

    deps: tuple[tuple[int, ...], ...]
    users: tuple[tuple[int, ...], ...]
    points: dict[Key, tuple[int, ...]]
    key_of: dict[int, Key]
    home: tuple[int | None, ...]
    repeating: frozenset[int]
    held: frozenset[int]
    mutating: frozenset[int]
    modules: frozenset[str]
    backwards: dict[int, tuple[int, ...]]
    weights: frozenset[int]
    roots: tuple[int, ...]
    counts: tuple[tuple[int, ...], tuple[int, ...]]
    chains: dict[int, chains_.Chain]
    stale_of: dict[int, tuple[int, ...]]

    #: ``hash(key) -> (key, plan)``, least recently used first (a hash collision replans).
    _cache: ClassVar[OrderedDict[int, tuple[tuple, Plan]]] = OrderedDict()
    CACHE_SIZE: ClassVar[int] = 256

    @classmethod
    def of(cls, graph: Graph) -> Plan:
        """The plan of ``graph``, from the cache when a graph of this structure was planned."""
        planned = graph.planned
        if planned is not None and planned[0] == len(graph.nodes):
            return planned[1]
        key = tuple([node._code or node._shape or node.shape() for node in graph.nodes])
        digest = hash(key)  # once: the cache is keyed by it, and the key compared on a hit
        cache = cls._cache
        known = cache.get(digest)
        if known is not None and known[0] == key:
            plan = known[1]
            cache.move_to_end(digest)
        else:
            plan = cls.build(graph)
            cache[digest] = (key, plan)
            if len(cache) > cls.CACHE_SIZE:
                cache.popitem(last=False)
        graph.planned = (len(graph.nodes), plan)
        return plan

    @classmethod
    def build(cls, graph: Graph) -> Plan:
        """Plan ``graph`` in one pass over its nodes."""
        n = len(graph.nodes)
        deps: list[tuple[int, ...]] = [()] * n
        users: list[list[int]] = [[] for _ in range(n)]
        points: dict[Key, list[int]] = {}
        key_of: dict[int, Key] = {}
        home: list[int | None] = [None] * n
        repeating: set[int] = set()
        mutating: set[int] = set()
        modules: set[str] = set()
        backwards: dict[int, list[int]] = {}
        weights: set[int] = set()
        for node in graph.nodes:
            i, op = node.id, node.op
            deps[i] = node.deps()
            for d in deps[i]:
                users[d].append(i)
            if op in KIND:
                if KIND[op] == GRAD:  # the gradient of args[0] in backward pass ``call``
                    target = node.args[0].id
                    key = key_of[i] = grad_key(target)
                    backwards.setdefault(node.call, []).append(target)
                else:
                    key = key_of[i] = (node.target, KIND[op])
                points.setdefault(key, []).append(i)
                if node.call == EVERY_CALL or type(node.call) is tuple:  # several calls
                    repeating.add(i)
                if op in READS:
                    home[i] = i
                continue
            if op == "module":
                modules.add(node.target)
            elif op == "backward":
                backwards.setdefault(i, [])
            elif op == "weight":
                weights.add(i)
                home[i] = i
                continue
            facts = ops.facts(op, node.target)
            if facts.writes or node.kwargs.get("inplace") is True:  # F.relu(x, inplace=True)
                mutating.add(i)
            if facts.aliases or i in mutating:
                first = node.args[0] if node.args else None
                home[i] = home[first.id] if isinstance(first, Ref) else None
            if repeating and any(d in repeating for d in deps[i]):
                repeating.add(i)
        return cls(
            tuple(deps),
            tuple(tuple(u) for u in users),
            {k: tuple(v) for k, v in points.items()},
            key_of,
            tuple(home),
            frozenset(repeating),
            frozenset(d for r in repeating for d in deps[r] if d not in repeating),
            frozenset(mutating),
            frozenset(modules),
            {b: tuple(dict.fromkeys(t)) for b, t in backwards.items()},
            frozenset(weights),
            tuple(i for i in range(n) if not deps[i] and i not in key_of),
            (tuple(map(len, deps)), tuple(map(len, users))),
            chains_.find([node.shape() for node in graph.nodes], users, mutating, repeating),
            {},
        )

    def stale(self, start: int) -> tuple[int, ...]:
        """Repeating node ``start`` and the repeating nodes computed from it: what runs again
        when ``start`` does (at each generation step), found once per plan: a run asks at
        every step for every repeating point node, and a walk over the graph each time made
        a step cost grow with the graph's size."""
        found = self.stale_of.get(start)
        if found is None:
            reached, todo, repeating, users = {start}, [start], self.repeating, self.users
            while todo:
                for u in users[todo.pop()]:
                    if u in repeating and u not in reached:
                        reached.add(u)
                        todo.append(u)
            found = self.stale_of[start] = tuple(sorted(reached))
        return found
