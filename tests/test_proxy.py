"""Tests for lazytensor/tracing/proxy.py: a proxy records, its trace decides.

Most tests give a proxy a stand-in trace that only logs what the proxy asks of it, so they
check the proxy's own contract: which request each Python operation turns into. A few record
into a real trace and read the nodes it added.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import operator
import pickle
import sys
import types
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lazytensor as lt
from lazytensor.core.errors import OpNotAllowedError, StrictModeError, TraceError
from lazytensor.core.graph import Const, Ref
from lazytensor.tracing.proxy import OpenProxy, Proxy
from models import TinyMLP


class Log:
    """A stand-in trace: logs each request and answers materializations with ``value``."""

    def __init__(self, value=None) -> None:
        self.value = torch.tensor(3.0) if value is None else value
        self.calls: list[tuple] = []

    def apply(self, op, target, args, kwargs=None, depth=1):
        self.calls.append(("apply", op, target, args, kwargs or {}))
        return "recorded"

    def apply_torch(self, func, args, kwargs):
        self.calls.append(("torch", func, args, kwargs))
        return "recorded"

    state = None  # not recording: an operator's method hands its op to _operator_slowly

    def _operator_slowly(self, target, node, other, reflected, depth):
        self.calls.append(("operator", target, node, other, reflected))
        return "recorded"

    def materialize(self, proxy, how):
        self.calls.append(("materialize", proxy._node))
        return how(self.value)

    def attribute(self, proxy, name):
        self.calls.append(("attribute", proxy._node, name))
        return "attribute"

    def set_attribute(self, proxy, name, value):
        self.calls.append(("set_attribute", proxy._node, name, value))

    def call_value(self, proxy, args, kwargs):
        self.calls.append(("call", proxy._node, args, kwargs))

    def length(self, proxy):
        self.calls.append(("length", proxy._node))
        return 2

    def save(self, proxy):
        self.calls.append(("save", proxy._node))

    def value_of(self, proxy):
        self.calls.append(("value_of", proxy._node))
        return self.value


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def p(log: Log) -> Proxy:
    """A proxy of a value of unknown kind, as a module's output is."""
    return OpenProxy.of(log, 0)


# -- operators --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "target"),
    [
        (operator.add, "operator.add"),
        (operator.sub, "operator.sub"),
        (operator.mul, "operator.mul"),
        (operator.truediv, "operator.truediv"),
        (operator.floordiv, "operator.floordiv"),
        (operator.mod, "operator.mod"),
        (operator.pow, "operator.pow"),
        (operator.matmul, "operator.matmul"),
        (operator.and_, "operator.and_"),
        (operator.or_, "operator.or_"),
        (operator.xor, "operator.xor"),
        (operator.lshift, "operator.lshift"),
        (operator.rshift, "operator.rshift"),
        (operator.eq, "operator.eq"),
        (operator.ne, "operator.ne"),
        (operator.lt, "operator.lt"),
        (operator.le, "operator.le"),
        (operator.gt, "operator.gt"),
        (operator.ge, "operator.ge"),
    ],
)
def test_binary_operators_record_their_function(log: Log, p: Proxy, op, target: str) -> None:
    assert op(p, 2) == "recorded"
    assert log.calls == [("operator", target, p._node, 2, False)]


@pytest.mark.parametrize(
    ("op", "target"),
    [
        (operator.add, "operator.add"),
        (operator.sub, "operator.sub"),
        (operator.mul, "operator.mul"),
        (operator.truediv, "operator.truediv"),
        (operator.floordiv, "operator.floordiv"),
        (operator.mod, "operator.mod"),
        (operator.pow, "operator.pow"),
        (operator.and_, "operator.and_"),
        (operator.or_, "operator.or_"),
        (operator.xor, "operator.xor"),
    ],
)
def test_reflected_operators_keep_the_operand_order(log: Log, p: Proxy, op, target) -> None:
    assert op(5, p) == "recorded"
    assert log.calls == [("operator", target, p._node, 5, True)]


@pytest.mark.parametrize(
    ("op", "target"),
    [
        (operator.neg, "operator.neg"),
        (operator.pos, "operator.pos"),
        (operator.abs, "operator.abs"),
        (operator.invert, "operator.invert"),
    ],
)
def test_unary_operators(log: Log, p: Proxy, op, target: str) -> None:
    assert op(p) == "recorded"
    assert log.calls == [("apply", "function", target, (p,), {})]


