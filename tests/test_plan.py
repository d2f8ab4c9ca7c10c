"""Tests for lazytensor/runtime/plan.py: a graph's data flow and hook points, planned once.

Plans are built from hand-written graphs and checked field by field; the cache is checked by
identity (the same ``Plan`` object for graphs of one structure).
"""

from __future__ import annotations

import pytest
import torch

from lazytensor.core.graph import EVERY_CALL, Const, Graph, Ref
from lazytensor.runtime.plan import POST, PRE, RESULT, Plan


def probe_graph(scale: torch.Tensor, call: int = 0) -> Graph:
    """Read layer1, scale it by a constant, write it into layer2's input."""
    graph = Graph()
    h = graph.add("output", "layer1", call=call)
    scaled = graph.add("function", "torch.mul", (Ref(h.id), graph.constant(scale)))
    graph.add("set_input", "layer2", (Ref(scaled.id),), call=call)
    graph.save(scaled.id)
    return graph


@pytest.fixture
def small_cache(monkeypatch: pytest.MonkeyPatch):
    """An empty plan cache of two entries, restored afterwards."""
    monkeypatch.setattr(Plan, "_cache", type(Plan._cache)())
    monkeypatch.setattr(Plan, "CACHE_SIZE", 2)
    return Plan._cache


# -- the cache --------------------------------------------------------------------------------


def test_graphs_differing_only_in_constant_values_share_one_plan(small_cache) -> None:
    first = Plan.of(probe_graph(torch.ones(16)))
    second = Plan.of(probe_graph(torch.full((16,), 7.0)))
    assert first is second
    assert len(small_cache) == 1


@pytest.mark.parametrize(
    "other",
    [
        lambda: probe_graph(torch.ones(16), call=1),
        lambda: probe_graph(torch.ones(16), call=EVERY_CALL),
        lambda: Graph(probe_graph(torch.ones(16)).nodes[:2]),
    ],
    ids=["call", "every-call", "fewer-nodes"],
)
def test_a_different_structure_gets_its_own_plan(small_cache, other) -> None:
    plan = Plan.of(probe_graph(torch.ones(16)))
    assert Plan.of(other()) is not plan
    assert Plan.of(probe_graph(torch.zeros(16))) is plan


def test_scalar_arguments_do_not_change_the_plan(small_cache) -> None:
    # A plan is data flow and hook points: `x * 2` and `x * 3.0` replay alike.
    def graph(v):
        g = Graph()
        g.add("function", "torch.mul", (Ref(g.add("output", "layer1").id), v))
        return g

    plans = {id(Plan.of(graph(v))) for v in (2, 2.0, True, 3)}
    assert len(plans) == 1
    g = graph(2)
    g.add("function", "torch.add", (Ref(1), 1))  # recording goes on: the graph is planned anew
    assert Plan.of(g) is not Plan.of(graph(2))


def test_the_cache_keeps_the_most_recently_used_plans(small_cache) -> None:
    def fresh(call: int) -> Graph:  # a new graph each time: a graph also remembers its plan
        return probe_graph(torch.ones(1), call=call)

    p0, p1 = Plan.of(fresh(0)), Plan.of(fresh(1))
    assert Plan.of(fresh(0)) is p0  # a hit: structure 0 is now the most recently used
    p2 = Plan.of(fresh(2))  # evicts structure 1, the least recently used
    assert len(small_cache) == 2
    assert Plan.of(fresh(0)) is p0 and Plan.of(fresh(2)) is p2
    assert Plan.of(fresh(1)) is not p1  # planned again, evicting structure 0
    assert Plan.of(fresh(0)) is not p0


def test_a_graph_remembers_its_plan_until_it_grows(small_cache) -> None:
    graph = probe_graph(torch.ones(1))
    plan = Plan.of(graph)
    small_cache.clear()
    assert Plan.of(graph) is plan
    graph.add("output", "layer3")
    assert Plan.of(graph) is not plan


# -- what a plan holds -------------------------------------------------------------------------


def test_deps_users_points_and_modules() -> None:
    graph = Graph()
    a = graph.add("output", "layer1")  # 0
    b = graph.add("input", "layer2")  # 1
    c = graph.add("function", "torch.add", (Ref(b.id), Ref(a.id), Ref(b.id)))  # 2
    d = graph.add("module", "layer3", (Ref(c.id),), {"scale": Ref(a.id)})  # 3
    e = graph.add("set_output", "layer2", (Ref(d.id),))  # 4
    f = graph.add("output", "layer1", call=1)  # 5
    r = graph.add("result", "")  # 6
    plan = Plan.build(graph)

    assert plan.deps == ((), (), (0, 1), (0, 2), (3,), (), ())  # distinct, ascending
    assert plan.users == ((c.id, d.id), (c.id,), (d.id,), (e.id,), (), (), ())
    assert plan.points == {
        ("layer1", POST): (a.id, f.id),
        ("layer2", PRE): (b.id,),
        ("layer2", POST): (e.id,),
        ("", RESULT): (r.id,),
    }
    assert plan.key_of == {
        a.id: ("layer1", POST),
        b.id: ("layer2", PRE),
        e.id: ("layer2", POST),
        f.id: ("layer1", POST),
        r.id: ("", RESULT),
    }
    assert plan.modules == {"layer3"}
    assert plan.repeating == frozenset() and plan.mutating == frozenset()
    assert plan.counts == ((0, 0, 2, 2, 1, 0, 0), (2, 1, 1, 1, 0, 0, 0))


