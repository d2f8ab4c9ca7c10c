"""Tests for lazytensor/graph.py: the node, the graph, its structure key, and the op vocabulary.

A graph is plain data: built here by hand, without the recorder, it still replays on a real
module exactly like the same intervention written as a hook.
"""

from __future__ import annotations

import dataclasses

import torch

import lazytensor as lt
from lazytensor.core import graph as g
from lazytensor.core.graph import Batch
from lazytensor.core.site import Site
from lazytensor.runtime.executor import Executor
from models import TinyMLP, hooked


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def inputs(batch: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def test_every_op_is_an_executor_method() -> None:
    every = g.POINT_READS + g.POINT_WRITES + g.COMPUTE + g.TRUSTED + g.GRADIENTS + g.STATE
    assert g.OPS == frozenset(every + g.CONTROL)
    for op in g.OPS:
        assert callable(getattr(Executor, op, None)), op


def test_add_numbers_nodes_and_keeps_sites() -> None:
    graph = g.Graph()
    site = Site("experiment.py", 14)
    read = graph.add("output", "layer1", site=site, call=2, rows=(0, 3))
    doubled = graph.add("function", "torch.mul", (g.Ref(read.id), 2))
    assert (read.id, doubled.id) == (0, 1)
    assert graph.nodes == [read, doubled]
    assert graph.sites == [site, None]
    assert (read.call, read.rows, read.kwargs) == (2, (0, 3), {})
    assert read.is_point and not doubled.is_point
    assert all(graph.add(op, "x").is_point for op in g.POINT_READS + g.POINT_WRITES)
    assert not any(graph.add(op, "x").is_point for op in g.COMPUTE)


def test_add_call_makes_the_node_add_makes() -> None:
    site = Site("experiment.py", 3)
    fast, slow = g.Graph(), g.Graph()
    for graph in (fast, slow):
        graph.add("output", "layer1")
        graph.add("output", "layer2")
    for args, reads in [((g.Ref(1), g.Ref(0)), (1, 0)), ((2.0, g.Ref(1)), (None, 1)),
                        ((g.Ref(0), 2), (0, None)), ((g.Ref(4), g.Ref(4)), (4, 4))]:  # fmt: skip
        i = fast.add_call("operator.mul", args, *reads, site)
        assert slow.add("function", "operator.mul", args, site=site).id == i
    for got, want in zip(fast.nodes, slow.nodes, strict=True):
        assert got == want and got.deps() == want.deps() and got.shape() == want.shape()
    assert fast.sites == slow.sites and fast.structure_key() == slow.structure_key()


def test_add_and_add_call_set_every_field_the_constructor_sets() -> None:
    graph = g.Graph()
    made = graph.add("output", "layer1", (g.Ref(0), 2), {"k": 1}, call=(0, None, 1), rows=(0, 3))
    want = g.Node(0, "output", "layer1", (g.Ref(0), 2), {"k": 1}, (0, None, 1), (0, 3))
    called = graph.nodes[graph.add_call("operator.mul", (g.Ref(0), 2.0), 0, None, None)]
    want_called = g.Node(1, "function", "operator.mul", (g.Ref(0), 2.0))
    for field in dataclasses.fields(g.Node):  # a field added to Node must be set by both
        assert getattr(made, field.name) == getattr(want, field.name), field.name
        if field.name not in ("_deps", "_shape", "_code"):  # worked out from add_call's code
            assert getattr(called, field.name) == getattr(want_called, field.name), field.name
    assert (repr(made), repr(called)) == (repr(want), repr(want_called))
    assert (called.deps(), called.shape()) == (want_called.deps(), want_called.shape())


def test_shapes_tell_apart_what_replays_differently() -> None:
    """``h * h`` and ``h * 2.0`` read the same nodes, yet their generated replay differs."""
    graph = g.Graph()
    graph.add("output", "layer1")
    square = graph.add("function", "operator.mul", (g.Ref(0), g.Ref(0)))
    scaled = graph.add("function", "operator.mul", (g.Ref(0), 2.0))
    other = graph.add("function", "operator.mul", (g.Ref(0), g.Const(0)))
    keyed = graph.add("function", "torch.sum", (g.Ref(0),), {"dim": 1})
    assert square.deps() == scaled.deps() == other.deps()
    assert len({square.shape(), scaled.shape(), other.shape()}) == 3
    assert [n.shape()[4] for n in (square, scaled, other)] == [(0, 0), (0, None), (0, g.OTHER)]
    assert keyed.shape()[5] == (("dim",), False)


def test_refs_in_argument_order_through_containers() -> None:
    node = g.Node(
        9,
        "function",
        "operator.setitem",
        (g.Ref(4), (slice(None, g.Ref(1)), [g.Ref(7), 3]), {"a": g.Ref(2)}, g.Const(0)),
        {"out": g.Ref(5), "n": (g.Ref(4),)},
    )
    assert node.refs() == [4, 1, 7, 2, 5, 4]
    assert g.Node(0, "output", "layer1").refs() == []


def test_constants_are_stored_once_by_identity() -> None:
    graph = g.Graph()
    a, b = torch.ones(2), torch.ones(2)
    assert graph.constant(a) == g.Const(0)
    assert graph.constant(b) == g.Const(1)  # equal values, different tensor
    assert graph.constant(a) == g.Const(0)
    assert graph.constants[0] is a and graph.constants[1] is b


def test_save_keeps_order_without_duplicates() -> None:
    graph = g.Graph()
    for i in (3, 1, 3, 2, 1):
        graph.save(i)
    assert graph.saved == [3, 1, 2]


def test_prefix_keeps_the_nodes_up_to_stop_and_saves_only_it() -> None:
    graph = g.Graph()
    for i in range(5):
        graph.add("output", f"m{i}", site=Site("f.py", i))
    const = graph.constant(torch.zeros(1))
    graph.save(4)
    part = graph.prefix(2)
    assert [n.target for n in part.nodes] == ["m0", "m1", "m2"]
    assert part.saved == [2]
    assert [s.line for s in part.sites] == [0, 1, 2]
    assert part.constants is graph.constants and const == g.Const(0)
    assert graph.saved == [4] and len(graph.nodes) == 5  # the original is untouched


def _record(net: lt.Model, x: torch.Tensor, patch: torch.Tensor, index) -> g.Graph:
    with net.trace(x) as tracer:
        hidden = net.layer1.output
        net.layer2.input[:, index] = patch
        (hidden * 2).save()
    return tracer.graph


def test_structure_key_ignores_values_and_sees_structure(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    key = _record(net, inputs(2), torch.zeros(2), 0).structure_key()
    hash(key)
    # other inputs, other constant values: the same structure
    assert _record(net, inputs(2, seed=9), torch.ones(2), 0).structure_key() == key
    # another index, another constant shape or dtype: another structure
    assert _record(net, inputs(2), torch.zeros(2), 1).structure_key() != key
    assert _record(net, inputs(2), torch.zeros(1), 0).structure_key() != key
    assert _record(net, inputs(2), torch.zeros(2, dtype=torch.float64), 0).structure_key() != key


def test_structure_key_sees_every_field() -> None:
    def graph(**change) -> g.Graph:
        fields = {"op": "output", "target": "layer1", "call": 0, "rows": None, "arg": 1}
        fields.update(change)
        built = g.Graph()
        read = built.add(fields["op"], fields["target"], call=fields["call"], rows=fields["rows"])
        built.add("function", "operator.getitem", (g.Ref(read.id), fields["arg"]))
        built.save(1)
        return built

    key = graph().structure_key()
    assert graph().structure_key() == key
    for change in (
        {"op": "input"},
        {"target": "layer2"},
        {"call": 1},
        {"rows": (0, 2)},
        {"arg": 2},
        {"arg": (1,)},
        {"arg": [1]},
        {"arg": slice(1)},
        {"arg": True},  # x[True] adds a dimension; x[1] selects a row
        {"arg": 1.0},
        {"arg": "1"},
        {"arg": None},
        {"arg": {"a": 1}},
        {"arg": [(1, 2), slice(None, 2)]},
    ):
        assert graph(**change).structure_key() != key, change
    nested = graph(arg=[(1, 2), slice(None, 2)]).structure_key()
    assert graph(arg=[(1, 2), slice(None, 3)]).structure_key() != nested
    assert graph(arg=[(1, 2.0), slice(None, 2)]).structure_key() != nested
    assert graph(arg={"b": 1}).structure_key() != graph(arg={"a": 1}).structure_key()
    saved_twice = graph()
    saved_twice.save(0)
    assert saved_twice.structure_key() != key


def test_a_hand_built_graph_replays_like_a_hook(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    graph = g.Graph()
    read = graph.add("output", "layer1")
    scaled = graph.add(
        "function", "operator.mul", (g.Ref(read.id), graph.constant(torch.ones(16) * 3))
    )
    graph.add("set_output", "layer1", (g.Ref(scaled.id),))
    first = graph.add("input", "layer3")
    graph.add("method", "mul_", (g.Ref(first.id), -1.0))
    result = graph.add("result", "")
    graph.save(read.id)
    graph.save(result.id)
    values = Executor(tiny_mlp, graph, Batch((x,), {}, 3)).run()
    seen = {}

    def triple(module, args, out):
        seen.update(h=out)
        return out * (torch.ones(16) * 3)

    def negate(module, args):
        args[0].mul_(-1.0)

    expected = hooked(
        tiny_mlp, x, pre=[(tiny_mlp.layer3, negate)], post=[(tiny_mlp.layer1, triple)]
    )
    assert set(values) == {read.id, result.id}
    exact(values[read.id], seen["h"])
    exact(values[result.id], expected)
    for sub in tiny_mlp.modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks


def test_shared_refs_are_the_refs_they_name() -> None:
    """Recording shares one immutable ``Ref`` per id; threads growing the table keep it exact."""
    import random
    import threading

    ids = [random.Random(seed).randrange(5000) for seed in range(400)]
    threads = [
        threading.Thread(target=lambda part=ids[k::8]: [g.ref(i) for i in part]) for k in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(shared == g.Ref(i) for i, shared in enumerate(g.REFS))
    assert g.ref(7) is g.ref(7) and g.ref(g.SHARED_REFS + 3) == g.Ref(g.SHARED_REFS + 3)
