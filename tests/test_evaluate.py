"""Tests for lazytensor/runtime/evaluate.py: one compute node, outside any forward pass.

Each node is built by hand and evaluated on values given as a dict or a list; the oracle is the
same call written in plain PyTorch.
"""

from __future__ import annotations

from collections import namedtuple

import cloudpickle
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from lazytensor.core.errors import GraphError, OpNotAllowedError
from lazytensor.core.graph import Const, Node, Ref
from lazytensor.runtime import fake
from lazytensor.runtime.evaluate import evaluate, resolve

Pair = namedtuple("Pair", "main gate")


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def tensor(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def getattr_node(name: str) -> Node:
    return Node(1, "getattr", name, (Ref(0),))


# -- arguments --------------------------------------------------------------------------------


def test_resolve_reads_refs_and_constants_through_containers() -> None:
    a, c = tensor(2), tensor(3, seed=1)
    values = {0: a, 4: 7}
    arg = (Ref(0), [Const(0), {"k": Ref(4)}], slice(None, Ref(4)), "s", None, ...)
    got = resolve(arg, values, [c])
    assert got[0] is a and got[1][0] is c and got[1][1] == {"k": 7}
    assert got[2] == slice(None, 7) and got[3:] == ("s", None, ...)
    assert resolve(torch.float16, values, [c]) is torch.float16


def test_values_may_be_a_list_or_a_dict() -> None:
    a, b = tensor(2, 3), tensor(2, 3, seed=1)
    node = Node(2, "function", "torch.add", (Ref(0), Ref(1)), {"alpha": 2})
    exact(evaluate(node, [a, b], []), torch.add(a, b, alpha=2))
    exact(evaluate(node, {0: a, 1: b}, []), torch.add(a, b, alpha=2))


# -- functions and methods ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "args", "kwargs", "oracle"),
    [
        ("torch.sum", (Ref(0),), {"dim": 1, "keepdim": True}, lambda a, c: a.sum(1, keepdim=True)),
        ("torch.cat", ((Ref(0), Const(0)),), {"dim": 0}, lambda a, c: torch.cat((a, c))),
        ("operator.getitem", (Ref(0), (slice(None), 1)), {}, lambda a, c: a[:, 1]),
        ("operator.mul", (2.5, Ref(0)), {}, lambda a, c: 2.5 * a),
        ("torch.nn.functional.softmax", (Ref(0),), {"dim": -1}, lambda a, c: a.softmax(-1)),
        ("torch.zeros", (2, 3), {"dtype": torch.float16}, lambda a, c: torch.zeros(2, 3).half()),
    ],
    ids=["sum", "cat", "getitem", "mul", "softmax", "factory"],
)
def test_function_nodes_call_the_allow_listed_function(target, args, kwargs, oracle) -> None:
    a, c = tensor(2, 3), tensor(2, 3, seed=1)
    exact(evaluate(Node(1, "function", target, args, kwargs), {0: a}, [c]), oracle(a, c))


def test_setitem_writes_into_its_first_argument() -> None:
    a = tensor(2, 3)
    expected = a.clone()
    expected[:, 0] = -1.0
    assert (
        evaluate(Node(1, "function", "operator.setitem", (Ref(0), (slice(None), 0), -1.0)), [a], [])
        is None
    )
    exact(a, expected)


def test_a_function_outside_the_allow_list_is_refused() -> None:
    with pytest.raises(OpNotAllowedError, match="torch.load"):
        evaluate(Node(0, "function", "torch.load", ("/etc/passwd",)), [], [])


def test_method_nodes_call_allowed_tensor_methods() -> None:
    a = tensor(2, 3)
    exact(evaluate(Node(1, "method", "transpose", (Ref(0), 0, 1)), [a], []), a.transpose(0, 1))
    exact(
        evaluate(Node(1, "method", "to", (Ref(0),), {"dtype": torch.float64}), [a], []), a.double()
    )
    same = evaluate(Node(1, "method", "mul_", (Ref(0), 2.0)), [a], [])
    assert same is a  # in place, like the method itself


@pytest.mark.parametrize("name", ["numpy", "data_ptr", "storage", "__reduce_ex__", "tolist"])
def test_methods_outside_the_allow_list_are_refused(name: str) -> None:
    with pytest.raises(OpNotAllowedError, match=name):
        evaluate(Node(1, "method", name, (Ref(0),)), [tensor(2)], [])


