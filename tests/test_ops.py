"""Tests for lazytensor/ops.py: the allow-list, and every kind of op a proxy records.

The recording tests run one Python function twice: inside a trace on a proxy, and in a plain
PyTorch hook on the real activation. A proxy is tensor-like, so the same code works on both,
and what the trace saved must equal what the hook computed, bit for bit.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

import lazytensor as lt
from lazytensor.core import ops
from models import TinyMLP, hooked

#: A tensor the recorded code closes over: it becomes a graph constant.
WEIGHT = torch.linspace(-1.0, 1.0, 16)


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(5))


def battery(t):
    """Pure ops on ``t`` (B, 16): torch functions, F, methods, operators, indexing."""
    return {
        # Python operators, reflected forms, comparisons
        "add": t + 1,
        "radd": 1 + t,
        "rsub": 1 - t,
        "mul": t * t,
        "rmul": 0.5 * t,
        "truediv": t / 3,
        "rtruediv": 2 / (abs(t) + 1),
        "floordiv": t // 0.25,
        "mod": t % 0.25,
        "pow": t**2,
        "rpow": 2**t,
        "matmul": t @ t.T,
        "neg": -t,
        "pos": +t,
        "compare": (t > 0) & (t < 0.5) | (t <= -0.5) ^ (t >= 1),
        "equal": (t == t[0]) | (t != 0),
        "invert": ~(t > 0),
        "tensor on the left": (WEIGHT - t) * WEIGHT / (WEIGHT + 2) + (WEIGHT > t),
        "tensor matmul": WEIGHT[None] @ t.T,
        # torch and torch.nn.functional functions
        "torch.relu": torch.relu(t),
        "torch.cat": torch.cat([t, t * 2], dim=-1),
        "torch.stack": torch.stack([t, t + 1]),
        "torch.where": torch.where(t > 0, t, torch.zeros_like(t)),
        "torch.einsum": torch.einsum("bi,bj->ij", t, t),
        "torch.clamp": torch.clamp(t, min=-0.1, max=0.1),
        "torch.linalg.norm": torch.linalg.vector_norm(t, dim=-1),
        "F.softmax": F.softmax(t, dim=-1),
        "F.gelu": F.gelu(t),
        "F.layer_norm": F.layer_norm(t, t.shape[-1:]),
        "F.pad": F.pad(t, (1, 2)),
        # tensor methods, including ones returning a namedtuple
        "softmax": t.softmax(-1),
        "sum": t.sum(dim=0, keepdim=True),
        "mean": t.mean(),
        "reshape": t.reshape(-1, 4),
        "view": t.view(t.shape[0], 4, 4),
        "transpose": t.transpose(0, 1),
        "to": t.to(torch.float64),
        "float clone detach": t.half().float().clone().detach(),
        "argmax": t.argmax(-1),
        "topk.values": t.topk(3, dim=-1).values,
        "topk.indices": t.topk(3).indices,
        "max[0]": t.max(dim=-1)[0],
        "T": t.T,
        # indexing
        "slice": t[1:, ::2],
        "int": t[0],
        "negative": t[-1, -2],
        "list": t[[0, 2]],
        "tensor index": t[:, torch.tensor([1, 3])],
        "proxy index": t[:, t[0].argsort()],
        "mask": t[t > 0],
        "ellipsis": t[..., 0],
        "none": t[None, :, None],
        "shape-dependent": t[..., : t.shape[-1] // 2],
        # factories inside the trace, and a tensor closed over
        "zeros": torch.zeros(t.shape[0], 3) + t[:, :3],
        "arange": t[:, torch.arange(4) * 2],
        "ones like": torch.ones_like(t) - t,
        "constant": t * WEIGHT,
    }


def test_recorded_ops_match_the_same_code_in_a_hook(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        got = {name: value.save() for name, value in battery(net.layer1.output).items()}
    seen = {}
    hooked(tiny_mlp, x, post=[(tiny_mlp.layer1, lambda m, a, out: seen.update(battery(out)))])
    assert got.keys() == seen.keys()
    for name, expected in seen.items():
        assert type(got[name]) is torch.Tensor, name
        exact(got[name], expected)


def in_place(t):
    """Writes into ``t`` (B, 16), as a hook would; returns what it saves."""
    t += 1
    t[:] *= 0.5
    t[:, 0] = torch.tensor([7.0, 8.0, 9.0])
    t[:, 1:3] = WEIGHT[:2]
    t[1] = t[0]
    t[-1, t[-1] < 0.6] = -2.0
    t.clamp_(min=-1.5, max=6.0)
    t[..., -1] -= t[..., 0]
    return t


def test_in_place_ops_match_the_same_code_in_a_hook(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        edited = in_place(net.layer1.output).save()
        y = net.output.save()
    seen = {}
    expected = hooked(
        tiny_mlp, x, post=[(tiny_mlp.layer1, lambda m, a, out: seen.update(t=in_place(out)))]
    )
    exact(edited, seen["t"])
    exact(y, expected)
    assert not torch.equal(expected, hooked(tiny_mlp, x))


def test_factories_and_constants_are_recorded_in_the_graph(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    patch = torch.full((2, 16), 3.0)
    with net.trace(inputs(2)) as tracer:
        net.layer2.output[:] = patch + torch.arange(16)
        zeros = torch.zeros(2, 4)
        assert isinstance(zeros, lt.Proxy)
        y = net.output.save()
    calls = {n.target for n in tracer.graph.nodes if n.op == "function"}
    assert {"torch.arange", "torch.zeros"} <= calls
    assert any(c is patch for c in tracer.graph.constants)
    expected = hooked(
        tiny_mlp, inputs(2), post=[(tiny_mlp.layer2, lambda m, a, out: patch + torch.arange(16))]
    )
    exact(y, expected)


def test_torch_calls_without_proxies_run_normally_inside_a_trace(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    plain = torch.ones(3)
    with net.trace(inputs(2)):
        doubled = plain * 2
        net.output.save()
    assert type(doubled) is torch.Tensor
    exact(doubled, torch.full((3,), 2.0))


# -- the allow-list ------------------------------------------------------------------------------


def test_allowed_names_resolve_both_ways() -> None:
    for name in ("torch.add", "torch.nn.functional.softmax", "operator.getitem", "torch.zeros"):
        fn = ops.resolve_function(name)
        assert ops.function_name(fn) == name
    assert ops.resolve_function("torch.linalg.vector_norm") is torch.linalg.vector_norm
    assert ops.function_name(F.gelu) == "torch.nn.functional.gelu"
    assert ops.function_name(operator.setitem) == "operator.setitem"
    assert ops.factory_name(torch.zeros) == "torch.zeros"
    assert ops.factory_name(torch.add) is None
    for name in ("softmax", "add_", "view", "topk", "clamp_"):
        assert ops.check_method(name) == name and ops.is_method(name)
    assert ops.check_attribute("logits") == "logits"


def test_every_allowed_function_round_trips() -> None:
    table = ops._functions()
    assert len(table) > 300
    for name, fn in table.items():
        assert ops.resolve_function(name) is fn
        # Aliases (torch.concat is torch.cat) map back to one of the names of the same callable.
        assert ops.resolve_function(ops.function_name(fn)) is fn


@pytest.mark.parametrize(
    "fn",
    [torch.load, torch.save, torch.from_file, operator.attrgetter, getattr, eval, torch.fft.fft],
    ids=lambda fn: getattr(fn, "__name__", str(fn)),
)
def test_forbidden_functions_have_no_name(fn) -> None:
    with pytest.raises(lt.OpNotAllowedError, match="allow-list"):
        ops.function_name(fn)


@pytest.mark.parametrize(
    "name",
    [
        "torch.load",
        "torch.save",
        "torch.from_file",
        "operator.attrgetter",
        "operator.methodcaller",
        "builtins.eval",
        "torch.hub.load",
        "torch.Tensor.untyped_storage",
        "os.system",
        "",
    ],
)
def test_forbidden_names_do_not_resolve(name: str) -> None:
    with pytest.raises(lt.OpNotAllowedError):
        ops.resolve_function(name)


@pytest.mark.parametrize(
    "name", ["untyped_storage", "data_ptr", "storage", "__reduce_ex__", "_version", "numpy", "x"]
)
def test_forbidden_methods(name: str) -> None:
    assert not ops.is_method(name)
    with pytest.raises(lt.OpNotAllowedError, match="method"):
        ops.check_method(name)


@pytest.mark.parametrize("name", ["_modules", "__class__", "__dict__", "_version", "a.b", ""])
def test_private_attributes_are_refused(name: str) -> None:
    with pytest.raises(lt.OpNotAllowedError, match="attribute"):
        ops.check_attribute(name)


def test_mutations_and_views() -> None:
    assert ops.facts("function", "operator.setitem").writes
    assert ops.facts("method", "add_").writes
    assert not ops.facts("method", "add").writes
    assert not ops.facts("method", "__add__").writes
    assert not ops.facts("getattr", "add_").writes
    assert not ops.facts("function", "operator.and_").writes  # ends in "_", writes nothing
    assert ops.facts("method", "view").aliases and ops.facts("function", "operator.getitem").aliases
    assert ops.facts("function", "torch.transpose").aliases
    assert not ops.facts("method", "clone").aliases
    assert not ops.facts("module", "view").aliases


def test_operator_tables_name_allowed_functions() -> None:
    for table in (ops.DUNDERS, ops.REFLECTED):
        for dunder, name in table.items():
            assert hasattr(torch.Tensor, dunder), dunder
            ops.resolve_function(name)
    for dunder, method in ops.INPLACE.items():
        assert hasattr(torch.Tensor, dunder), dunder
        ops.check_method(method)
    assert ops.FACTORIES <= set(ops._functions())


# -- per-op facts against ATen's schema annotations ---------------------------------------------
#
# ATen annotates each operator's schema with what it does to memory: ``Tensor(a!) self`` is
# written in place, a ``Tensor(a)`` result shares memory with ``Tensor(a) self``, and
# ``Tensor(a -> *) self`` flows into a list of results (``split``). ops.facts must agree.

#: Aliasing ops that ATen's schemas do not annotate as such, and why they alias.
UNANNOTATED_ALIASES = {
    # They return their input itself when nothing needs to change.
    "type_as": "x.type_as(y) is x when the dtypes match",
    "dropout": "returns its input when not training, or when p == 0",
    **dict.fromkeys(
        "float double half bfloat16 int long short bool byte char".split(),
        "Python methods (no schema) calling .to(dtype), which returns self if nothing changes",
    ),
    # Their tensors come in a list, which their schemas leave unannotated.
    "cartesian_prod": "returns its input when given one tensor",
    "broadcast_tensors": "returns views of its inputs",
    # Python operators (no schema).
    "getitem": "indexing is aten::select, slice... (views), except advanced indexing",
    "pos": "+x is torch.positive, which returns its input",
}

#: ATen's name of an op whose name differs there.
_ATEN_NAMES = {("getattr", "T"): "numpy_T", ("getattr", "H"): "matrix_H"}


def _aten_name(op: str, target: str) -> str:
    if target.startswith("torch.linalg."):
        return "linalg_" + target.rpartition(".")[2]
    return _ATEN_NAMES.get((op, target), target.rpartition(".")[2])


def _schema_facts(op: str, target: str) -> ops.OpFacts | None:
    """What ATen's schemas of ``op``'s overloads taking a tensor first say, or ``None``."""
    schemas = [
        s
        for s in torch._C._jit_get_schemas_for_operator("aten::" + _aten_name(op, target))
        if s.arguments and str(s.arguments[0].type) == "Tensor"
    ]
    if not schemas:
        return None
    writes = aliases = False
    for schema in schemas:
        first = schema.arguments[0].alias_info
        if first is None:  # a fresh result (an ``out=`` overload aliases ``out``, not ``self``)
            continue
        writes |= first.is_write
        aliases |= "*" in first.after_set or any(
            r.alias_info is not None and r.alias_info.before_set & first.before_set
            for r in schema.returns
        )
    return ops.OpFacts(writes=writes, aliases=aliases)


def _allowed_ops() -> list[tuple[str, str]]:
    functions = [("function", name) for name in ops._functions()]
    methods = [("method", name) for name in ops._methods()]
    attributes = [("getattr", name) for name in ops.TENSOR_ATTRIBUTES]
    return sorted(functions + methods + attributes)


def _with_schemas() -> list[tuple[tuple[str, str], ops.OpFacts]]:
    pairs = ((op, _schema_facts(*op)) for op in _allowed_ops())
    return [(op, aten) for op, aten in pairs if aten is not None]


def test_enough_ops_have_aten_schemas() -> None:
    checked = _with_schemas()
    assert len(checked) > 600  # of 767 allowed ops
    assert sum(aten.writes for _, aten in checked) > 45  # the in-place methods
    assert sum(aten.aliases and not aten.writes for _, aten in checked) > 65  # the views


def test_facts_say_an_op_writes_exactly_when_aten_says_so() -> None:
    wrong = [
        f"{op} {target}: ATen writes={aten.writes}, facts {ops.facts(op, target)}"
        for (op, target), aten in _with_schemas()
        if ops.facts(op, target).writes != aten.writes
    ]
    assert not wrong, "\n".join(wrong)


def test_facts_say_an_op_aliases_when_aten_says_so() -> None:
    wrong = [
        f"{op} {target}: ATen aliases, facts {ops.facts(op, target)}"
        for (op, target), aten in _with_schemas()
        if aten.aliases and not ops.facts(op, target).aliases
    ]
    assert not wrong, "\n".join(wrong)


def test_every_aliasing_op_is_annotated_or_listed_with_a_reason() -> None:
    unexplained = []
    for op, target in _allowed_ops():
        aten = _schema_facts(op, target)
        facts = ops.facts(op, target)
        unannotated = aten is None or not aten.aliases
        if facts.aliases and not facts.writes and unannotated:  # writes return their input
            if target.rpartition(".")[2] not in UNANNOTATED_ALIASES:
                unexplained.append(f"{op} {target}")
    assert not unexplained, (
        f"facts say these alias, ATen does not: {unexplained}; fix ops.ALIASING, or add "
        "the name to UNANNOTATED_ALIASES with the reason"
    )
    for name in UNANNOTATED_ALIASES:  # the list stays true
        aten = _schema_facts("function", name)
        assert name in ops.ALIASING and (aten is None or not aten.aliases), name


def test_every_aliasing_name_is_an_allowed_op() -> None:
    bare = {name.rpartition(".")[2] for name in ops._functions()}
    allowed = bare | ops._methods() | ops.TENSOR_ATTRIBUTES
    assert ops.ALIASING <= allowed, sorted(ops.ALIASING - allowed)
    assert all(ops.facts("function", name).writes for name in ops._WRITING_FUNCTIONS)