@pytest.mark.parametrize(
    ("op", "method"),
    [
        (operator.iadd, "add_"),
        (operator.isub, "sub_"),
        (operator.imul, "mul_"),
        (operator.itruediv, "div_"),
        (operator.ipow, "pow_"),
    ],
)
def test_in_place_operators_record_the_in_place_method(log: Log, p: Proxy, op, method) -> None:
    assert op(p, 2) == "recorded"
    assert log.calls == [("apply", "method", method, (p, 2), {})]


def test_indexing_and_item_assignment(log: Log, p: Proxy) -> None:
    key = (slice(None), 0)
    assert p[key] == "recorded"
    p[..., 1] = 7.0
    assert log.calls == [
        ("apply", "function", "operator.getitem", (p, key), {}),
        ("apply", "function", "operator.setitem", (p, (..., 1), 7.0), {}),
    ]


# -- torch functions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "func"),
    [
        (lambda p: torch.relu(p), torch.relu),
        (lambda p: F.softmax(p, dim=-1), F.softmax),
        (lambda p: torch.cat([torch.ones(1), p]), torch.cat),
        (lambda p: torch.add(torch.ones(1), other=p), torch.add),
    ],
    ids=["positional", "functional", "in-a-list", "keyword"],
)
def test_torch_functions_reach_the_trace_through_torch_function(log: Log, p, call, func) -> None:
    assert call(p) == "recorded"
    [(kind, got, args, kwargs)] = log.calls
    assert kind == "torch" and got is func


def test_a_tensor_on_the_left_of_an_operator_also_reaches_the_trace(log: Log, p: Proxy) -> None:
    left = torch.ones(2)
    assert left - p == "recorded"
    [(kind, func, args, kwargs)] = log.calls
    assert kind == "torch" and args[0] is left and args[1] is p


# -- what the trace decides ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("use", "expected"),
    [
        (bool, True),
        (int, 3),
        (float, 3.0),
        (operator.index, 3),
        (repr, "tensor(3)"),
        (str, "tensor(3)"),
        (lambda p: f"{p:>3}", "  3"),
        (lambda p: 3 in p, True),
        (np.asarray, np.asarray(3)),
        (lambda p: [10, 20, 30, 40][p], 40),
    ],
    ids=["bool", "int", "float", "index", "repr", "str", "format", "in", "array", "as-index"],
)
def test_materialization_points_ask_the_trace(use, expected) -> None:
    log = Log(torch.tensor(3))
    p = Proxy.of(log, 4)
    assert use(p) == expected
    assert log.calls == [("materialize", 4)]


def test_len_and_iteration_ask_the_trace_for_the_length(log: Log, p: Proxy) -> None:
    assert len(p) == 2
    assert log.calls == [("length", 0)]
    items = [item for item in iter(p)]
    assert items == ["recorded", "recorded"]
    assert log.calls[1:] == [
        ("length", 0),
        ("apply", "function", "operator.getitem", (p, 0), {}),
        ("apply", "function", "operator.getitem", (p, 1), {}),
    ]


def test_attributes_and_the_public_surface_go_to_the_trace(log: Log, p: Proxy) -> None:
    assert (p.shape, p.dtype, p.device, p.ndim, p.logits) == ("attribute",) * 5
    assert p.save() is p
    assert p.value is log.value
    p.grad = 1
    with pytest.raises(AttributeError, match="weight"):  # not one of proxy.SETTABLE
        p.weight = 1
    p(2, k=3)
    assert log.calls == [
        ("attribute", 0, "shape"),
        ("attribute", 0, "dtype"),
        ("attribute", 0, "device"),
        ("attribute", 0, "ndim"),
        ("attribute", 0, "logits"),
        ("save", 0),
        ("value_of", 0),
        ("set_attribute", 0, "grad", 1),
        ("call", 0, (2,), {"k": 3}),
    ]


def test_dunder_lookups_are_not_recorded(log: Log, p: Proxy) -> None:
    assert not hasattr(p, "__array_interface__")
    assert not hasattr(p, "__deepcopy__")
    assert log.calls == []
    assert hash(p) == id(p)  # usable in sets, though == records


@pytest.mark.parametrize(
    "dump",
    [pickle.dumps, copy.copy, copy.deepcopy, lambda p: torch.save(p, "/dev/null")],
    ids=["pickle", "copy", "deepcopy", "torch.save"],
)
def test_a_proxy_cannot_be_pickled(log: Log, p: Proxy, dump) -> None:
    with pytest.raises(TraceError, match="cannot be pickled"):
        dump(p)
    assert log.calls == []


# -- into a real trace ---------------------------------------------------------------------------