def test_roots_are_the_nodes_that_wait_for_nothing() -> None:
    graph = Graph()
    zeros = graph.add("function", "torch.zeros", (3,))  # 0: a factory
    h = graph.add("output", "layer1")  # 1: waits for its moment
    graph.add("function", "torch.add", (Ref(h.id), Ref(zeros.id)))  # 2
    ones = graph.add("function", "torch.ones", (3,))  # 3
    assert Plan.build(graph).roots == (zeros.id, ones.id)


@pytest.mark.parametrize("op", ["input", "inputs", "set_input", "set_inputs"])
def test_inputs_wait_for_pre_hooks_and_outputs_for_post_hooks(op: str) -> None:
    graph = Graph()
    graph.add("output", "m")
    node = graph.add(op, "m", (Ref(0),) if op.startswith("set") else ())
    assert Plan.build(graph).key_of[node.id] == ("m", PRE)


def test_home_follows_views_back_to_the_point_read() -> None:
    graph = Graph()
    read = graph.add("output", "layer1")
    t1 = graph.add("method", "transpose", (Ref(read.id), 0, 1))
    t2 = graph.add("function", "torch.transpose", (Ref(t1.id), 0, 1))
    item = graph.add("function", "operator.getitem", (Ref(t2.id), 0))
    attr = graph.add("getattr", "T", (Ref(read.id),))
    copy = graph.add("method", "clone", (Ref(read.id),))
    copy_view = graph.add("getattr", "T", (Ref(copy.id),))
    summed = graph.add("function", "operator.add", (Ref(read.id), 1))
    factory = graph.add("function", "torch.zeros", (3,))
    view_of_const = graph.add("method", "view", (Const(0), -1))
    write = graph.add("set_output", "layer1", (Ref(item.id),))
    inputs = graph.add("inputs", "layer2")
    plan = Plan.build(graph)

    for node in (read, t1, t2, item, attr):
        assert plan.home[node.id] == read.id, node
    for node in (copy, copy_view, summed, factory, view_of_const, write):
        assert plan.home[node.id] is None, node
    assert plan.home[inputs.id] == inputs.id


def test_mutating_nodes_write_into_their_first_argument() -> None:
    graph = Graph()
    read = graph.add("output", "layer1")
    setitem = graph.add("function", "operator.setitem", (Ref(read.id), 0, 1.0))
    add_ = graph.add("method", "add_", (Ref(read.id), 1.0))
    and_ = graph.add("function", "operator.and_", (Ref(read.id), Ref(read.id)))
    add = graph.add("method", "add", (Ref(read.id), 1.0))
    transpose = graph.add("function", "torch.transpose", (Ref(read.id), 0, 1))
    plan = Plan.build(graph)

    assert plan.mutating == {setitem.id, add_.id}
    assert and_.id not in plan.mutating  # its name ends in "_", yet it writes nothing
    assert plan.home[add_.id] == read.id  # x.add_(1) returns x itself
    assert plan.home[and_.id] is None and plan.home[add.id] is None
    assert plan.home[transpose.id] == read.id and transpose.id not in plan.mutating


def test_repeating_spreads_to_what_is_computed_from_every_call_reads() -> None:
    graph = Graph()
    once = graph.add("output", "block")
    every = graph.add("output", "block", call=EVERY_CALL)
    derived = graph.add("function", "torch.relu", (Ref(every.id),))
    mixed = graph.add("function", "torch.add", (Ref(derived.id), Ref(once.id)))
    fixed = graph.add("function", "torch.relu", (Ref(once.id),))
    write = graph.add("set_output", "block", (Ref(mixed.id),), call=EVERY_CALL)
    write_once = graph.add("set_output", "block", (Ref(mixed.id),), call=2)
    plan = Plan.build(graph)

    assert plan.repeating == {every.id, derived.id, mixed.id, write.id}
    assert fixed.id not in plan.repeating and write_once.id not in plan.repeating

    # What runs again when a repeating node does: itself and the repeating nodes computed from
    # it, ascending, the same tuple on every ask (a run asks at every generation step).
    assert plan.stale(every.id) == (every.id, derived.id, mixed.id, write.id)
    assert plan.stale(mixed.id) == (mixed.id, write.id)
    assert plan.stale(write.id) == (write.id,)
    assert plan.stale(every.id) is plan.stale(every.id)


def test_a_plan_is_immutable() -> None:
    plan = Plan.build(probe_graph(torch.ones(1)))
    with pytest.raises(AttributeError):
        plan.deps = ()  # type: ignore[misc]
    assert isinstance(plan.deps, tuple) and isinstance(plan.users, tuple)
    assert isinstance(plan.repeating, frozenset) and isinstance(plan.mutating, frozenset)
