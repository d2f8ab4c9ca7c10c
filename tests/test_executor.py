"""Tests for lazytensor/runtime/executor.py: replaying hand-built graphs inside a forward pass.

Graphs are built node by node (no recorder), so each test states exactly what the executor is
given. Results are compared with the same intervention written as plain PyTorch hooks
(:func:`models.hooked`); bookkeeping (freed values, hooks, errors) is read off the executor.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from lazytensor.core.errors import GraphError, NodeFailure
from lazytensor.core.graph import EVERY_CALL, Batch, Graph, Ref
from lazytensor.runtime.executor import Executor
from models import TinyMLP, hooked


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def inputs(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, graph: Graph, x: torch.Tensor, **options) -> dict:
    return Executor(model, graph, Batch((x,), {}, len(x)), **options).run()


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


class Loop(nn.Module):
    """Calls ``block`` three times (shared weights), ``(B, 8) -> (B, 8)``; ``spare`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.block = nn.Linear(8, 8)
            self.spare = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.tanh(self.block(x))
        return x


# -- point reads and writes at their moment -------------------------------------------------------


def test_reads_see_each_moment_of_the_forward(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    graph = Graph()
    reads = {
        "l1_out": graph.add("output", "layer1"),
        "act_in": graph.add("input", "act"),
        "l2_inputs": graph.add("inputs", "layer2"),
        "out": graph.add("output", ""),
        "result": graph.add("result", ""),
    }
    for node in reads.values():
        graph.save(node.id)
    got = run(tiny_mlp, graph, x)

    seen = {}
    expected = hooked(
        tiny_mlp,
        x,
        pre_kwargs=[(tiny_mlp.layer2, lambda m, a, k: seen.update(l2_inputs=(a, k)))],
        post=[
            (tiny_mlp.layer1, lambda m, a, o: seen.update(l1_out=o)),
            (tiny_mlp.act, lambda m, a, o: seen.update(act_in=a[0])),
        ],
    )
    exact(got[reads["l1_out"].id], seen["l1_out"])
    exact(got[reads["act_in"].id], seen["act_in"])
    (arg,), kwargs = got[reads["l2_inputs"].id]
    exact(arg, seen["l2_inputs"][0][0])
    assert kwargs == seen["l2_inputs"][1] == {}
    exact(got[reads["out"].id], expected)
    exact(got[reads["result"].id], expected)


def test_writes_land_where_a_hook_would_put_them(tiny_mlp: TinyMLP) -> None:
    x = inputs(4)
    graph = Graph()
    h = graph.add("output", "layer1")
    doubled = graph.add("function", "operator.mul", (Ref(h.id), 2.0))
    graph.add("set_output", "layer1", (Ref(doubled.id),))
    l3_in = graph.add("input", "layer3")
    graph.add("function", "operator.setitem", (Ref(l3_in.id), (slice(None), 0), -1.0))
    y = graph.add("output", "")
    graph.save(y.id)
    got = run(tiny_mlp, graph, x)

    def edit(module, args):
        args[0][:, 0] = -1.0

    expected = hooked(
        tiny_mlp,
        x,
        pre=[(tiny_mlp.layer3, edit)],
        post=[(tiny_mlp.layer1, lambda m, a, o: o * 2.0)],
    )
    exact(got[y.id], expected)
    assert not torch.equal(expected, hooked(tiny_mlp, x))  # the writes changed something


def test_set_input_and_set_inputs_replace_the_arguments(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    graph = Graph()
    a = graph.add("input", "layer2")
    graph.add("set_input", "layer2", (Ref(graph.add("function", "torch.relu", (Ref(a.id),)).id),))
    b = graph.add("inputs", "layer3")
    first = graph.add("function", "operator.getitem", (Ref(b.id), 0))
    arg = graph.add("function", "operator.getitem", (Ref(first.id), 0))
    neg = graph.add("function", "operator.neg", (Ref(arg.id),))
    graph.add("set_inputs", "layer3", (((Ref(neg.id),), {}),))
    y = graph.add("output", "")
    graph.save(y.id)
    got = run(tiny_mlp, graph, x)
    expected = hooked(
        tiny_mlp,
        x,
        pre=[
            (tiny_mlp.layer2, lambda m, args: (torch.relu(args[0]),)),
            (tiny_mlp.layer3, lambda m, args: (-args[0],)),
        ],
    )
    exact(got[y.id], expected)


def test_a_module_node_calls_the_module_without_firing_its_hooks(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    graph = Graph()
    h = graph.add("output", "layer2")
    again = graph.add("module", "layer3", (Ref(h.id),))
    out3 = graph.add("output", "layer3")  # the model's own call: call 0, not the extra one
    for node in (again, out3):
        graph.save(node.id)
    got = run(tiny_mlp, graph, x)
    with torch.no_grad():
        expected = tiny_mlp.layer3(tiny_mlp.layer2(tiny_mlp.act(tiny_mlp.layer1(x))))
    exact(got[again.id], expected)
    exact(got[out3.id], expected)


# -- memory: values are dropped once no later node needs them ---------------------------------


def test_values_are_freed_once_used_but_saved_ones_are_kept(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    graph = Graph()
    h = graph.add("output", "layer1")  # used by `doubled` only
    kept = graph.add("output", "act")  # saved and used
    doubled = graph.add("function", "operator.mul", (Ref(h.id), 2.0))
    total = graph.add("function", "torch.add", (Ref(doubled.id), Ref(kept.id)))
    late = graph.add("output", "layer3")
    freed: list[list[bool]] = []  # which values are gone when layer3 has run

    def snapshot(t: torch.Tensor) -> None:
        freed.append([v is None for v in executor.values])

    graph.add("python", "snapshot", (snapshot, Ref(late.id)))
    graph.add("set_output", "layer3", (Ref(late.id),))
    graph.save(kept.id)
    graph.save(total.id)
    executor = Executor(tiny_mlp, graph, Batch((x,), {}, 3))
    got = executor.run()

    assert freed[0][: late.id + 1] == [True, False, True, False, False]
    assert executor.values[h.id] is None and executor.values[doubled.id] is None
    assert executor.values[late.id] is None  # the set_output was its only user
    exact(executor.values[kept.id], got[kept.id])
    with torch.no_grad():
        layer1 = tiny_mlp.layer1(x)
    exact(got[total.id], layer1 * 2.0 + torch.relu(layer1))
    assert set(got) == {kept.id, total.id}


def test_a_point_read_is_freed_before_the_forward_ends(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    graph = Graph()
    h = graph.add("output", "layer1")
    graph.add("set_output", "layer1", (Ref(graph.add("function", "torch.relu", (Ref(h.id),)).id),))
    graph.add("output", "layer3")  # a later read: the forward goes on to layer3
    executor = Executor(tiny_mlp, graph, Batch((x,), {}, 3))
    during = []
    handle = tiny_mlp.layer3.register_forward_pre_hook(
        lambda m, a: during.append(list(executor.values))
    )
    try:
        executor.run()
    finally:
        handle.remove()
    assert during == [[None, None, None, None]]  # nothing held while later layers run


# -- stop_at -------------------------------------------------------------------------------------


def test_stop_at_ends_the_forward_once_the_value_exists(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    graph = Graph()
    h = graph.add("output", "layer1")
    total = graph.add("function", "torch.sum", (Ref(h.id),))
    later = graph.add("output", "layer3")
    graph.save(later.id)
    calls = []
    handle = tiny_mlp.layer2.register_forward_pre_hook(lambda m, a: calls.append(m))
    try:
        got = run(tiny_mlp, graph, x, stop_at=total.id)
    finally:
        handle.remove()
    assert calls == []  # layer2 never ran
    assert list(got) == [total.id]
    with torch.no_grad():
        exact(got[total.id], tiny_mlp.layer1(x).sum())


def test_stop_at_a_value_that_later_nodes_use_keeps_it(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    graph = Graph()
    h = graph.add("output", "layer1")
    graph.add("function", "operator.mul", (Ref(h.id), 3.0))  # a user of h
    got = run(tiny_mlp, graph, x, stop_at=h.id)
    with torch.no_grad():
        exact(got[h.id], tiny_mlp.layer1(x))


# -- errors --------------------------------------------------------------------------------------


def test_a_write_that_needs_a_later_value_is_a_graph_error(tiny_mlp: TinyMLP) -> None:
    graph = Graph()
    later = graph.add("output", "layer2")
    write = graph.add("set_output", "layer1", (Ref(later.id),))
    with pytest.raises(NodeFailure) as caught:
        run(tiny_mlp, graph, inputs(2))
    assert caught.value.node == write.id
    assert isinstance(caught.value.error, GraphError)
    assert "computed later" in str(caught.value.error)
    assert "layer1.output" in str(caught.value.error)
    assert caught.value.hint  # says what to do


def test_an_in_place_write_after_its_module_ran_is_a_graph_error(tiny_mlp: TinyMLP) -> None:
    graph = Graph()
    early = graph.add("output", "layer1")
    later = graph.add("output", "layer2")
    write = graph.add("function", "operator.setitem", (Ref(early.id), 0, Ref(later.id)))
    with pytest.raises(NodeFailure) as caught:
        run(tiny_mlp, graph, inputs(2))
    assert caught.value.node == write.id
    assert isinstance(caught.value.error, GraphError)
    assert "layer1.output" in str(caught.value.error) and "already used" in str(caught.value.error)


def test_a_module_that_is_never_called() -> None:
    graph = Graph()
    graph.add("output", "block")
    spare = graph.add("output", "spare")
    with pytest.raises(NodeFailure) as caught:
        run(Loop().eval(), graph, inputs(2))
    assert caught.value.node == spare.id
    assert isinstance(caught.value.error, GraphError)
    assert "never called" in str(caught.value.error) and "spare.output" in str(caught.value.error)


def test_a_call_that_never_happens_names_how_often_the_module_ran() -> None:
    graph = Graph()
    fourth = graph.add("output", "block", call=3)
    with pytest.raises(NodeFailure) as caught:
        run(Loop().eval(), graph, inputs(2))
    assert caught.value.node == fourth.id
    assert "call 3" in str(caught.value.error) and "ran 3 time(s)" in str(caught.value.error)


def test_an_unknown_module_path_names_the_node(tiny_mlp: TinyMLP) -> None:
    graph = Graph()
    graph.add("output", "layer1")
    bad = graph.add("output", "layer9")
    with pytest.raises(NodeFailure) as caught:
        run(tiny_mlp, graph, inputs(2))
    assert caught.value.node == bad.id and isinstance(caught.value.error, AttributeError)
    assert "'layer9'" in str(caught.value.error)
    assert hook_counts(tiny_mlp) == [0] * len(hook_counts(tiny_mlp))  # layer1's hook is gone


def test_a_failing_op_keeps_its_type_and_names_its_node(tiny_mlp: TinyMLP) -> None:
    graph = Graph()
    h = graph.add("output", "layer1")
    bad = graph.add("function", "operator.getitem", (Ref(h.id), (slice(None), 99)))
    with pytest.raises(NodeFailure) as caught:
        run(tiny_mlp, graph, inputs(2))
    assert caught.value.node == bad.id and isinstance(caught.value.error, IndexError)


def test_a_deadline_that_passed_stops_the_run(tiny_mlp: TinyMLP) -> None:
    graph = Graph()
    graph.save(graph.add("output", "layer1").id)
    with pytest.raises(TimeoutError, match="time limit"):
        run(tiny_mlp, graph, inputs(2), deadline=time.monotonic() - 1.0)


def test_python_nodes_run_only_when_trusted(tiny_mlp: TinyMLP) -> None:
    graph = Graph()
    h = graph.add("output", "layer1")
    doubled = graph.add("python", "double", (lambda t: t * 2, Ref(h.id)))
    graph.save(doubled.id)
    x = inputs(2)
    with torch.no_grad():
        exact(run(tiny_mlp, graph, x)[doubled.id], tiny_mlp.layer1(x) * 2)
    with pytest.raises(NodeFailure, match="refused"):
        run(tiny_mlp, graph, x, trusted=False)


# -- hooks live only as long as the run ----------------------------------------------------------


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "failing"])
def test_hooks_are_removed_after_the_run(tiny_mlp: TinyMLP, fail: bool) -> None:
    graph = Graph()
    h = graph.add("output", "layer1")
    graph.add("input", "layer2")
    index = 99 if fail else 0
    graph.save(graph.add("function", "operator.getitem", (Ref(h.id), (slice(None), index))).id)
    graph.add("output", "layer3")
    before = hook_counts(tiny_mlp)
    executor = Executor(tiny_mlp, graph, Batch((inputs(2),), {}, 2))
    during = []
    probe = tiny_mlp.layer1.register_forward_pre_hook(
        lambda m, a: during.append(sum(hook_counts(tiny_mlp)))
    )
    try:
        if fail:
            with pytest.raises(NodeFailure):
                executor.run()
        else:
            executor.run()
    finally:
        probe.remove()
    assert during == [1 + 3]  # the probe and the executor's three hooks
    assert hook_counts(tiny_mlp) == before == [0] * len(before)


# -- every call --------------------------------------------------------------------------------


def test_every_call_nodes_run_again_at_each_call() -> None:
    loop = Loop().eval()
    x = inputs(3)
    graph = Graph()
    out = graph.add("output", "block", call=EVERY_CALL)
    half = graph.add("function", "operator.mul", (Ref(out.id), 0.5))
    write = graph.add("set_output", "block", (Ref(half.id),), call=EVERY_CALL)
    second = graph.add("output", "block", call=1)
    y = graph.add("output", "")
    for node in (half, second, y):
        graph.save(node.id)
    executor = Executor(loop, graph, Batch((x,), {}, 3))
    got = executor.run()

    seen = []

    def halve(module, args, output):
        seen.append(output * 0.5)
        return seen[-1]

    expected = hooked(loop, x, post=[(loop.block, halve)])
    exact(got[y.id], expected)
    exact(got[half.id], seen[-1])  # a saved repeating node keeps its last value
    exact(got[second.id], seen[1])  # call 1 sees the output as the hook left it
    assert executor.calls[("block", "post")] == 3
    assert executor.plan.repeating == {out.id, half.id, write.id}


def test_a_single_call_node_sees_only_that_call() -> None:
    loop = Loop().eval()
    x = inputs(2)
    graph = Graph()
    read = graph.add("input", "block", call=2)
    graph.save(read.id)
    got = run(loop, graph, x)
    seen = []
    hooked(loop, x, pre=[(loop.block, lambda m, a: seen.append(a[0]))])
    exact(got[read.id], seen[2])


def test_a_value_nothing_reads_is_freed_at_once(tiny_mlp: TinyMLP) -> None:
    g = Graph()
    a = g.add("output", "layer1")
    g.add("method", "mul_", (Ref(a.id), 2.0))  # a bare in-place edit: no user, not saved
    c = g.add("output", "layer2")
    g.add("function", "torch.sum", (Ref(c.id),))
    executor = Executor(tiny_mlp, g, Batch((torch.randn(3, 8),), {}, 3))
    assert executor.run() == {}
    assert all(value is None for value in executor.values)


# -- the drain's direct path for function nodes ---------------------------------------------------


def chain_graph(n: int) -> Graph:
    """``layer1.output`` then ``n`` small ops on it, the last saved: ``(B, 8)`` all along."""
    graph = Graph()
    h = graph.add("output", "layer1")
    for i in range(n):
        target, scalar = ("operator.mul", 1.5) if i % 2 else ("operator.add", 0.25)
        h = graph.add("function", target, (Ref(h.id), scalar))
    graph.save(h.id)
    return graph


def test_a_chain_of_small_ops_equals_the_same_ops_in_a_hook(tiny_mlp: TinyMLP) -> None:
    def chain(module, args, out):
        for i in range(6):
            out = out * 1.5 if i % 2 else out + 0.25
        kept.append(out)

    kept: list[torch.Tensor] = []
    x = inputs(2)
    hooked(tiny_mlp, x, post=[(tiny_mlp.layer1, chain)])
    graph = chain_graph(6)
    exact(run(tiny_mlp, graph, x)[graph.saved[0]], kept[0])


def test_a_subclass_that_watches_nodes_sees_every_function_node(tiny_mlp: TinyMLP) -> None:
    class Watching(Executor):
        def _run_node(self, i: int) -> None:
            seen.append(i)
            super()._run_node(i)

    seen: list[int] = []
    graph = chain_graph(4)
    Watching(tiny_mlp, graph, Batch((inputs(2),), {}, 2)).run()
    assert seen == [0, 1, 2, 3, 4]


def test_a_servers_memory_bound_checks_every_function_node(tiny_mlp, monkeypatch) -> None:
    from lazytensor.runtime import bounds

    checked: list[str] = []
    monkeypatch.setattr(bounds, "check", lambda name, args, kwargs: checked.append(name))
    token = bounds.MAX_BYTES.set(2**30)
    try:
        run(tiny_mlp, chain_graph(4), inputs(2))
    finally:
        bounds.MAX_BYTES.reset(token)
    assert checked == ["operator.add", "operator.mul"] * 2


def test_a_deadline_is_checked_before_each_function_node(tiny_mlp, monkeypatch) -> None:
    checks: list[int] = []
    monkeypatch.setattr(Executor, "_check_time", lambda self, *_: checks.append(1))
    run(tiny_mlp, chain_graph(4), inputs(2), deadline=time.monotonic() + 60.0)
    assert len(checks) >= 4  # each node, and each moment


def test_a_failing_function_node_in_a_chain_is_named(tiny_mlp: TinyMLP) -> None:
    graph = chain_graph(3)
    bad = graph.add("function", "operator.matmul", (Ref(graph.saved[0]), Ref(graph.saved[0])))
    with pytest.raises(NodeFailure) as caught:
        run(tiny_mlp, graph, inputs(2))
    assert caught.value.node == bad.id and isinstance(caught.value.error, RuntimeError)


def test_submodule_finds_what_get_submodule_finds() -> None:
    """The executor's module lookup reads registered children directly; wherever an
    attribute would shadow a child, or a path is wrong, torch's ``get_submodule`` decides."""
    from lazytensor.runtime.hooks import submodule

    class Shadowed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())

        @property
        def head(self) -> nn.Module:  # a property named like a child wins over the child
            return self.inner[0]

    model = nn.Sequential(TinyMLP(), Shadowed())
    model[1]._modules["head"] = nn.Linear(3, 3)  # registered, but the property shadows it
    for path, _ in model.named_modules():
        assert submodule(model, path) is model.get_submodule(path)
    assert submodule(model, "1.head") is model.get_submodule("1.head") is model[1].inner[0]
    with pytest.raises(AttributeError, match="nope"):
        submodule(model, "1.inner.nope")


def test_a_stop_in_code_without_a_forward_ends_it_there(tiny_mlp: TinyMLP) -> None:
    """A ``stop`` node in a session's own code (no forward: ``run_plain``), as a hand-built or
    hostile graph may hold: what it reads has run, a value after it is a node failure, and the
    executor's internal stop (a BaseException, which a server's handlers would not catch)
    never leaves it."""
    graph = Graph()
    graph.add("function", "torch.zeros", (2,))
    graph.add("stop", "", (Ref(0),))
    graph.add("function", "torch.ones", (2,))
    graph.save(0)
    values = Executor(tiny_mlp, graph, Batch()).run_plain()
    torch.testing.assert_close(values[0], torch.zeros(2))
    graph.save(2)
    with pytest.raises(NodeFailure, match="never ran") as failure:
        Executor(tiny_mlp, graph, Batch()).run_plain()
    assert failure.value.node == 2