def test_methods_are_called_on_tensors_only() -> None:
    with pytest.raises(TypeError, match=r"\.add\(\) was called on a tuple"):
        evaluate(Node(1, "method", "add", (Ref(0), 1)), [(1, 2)], [])


# -- attribute reads ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shape", "dtype", "device", "ndim", "T", "mT", "requires_grad"])
def test_tensor_attributes_a_trace_may_read(name: str) -> None:
    a = tensor(2, 3)
    got, expected = evaluate(getattr_node(name), [a], []), getattr(a, name)
    if isinstance(expected, torch.Tensor):
        exact(got, expected)
    else:
        assert got == expected


@pytest.mark.parametrize("name", ["data", "grad_fn", "storage", "add", "untyped_storage"])
def test_other_tensor_attributes_are_refused(name: str) -> None:
    with pytest.raises(AttributeError, match=f"no attribute '{name}' that a trace may read"):
        evaluate(getattr_node(name), [tensor(2)], [])


@pytest.mark.parametrize("name", ["_base", "__class__", "__dict__", "", "a.b"])
def test_private_dunder_and_malformed_names_are_not_allowed(name: str) -> None:
    with pytest.raises(OpNotAllowedError, match="cannot be read in a trace"):
        evaluate(getattr_node(name), [tensor(2)], [])


def test_model_outputs_expose_their_fields_only() -> None:
    logits = tensor(2, 5)
    out = CausalLMOutputWithPast(logits=logits)
    assert evaluate(getattr_node("logits"), [out], []) is logits
    assert evaluate(getattr_node("loss"), [out], []) is None  # a field that is not set
    for name in ("to_tuple", "keys", "update"):
        with pytest.raises(AttributeError, match="that a trace may read"):
            evaluate(getattr_node(name), [out], [])


def test_named_tuples_and_return_types_expose_their_fields_only() -> None:
    a = tensor(3, 4)
    pair = Pair(a, a + 1)
    assert evaluate(getattr_node("gate"), [pair], []) is pair.gate
    top = torch.max(a, 0)
    exact(evaluate(getattr_node("indices"), [top], []), top.indices)
    for value, name in ((pair, "count"), (top, "index")):
        with pytest.raises(AttributeError, match="that a trace may read"):
            evaluate(getattr_node(name), [value], [])


@pytest.mark.parametrize("value", [nn.Linear(2, 2), (1, 2), "text", 3])
def test_other_objects_expose_nothing(value) -> None:
    name = "weight" if isinstance(value, nn.Module) else "real"
    with pytest.raises(AttributeError, match="that a trace may read"):
        evaluate(getattr_node(name), [value], [])


# -- python nodes ---------------------------------------------------------------------------------


def double_plus(t: torch.Tensor, *, plus: float = 0.0) -> torch.Tensor:
    return t * 2 + plus


@pytest.mark.parametrize(
    "payload", [double_plus, cloudpickle.dumps(double_plus)], ids=["fn", "bytes"]
)
def test_python_nodes_run_the_users_function_when_trusted(payload) -> None:
    a = tensor(3)
    node = Node(1, "python", "tests.double_plus", (payload, Ref(0)), {"plus": 1.0})
    exact(evaluate(node, [a], []), a * 2 + 1.0)


def test_python_nodes_are_refused_when_untrusted(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("an untrusted payload was unpickled")

    monkeypatch.setattr(cloudpickle, "loads", never)
    node = Node(1, "python", "tests.double_plus", (cloudpickle.dumps(double_plus), Ref(0)))
    with pytest.raises(OpNotAllowedError, match="--trusted-clients"):
        evaluate(node, [tensor(3)], [], trusted=False)


# -- what evaluate does not run, and fake values ------------------------------------------------


@pytest.mark.parametrize("op", ["output", "input", "inputs", "result", "set_output", "module"])
def test_point_and_module_nodes_need_a_forward_pass(op: str) -> None:
    with pytest.raises(GraphError, match="only inside a forward pass"):
        evaluate(Node(0, op, "layer1"), [], [])


def test_under_a_fake_mode_constants_become_fake_and_shapes_propagate() -> None:
    mode = fake.mode()
    weight = tensor(3, 5)
    node = Node(1, "function", "torch.matmul", (Ref(0), Const(0)))
    with mode:
        got = evaluate(node, {0: mode.from_tensor(tensor(2, 3))}, [weight], fake_mode=mode)
    assert isinstance(got, FakeTensor)
    assert got.shape == (2, 5) and got.dtype == weight.dtype
    assert not isinstance(weight, FakeTensor)  # the graph's own constant is untouched