def test_recording_into_a_real_trace(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    weight = torch.ones(16, 2)
    with net.trace(torch.ones(2, 8)) as tracer:
        h = net.layer1.output
        start = len(tracer.graph.nodes)
        a = 1 - h
        b = h @ weight
        product = b._node
        b += 2
        c = torch.relu(h)
        d = h.transpose(0, 1)
        e = F.softmax(h, dim=-1)
    added = [(n.op, n.target, n.args, n.kwargs) for n in tracer.graph.nodes[start:]]
    assert added == [
        ("function", "operator.sub", (1, Ref(h._node)), {}),
        ("function", "operator.matmul", (Ref(h._node), Const(0)), {}),
        ("method", "add_", (Ref(product), 2), {}),
        ("function", "torch.relu", (Ref(h._node),), {}),
        ("method", "transpose", (Ref(h._node), 0, 1), {}),
        ("function", "torch.nn.functional.softmax", (Ref(h._node),), added[5][3]),
    ]
    assert added[5][3]["dim"] == -1
    assert tracer.graph.constants[0] is weight
    assert [p._node for p in (a, b, c, d, e)] == [start, start + 2, start + 3, start + 4, start + 5]


def test_a_function_outside_the_allow_list_is_refused_while_recording(tiny_mlp) -> None:
    net = lt.Model(tiny_mlp)
    with pytest.raises(OpNotAllowedError, match="allow-list"):
        with net.trace(torch.ones(2, 8)):
            torch.fft.fft(net.layer1.output)


def test_a_strict_trace_refuses_materialization(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    with pytest.raises(StrictModeError, match="strict"):
        with net.trace(torch.ones(2, 8), strict=True):
            bool(net.layer1.output.sum() > 0)


def test_every_operator_a_proxy_records_is_allow_listed() -> None:
    """The operators' own fast path (``proxy._operator``) skips the allow-list check that
    ``Trace.apply`` makes: every target it can record must pass that check."""
    from lazytensor.core import ops

    for name, target in [*ops.DUNDERS.items(), *ops.REFLECTED.items()]:
        assert callable(ops.resolve_function(target)), (name, target)


# -- the fast paths record what the general path records ------------------------------------------


def facts(node) -> tuple:
    """All a node is apart from its id: what equal graphs, plans and replays compare."""
    return (node.op, node.target, node.args, node.kwargs, node.call, node.rows, node.deps(),
            node.shape(), node.key())  # fmt: skip


def lines(tracer, proxies) -> set:
    return {(tracer.graph.sites[p._node].file, tracer.graph.sites[p._node].line) for p in proxies}


def test_operators_record_on_their_fast_path_what_apply_records(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    with net.trace(torch.ones(2, 8)) as tracer:
        h = net.layer1.output
        g = h * 3.0
        line = sys._getframe().f_lineno + 1
        fast = [h * 2.0, 1 - h, h + h, h - g, g / h, h**2, 2**h, h > 0.5, h == None]  # noqa: E711
        slow = [
            tracer.apply("function", target, args)
            for target, args in [
                ("operator.mul", (h, 2.0)),
                ("operator.sub", (1, h)),
                ("operator.add", (h, h)),
                ("operator.sub", (h, g)),
                ("operator.truediv", (g, h)),
                ("operator.pow", (h, 2)),
                ("operator.pow", (2, h)),
                ("operator.gt", (h, 0.5)),
                ("operator.eq", (h, None)),
            ]
        ]
    nodes = tracer.graph.nodes
    assert [facts(nodes[p._node]) for p in fast] == [facts(nodes[p._node]) for p in slow]
    assert lines(tracer, fast) == {(__file__, line)}
    for p, q in zip(fast, slow, strict=True):  # every field set, as Node(...) sets it
        got, want = nodes[p._node], nodes[q._node]
        for field in dataclasses.fields(got):
            if field.name not in ("id", "_deps", "_key", "_shape", "_code"):
                assert getattr(got, field.name) == getattr(want, field.name), field.name
        assert repr(dataclasses.replace(got, id=0)) == repr(dataclasses.replace(want, id=0))


def test_methods_indexing_and_torch_functions_record_what_apply_records(tiny_mlp) -> None:
    net = lt.Model(tiny_mlp)
    left = torch.ones(16)
    with net.trace(torch.ones(2, 8)) as tracer:
        h = net.layer1.output
        n = h.size(0) // 2  # a plain int (shapes are known while recording)
        line = sys._getframe().f_lineno + 1
        proxies = [h.sum(-1), h.sum(-1), h.sum(dim=-1), h[:, 0], h[..., 1:n], -h]
        torches = [torch.relu(h), torch.relu(h), left - h, torch.Tensor.__rsub__(left, h)]
        fast = [*proxies, *torches, F.softmax(h, dim=-1)]
        softmax = tracer.graph.nodes[fast[-1]._node].kwargs
        slow = [
            tracer.apply("method", "sum", (h, -1)),
            tracer.apply("method", "sum", (h, -1)),
            tracer.apply("method", "sum", (h,), {"dim": -1}),
            tracer.apply("function", "operator.getitem", (h, (slice(None), 0))),
            tracer.apply("function", "operator.getitem", (h, (..., slice(1, n)))),
            tracer.apply("function", "operator.neg", (h,)),
            tracer.apply("function", "torch.relu", (h,)),
            tracer.apply("function", "torch.relu", (h,)),
            tracer.apply("method", "sub", (left, h)),  # what Tensor.__sub__ dispatches as
            tracer.apply("function", "operator.sub", (h, left)),
            tracer.apply("function", "torch.nn.functional.softmax", (h,), softmax),
        ]
    nodes = tracer.graph.nodes
    assert [facts(nodes[p._node]) for p in fast] == [facts(nodes[p._node]) for p in slow]
    assert softmax["dim"] == -1 and tracer.graph.constants == [left]
    assert lines(tracer, proxies) == {(__file__, line)}
    assert lines(tracer, torches) == {(__file__, line + 1)}
    assert lines(tracer, fast[-1:]) == {(__file__, line + 2)}


def test_indexing_and_methods_record_on_their_fast_path_what_apply_records(tiny_mlp) -> None:
    """``proxy._record`` (indexing with plain keys, writes of a scalar or a proxy, methods with
    scalar arguments and keywords) makes the node ``Trace.apply`` makes, field by field, at the
    user's line; keys and arguments it does not take (a list, a tensor, a proxy argument, a
    dtype) go through ``apply``."""
    net = lt.Model(tiny_mlp)
    index = torch.tensor([0, 1])
    with net.trace(torch.ones(2, 8)) as tracer:
        h = net.layer1.output * 1.0
        g = h + 1.0
        row = g[0]
        writes = [((slice(None), 0), 0.5), (0, row), ((..., slice(1, 3)), True)]
        nodes = tracer.graph.nodes
        line = sys._getframe().f_lineno + 1
        fast = [h[0], h[-1, 2:5], h[:, None], h[..., 0], h[True], h.mean(0), h.sum(), h.add(g),
                h.norm(dim=-1, keepdim=True)]  # fmt: skip
        fast_writes = []
        for key, value in writes:
            h[key] = value
            fast_writes.append(len(nodes) - 1)
        slow = [
            tracer.apply("function", "operator.getitem", (h, key))
            for key in [0, (-1, slice(2, 5)), (slice(None), None), (..., 0), True]
        ]
        slow += [tracer.apply("method", "mean", (h, 0)), tracer.apply("method", "sum", (h,))]
        slow += [tracer.apply("method", "add", (h, g))]
        slow += [tracer.apply("method", "norm", (h,), {"dim": -1, "keepdim": True})]
        slow_writes = []
        for key, value in writes:
            tracer.apply("function", "operator.setitem", (h, key, value))
            slow_writes.append(len(nodes) - 1)
        general = [h[:, [0, 1]], h[index], h.sum(dim=0, dtype=torch.float64)]  # through apply
    got = [p._node for p in fast] + fast_writes
    want = [p._node for p in slow] + slow_writes
    assert [facts(nodes[i]) for i in got] == [facts(nodes[i]) for i in want]
    assert nodes[got[-2]].deps() == tuple(sorted((h._node, row._node)))
    for i, j in zip(got, want, strict=True):  # every field set, as Node(...) sets it
        for field in dataclasses.fields(nodes[i]):
            if field.name not in ("id", "_deps", "_key", "_shape", "_code"):
                assert getattr(nodes[i], field.name) == getattr(nodes[j], field.name), field.name
    assert lines(tracer, fast[:-1]) == {(__file__, line)}
    assert lines(tracer, fast[-1:]) == {(__file__, line + 1)}
    assert {tracer.graph.sites[i].line for i in fast_writes} == {line + 4}
    assert nodes[general[0]._node].args[1] == (slice(None), [0, 1])
    assert tracer.graph.constants == [index]
    assert nodes[general[2]._node].kwargs == {"dim": 0, "dtype": torch.float64}


def test_indexes_with_proxies_inside_keep_them(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    with net.trace(torch.ones(2, 8)) as tracer:
        h = net.layer1.output
        k = h.argmax()
        picked = h[:, k : k + 1 : 1]
        node = tracer.graph.nodes[picked._node]
    assert node.args == (Ref(h._node), (slice(None), slice(Ref(k._node), node.args[1][1].stop, 1)))
    assert node.deps() == tuple(sorted({h._node, k._node, node.args[1][1].stop.id}))


def test_ops_recorded_inside_lazytensor_name_the_users_line(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    with net.trace(torch.ones(2, 8)) as tracer:
        h = net.layer1.output
        line = sys._getframe().f_lineno + 1
        rows = list(h)  # Proxy.__iter__ indexes from lazytensor's own generator
    assert len(rows) == 2 and lines(tracer, rows) == {(__file__, line)}


def test_allowed_tensor_methods_are_found_on_the_class(log: Log, p: Proxy) -> None:
    assert isinstance(vars(Proxy)["sum"], property) and "scores" not in vars(Proxy)
    assert "save" in vars(Proxy) and not isinstance(vars(Proxy)["save"], property)
    assert (p.sum, p.transpose, p.scores, p.logits) == ("attribute",) * 4
    assert log.calls == [("attribute", 0, n) for n in ("sum", "transpose", "scores", "logits")]


def test_a_method_recorded_in_a_block_is_the_values_method_after_it(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    box = types.SimpleNamespace()  # holds the proxy itself after the block (names get values)
    with net.trace(torch.ones(2, 8)):
        box.h = net.layer1.output.save()
        box.h.sum(-1)  # "sum" is now answered at once while recording
    assert isinstance(box.h, Proxy) and torch.equal(box.h.sum(-1), box.h.value.sum(-1))


# -- what a tensor op makes: a Proxy with a tensor's attributes, no __getattr__ ----------------


PairOutput = collections.namedtuple("PairOutput", ["scores", "extra"])


class Pair(torch.nn.Module):
    """A module whose output is a named tuple of its own, with a field torch knows nothing of."""

    def forward(self, x: torch.Tensor) -> Any:
        return PairOutput(scores=x * 2, extra=x.sum(-1))


def test_tensor_ops_make_proxies_without_getattr_and_points_open_ones(tiny_mlp) -> None:
    """A tensor op's result is a ``Proxy`` (its class has no ``__getattr__``, so slot reads
    are specialized); a module's output, an item or attribute of it is an ``OpenProxy``."""
    assert "__getattr__" not in vars(Proxy) and "__getattr__" in vars(OpenProxy)
    net = lt.Model(tiny_mlp)
    with net.trace(torch.ones(2, 8)):
        h = net.layer1.output
        made = [h * 2, h.sum(-1), torch.relu(h), h[:, 0], (h * 2)[:, 0], h.max(-1)]
        assert type(h) is OpenProxy and type(h[0]) is OpenProxy
        assert all(type(x) is Proxy for x in made if x is not made[3]), made
        with pytest.raises(AttributeError, match="no_such_field"):  # as a tensor says it
            made[0].no_such_field  # noqa: B018


def test_a_tensor_ops_result_answers_every_tensor_attribute_and_named_tuple_field(tiny_mlp):
    """Attributes of a plain proxy (no ``__getattr__``) still reach the trace: tensor
    attributes and the fields of torch's named tuples, against the same reads in a hook."""
    net = lt.Model(tiny_mlp)
    x = torch.randn(3, 8)
    with net.trace(x):
        h = net.layer1.output * 2.0
        transposed = h.T.save()
        top = h.topk(2, dim=-1).values.save()
        where = h.max(-1).indices.save()
        eig = torch.linalg.eigh(h.T @ h).eigenvalues.save()
        batched = h.mT.save()
    captured = {}
    hook = tiny_mlp.layer1.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    try:
        tiny_mlp(x)
    finally:
        hook.remove()
    want = captured["h"].detach() * 2.0
    torch.testing.assert_close(transposed, want.T)
    torch.testing.assert_close(top, want.topk(2, dim=-1).values)
    torch.testing.assert_close(where, want.max(-1).indices)
    torch.testing.assert_close(eig, torch.linalg.eigh(want.T @ want).eigenvalues)
    torch.testing.assert_close(batched, want.mT)


def test_an_open_proxy_takes_a_custom_outputs_own_fields() -> None:
    """A module's output of a kind torch does not know keeps every field reachable."""
    pair = Pair()
    net = lt.Model(pair)
    x = torch.randn(2, 4)
    with net.trace(x):
        extra = net.output.extra.save()
        scores = (net.output.scores + 1.0).save()
    torch.testing.assert_close(extra, x.sum(-1))
    torch.testing.assert_close(scores, x * 2 + 1.0)
