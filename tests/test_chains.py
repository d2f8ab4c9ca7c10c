"""Tests for lazytensor/runtime/chains.py: runs of plain function nodes replayed as one unit.

Every trace here is compared with the same loop written in a plain PyTorch hook
(:func:`models.hooked`), bitwise: a chain runs the same calls in the same order. Bookkeeping
(which values the executor still holds, which nodes formed a chain) is read off the executor
and its plan.
"""

from __future__ import annotations

import contextlib
import inspect
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lazytensor as lt
from lazytensor.core.graph import Batch, Graph, Ref
from lazytensor.runtime import chains
from lazytensor.runtime.executor import Executor
from lazytensor.runtime.plan import Plan
from models import TinyMLP, hooked


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def inputs(batch: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def net(tiny_mlp: TinyMLP) -> lt.Model:
    return lt.Model(tiny_mlp)


def looped(net: lt.Model, x: torch.Tensor, steps: int, scale: float) -> tuple[torch.Tensor, Graph]:
    with net.trace(x) as tracer:
        h = net.layer1.output
        for _ in range(steps):
            h = h * scale + 0.25
        saved = h.save()
    return saved, tracer.graph


def by_hand(model: TinyMLP, x: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
    kept = []

    def chain(module, args, out):
        h = out
        for _ in range(steps):
            h = h * scale + 0.25
        kept.append(h)

    hooked(model, x, post=[(model.layer1, chain)])
    return kept[0]


def test_a_loop_of_small_ops_is_one_chain_and_equals_the_hook(net: lt.Model) -> None:
    x = inputs()
    for scale in (1.5, 0.5, -2.0):  # one structure: the plan and its chain are reused
        saved, graph = looped(net, x, 50, scale)
        exact(saved, by_hand(net._module, x, 50, scale))
    [(start, chain)] = Plan.of(graph).chains.items()
    assert (start, chain.stop) == (1, 100)
    assert chain.outside == (0,) and chain.gives == ()


def test_every_kind_of_step(net: lt.Model) -> None:
    """Values stored or just computed, scalars in either place, and a longer argument list."""
    x = inputs()
    with net.trace(x) as tracer:
        a = net.layer1.output
        b = a * a
        c = 2.0 - b
        d = torch.relu(c)
        e = torch.clamp(d, -0.5, 0.5)
        f = e + a
        saved = f.save()
    kinds = [step[1] for step in Plan.of(tracer.graph).chains[1].steps]
    assert kinds == [chains._VV, chains._SL, chains._L, chains._ANY, chains._LV]

    def edit(module, args, out):
        kept.append(torch.clamp(torch.relu(2.0 - out * out), -0.5, 0.5) + out)

    kept: list = []
    hooked(net._module, x, post=[(net._module.layer1, edit)])
    exact(saved, kept[0])


def test_kinds_that_read_stored_values(net: lt.Model) -> None:
    x = inputs()
    with net.trace(x) as tracer:
        a = net.layer1.output
        b = a * 0.5  # the first node: reads a stored value and a scalar
        c = torch.relu(b) + a  # relu reads the previous node, + a stored one and it
        d = 3.0 - c
        e = torch.sigmoid(b * d)  # b was stored for this read (scratch)
        saved = e.save()
    steps = Plan.of(tracer.graph).chains[1].steps
    assert [step[1] for step in steps] == [
        chains._VS, chains._L, chains._LV, chains._SL, chains._VL, chains._L
    ]  # fmt: skip
    assert Plan.of(tracer.graph).chains[1].scratch == (1,)
    kept: list = []

    def edit(module, args, out):
        b = out * 0.5
        kept.append(torch.sigmoid(b * (3.0 - (torch.relu(b) + out))))

    hooked(net._module, x, post=[(net._module.layer1, edit)])
    exact(saved, kept[0])


def test_a_value_read_twice_by_a_chain_and_once_after_it(net: lt.Model) -> None:
    """The scheduler counts one read per reader: ``a * a`` must not free ``a`` for ``a + 1``."""
    x = inputs()
    with net.trace(x):
        a = net.layer1.output
        squared = (a * a) * 2.0
        net.layer2.input = squared
        after = (a + 1.0).save()
        out = net.output.save()
    model = net._module
    with torch.no_grad():
        a = model.layer1(x)
    expected = hooked(model, x, pre=[(model.layer2, lambda m, args: ((a * a) * 2.0,))])
    exact(after, a + 1.0)
    exact(out, expected)


def test_a_chain_whose_outside_value_comes_later_runs_node_by_node(net: lt.Model) -> None:
    x = inputs()
    with net.trace(x) as tracer:
        late = net.layer2.output
        early = net.layer1.output
        mixed = (early * 3.0 + late).save()
    assert Plan.of(tracer.graph).chains[2].outside == (0, 1)
    got: dict = {}

    def keep(name):
        def hook(module, args, out):
            got[name] = out

        return hook

    model = net._module
    hooked(model, x, post=[(model.layer1, keep("early")), (model.layer2, keep("late"))])
    exact(mixed, got["early"] * 3.0 + got["late"])


def test_values_inside_a_chain_are_saved_and_values_after_it_are_read(net: lt.Model) -> None:
    x = inputs()
    with net.trace(x):
        h = net.layer2.output
        doubled = (h * 2.0).save()
        shifted = doubled + 1.0
        net.layer3.input = shifted  # read after the chain, by a point write
        out = net.output.save()
    model = net._module
    expected = hooked(model, x, pre=[(model.layer3, lambda m, args: (args[0] * 2.0 + 1.0,))])
    exact(doubled, model.layer2(model.act(model.layer1(x))) * 2.0)
    exact(out, expected)


def test_a_chain_drops_values_as_the_scheduler_does(tiny_mlp: TinyMLP) -> None:
    graph = Graph()
    graph.add("output", "layer1")
    for i in range(1, 7):
        graph.add("function", "operator.add", (Ref(i - 1), 1.0))
    graph.add("function", "operator.mul", (Ref(3), Ref(6)))  # 3 is read after the chain
    graph.saved = [5, 7]
    executor = Executor(tiny_mlp, graph, Batch((inputs(),), {}, 3))
    assert executor.chains[1].stop == 7 and executor.chains[1].gives == ()
    saved = executor.run()
    assert [i for i, v in enumerate(executor.values) if v is not None] == [5, 7]
    with torch.no_grad():
        h = tiny_mlp.layer1(inputs())
    exact(saved[5], h + 1.0 + 1.0 + 1.0 + 1.0 + 1.0)
    exact(saved[7], (h + 1.0 + 1.0 + 1.0) * (h + 1.0 + 1.0 + 1.0 + 1.0 + 1.0 + 1.0))
    graph.saved = [7]  # nothing inside the chain is saved: locals, and 3 stored for node 7
    executor = Executor(tiny_mlp, graph, Batch((inputs(),), {}, 3))
    exact(executor.run()[7], saved[7])
    assert executor.chains[1].scratch == (3,)
    assert [i for i, v in enumerate(executor.values) if v is not None] == [7]


def test_what_breaks_a_chain() -> None:
    """Writes (in place, through a method, ``inplace=True``) and point nodes; not keywords,
    constants, slices or a node that reads nothing of the chain."""
    graph = Graph()
    graph.add("output", "layer1")
    graph.add("function", "operator.mul", (Ref(0), 2.0))  # 1: starts a chain
    graph.add("function", "operator.add", (Ref(1), 1.0))  # 2
    graph.add("function", "operator.setitem", (Ref(2), 0, 5.0))  # 3: writes
    graph.add("function", "operator.add", (Ref(2), 1.0))  # 4: starts one
    graph.add("method", "sum", (Ref(4),), {"dim": 0})  # 5: keywords
    graph.add("function", "operator.add", (Ref(4), graph.constant(torch.ones(16))))  # 6
    graph.add("function", "operator.getitem", (Ref(6), (slice(None), 0)))  # 7
    graph.add("function", "operator.mul", (Ref(0), 3.0))  # 8: reads nothing of 4..7
    graph.add("method", "add_", (Ref(8), 1.0))  # 9: writes
    graph.add("function", "operator.mul", (Ref(0), 3.0))  # 10
    graph.add("function", "torch.relu", (Ref(10),), {"inplace": True})  # 11: writes
    graph.add("function", "operator.mul", (Ref(0), 3.0))  # 12
    graph.add("output", "layer2")  # 13
    graph.add("function", "operator.mul", (Ref(13), 3.0))  # 14
    found = Plan.build(graph).chains
    assert {start: chain.stop for start, chain in found.items()} == {1: 2, 4: 8}


def test_a_chain_node_that_ran_on_its_own_earlier(tiny_mlp: TinyMLP) -> None:
    graph = Graph()
    graph.add("output", "layer1")
    graph.add("output", "layer2")
    graph.add("function", "operator.mul", (Ref(1), 3.0))  # the chain's start: at layer2
    graph.add("function", "operator.mul", (Ref(0), 2.0))  # ready at layer1, so it runs then
    graph.saved = [2, 3]
    executor = Executor(tiny_mlp, graph, Batch((inputs(),), {}, 3))
    assert executor.chains[2].stop == 3
    saved = executor.run()
    with torch.no_grad():
        first = tiny_mlp.layer1(inputs())
        exact(saved[3], first * 2.0)
        exact(saved[2], tiny_mlp.layer2(tiny_mlp.act(first)) * 3.0)


def test_per_head_slices_and_methods_in_a_loop(net: lt.Model) -> None:
    """Slicing, methods with keywords and stacking: steps of any shape, against the hook."""
    x = inputs()
    with net.trace(x) as tracer:
        h = net.layer2.output
        norms = [h[:, 4 * k : 4 * k + 4].norm(dim=-1, keepdim=True) for k in range(4)]
        saved = torch.cat(norms, dim=-1).softmax(dim=-1).save()
    [chain] = Plan.of(tracer.graph).chains.values()
    assert (chain.start, chain.stop) == (1, 10)
    kept: list = []

    def edit(module, args, out):
        parts = [out[:, 4 * k : 4 * k + 4].norm(dim=-1, keepdim=True) for k in range(4)]
        kept.append(torch.cat(parts, dim=-1).softmax(dim=-1))

    hooked(net._module, x, post=[(net._module.layer2, edit)])
    exact(saved, kept[0])


def test_a_loop_of_indexes_runs_as_one_segment_and_reads_indexes_with_refs(net: lt.Model) -> None:
    """Indexing the previous value (``h[..., 1:]``, kind ``_LO``) runs as one looped segment,
    an index holding nodes' values (``h[:, k:end]``) among them; against the hook, bitwise."""
    x = inputs()
    with net.trace(x) as tracer:
        h = net.layer1.output  # (3, 16)
        k = (h[0, 0] > 100).long()  # 0, as a node's value
        end = k + 12
        for _ in range(3):
            h = h[..., 1:]
            h = h[:, None, :]
            h = h[:, 0]
            h = h[:, k:end]
        saved = h.save()
    [chain] = Plan.of(tracer.graph).chains.values()
    looped = [items for kind, items in chain.segments if kind == chains._LO]
    assert [i for i, _ in looped[0]] == list(range(6, 16))  # 16, the saved one: a step alone
    assert tracer.graph.nodes[8].args[1] == (slice(None), slice(Ref(3), Ref(4)))
    kept: list = []

    def edit(module, args, out):
        h = out
        k = (h[0, 0] > 100).long()
        end = k + 12
        for _ in range(3):
            h = h[..., 1:][:, None, :][:, 0][:, k:end]
        kept.append(h)

    hooked(net._module, x, post=[(net._module.layer1, edit)])
    exact(saved, kept[0])


def test_a_failure_inside_a_chain_names_its_line(net: lt.Model) -> None:
    with pytest.raises(RuntimeError) as info:
        with net.trace(inputs()):
            wide = net.layer1.output  # (3, 16)
            narrow = net.layer3.output  # (3, 4): ready after `wide`, so the chain runs whole
            doubled = narrow * 2.0
            line = inspect.currentframe().f_lineno + 1
            (doubled + wide).save()
    message = str(info.value)
    assert f"{pathlib.Path(__file__).name}:{line}" in message and "doubled + wide" in message


def test_a_loop_of_scalar_ops_runs_as_one_segment(net: lt.Model) -> None:
    """The ``h * a + b`` loop is one looped segment; its first step (reading the module's
    stored output) and its last (the saved one) are steps of their own."""
    x = inputs()
    saved, graph = looped(net, x, 20, 1.5)
    exact(saved, by_hand(net._module, x, 20, 1.5))
    [chain] = Plan.of(graph).chains.values()
    first, loop, last = chain.segments
    assert (first[0], first[1][:2]) == (None, (1, chains._VS))
    assert loop[0] == chains._LS and [i for i, _ in loop[1]] == list(range(2, 40))
    assert (last[0], last[1][:2]) == (None, (40, chains._LS))


def test_a_failure_inside_a_looped_segment_names_its_line(net: lt.Model) -> None:
    for numel in (48, 7):  # one structure: the second run fails inside the chain's loop
        with pytest.raises(RuntimeError) if numel == 7 else contextlib.nullcontext() as info:
            with net.trace(inputs()) as tracer:
                h = net.layer1.output * 2.0  # (3, 16)
                h = h + 1.0
                line = inspect.currentframe().f_lineno + 1
                h = h.view(numel)  # (48,): 7 elements cannot view (3, 16)
                h = h - 1.0
                h.save()
        if numel == 48:
            [chain] = Plan.of(tracer.graph).chains.values()
            assert chain.segments[1][0] == chains._LS and [i for i, _ in chain.segments[1][1]] == [
                2,
                3,
            ]
    message = str(info.value)
    assert f"{pathlib.Path(__file__).name}:{line}" in message and "h.view(numel)" in message


@pytest.mark.parametrize("option", ["deadline", "stop_at"])
def test_runs_with_per_node_checks_use_no_chains(tiny_mlp: TinyMLP, option: str) -> None:
    graph = Graph()
    graph.add("output", "layer1")
    graph.add("function", "operator.mul", (Ref(0), 2.0))
    graph.add("function", "operator.add", (Ref(1), 1.0))
    graph.saved = [2]
    kwargs = {"deadline": 1e12} if option == "deadline" else {"stop_at": 2}
    executor = Executor(tiny_mlp, graph, Batch((inputs(),), {}, 3), **kwargs)
    assert executor.chains is None
    with torch.no_grad():
        exact(executor.run()[2], tiny_mlp.layer1(inputs()) * 2.0 + 1.0)


# -- property: a chain does what the scheduler does -------------------------------------------

_OPS = (
    "operator.add",
    "operator.mul",
    "operator.sub",
    "torch.tanh",
    "torch.clamp",
    "sum",
    "getitem",
)


@st.composite
def graphs(draw) -> Graph:
    """Point reads of three moments mixed with small ops on any earlier value, a scalar or a
    constant (functions, a method with keywords, slicing), some written back as a module's
    input; some values saved."""
    graph = Graph()
    for _ in range(draw(st.integers(3, 30))):
        i = len(graph.nodes)
        kind = draw(st.sampled_from(("read", "op", "op", "op", "op", "write")))
        computed = [n.id for n in graph.nodes if n.op in ("function", "method")]
        if kind == "read" or i == 0:
            graph.add("output", draw(st.sampled_from(("layer1", "layer2", "layer3"))))
        elif kind == "write" and computed:
            # layer3's input is (B, 16): write a value computed from layer1 or layer2 only
            wide = [c for c in computed if _width(graph, c) == 16]
            if wide:
                graph.add("set_input", "layer3", (Ref(draw(st.sampled_from(wide))),))
        else:
            target = draw(st.sampled_from(_OPS))
            a = draw(st.integers(0, i - 1))
            if graph.nodes[a].op == "set_input":
                continue
            if target == "torch.tanh":
                graph.add("function", target, (Ref(a),))
            elif target == "torch.clamp":
                graph.add("function", target, (Ref(a), -0.5, 0.5))
            elif target == "sum":
                graph.add("method", "sum", (Ref(a),), {"dim": 1, "keepdim": True})
            elif target == "getitem":
                graph.add("function", "operator.getitem", (Ref(a), (slice(None), slice(0, 4))))
            else:
                other = draw(
                    st.one_of(st.floats(-2, 2, width=32), st.integers(0, i - 1), st.just("c"))
                )
                if other == "c":
                    other = graph.constant(torch.tensor(draw(st.floats(-2, 2, width=32))))
                elif isinstance(other, int):
                    fits = graph.nodes[other].op != "set_input"
                    other = Ref(other if fits and _width(graph, other) == _width(graph, a) else a)
                args = (Ref(a), other) if draw(st.booleans()) else (other, Ref(a))
                graph.add("function", target, args)
    values = [n.id for n in graph.nodes if n.op != "set_input"]
    graph.saved = draw(st.lists(st.sampled_from(values), max_size=4, unique=True))
    return graph


def _width(graph: Graph, i: int) -> int:
    node = graph.nodes[i]
    if node.op == "output":
        return {"layer1": 16, "layer2": 16, "layer3": 4}[node.target]
    if node.op == "method":
        return 1
    if node.target == "operator.getitem":
        return min(4, _width(graph, node.deps()[0]))
    return _width(graph, node.deps()[0])


# A failing example makes Hypothesis import libcst, which warns (see test_properties.py).
@pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict:DeprecationWarning")
@settings(max_examples=60, deadline=None, database=None)
@given(graphs())
def test_chains_replay_exactly_what_the_scheduler_replays(graph: Graph) -> None:
    model, x = TinyMLP(), inputs()
    chained = Executor(model, graph, Batch((x,), {}, 3))
    one_by_one = Executor(model, graph, Batch((x,), {}, 3), deadline=1e12)  # no chains
    assert one_by_one.chains is None
    try:
        expected = one_by_one.run()
    except Exception as error:  # a graph the scheduler refuses, the chain path refuses alike
        with pytest.raises(type(error)):
            chained.run()
        return
    got = chained.run()
    assert got.keys() == expected.keys()
    for i in expected:
        exact(got[i], expected[i])
    held = [i for i, v in enumerate(chained.values) if v is not None]
    assert held == [i for i, v in enumerate(one_by_one.values) if v is not None]
