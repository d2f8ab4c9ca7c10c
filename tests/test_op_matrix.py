"""The op coverage matrix: every allow-listed op, recorded, equals the same op run eagerly.

Each op of :mod:`lazytensor.core.ops` (torch, ``torch.linalg``, ``torch.nn.functional`` and
``operator`` functions, tensor methods, tensor attributes) has a sample call in :data:`SAMPLES`.
The call runs three ways on copies of the same inputs: eagerly, recorded in a trace of
:data:`IDENTITY` run here, and the same trace run by an in-process server. The inputs enter as
the model's input (a list of tensors that ``nn.Identity`` returns), so the op runs on
activations inside the forward pass, and everything must agree bit for bit (but for the few
ops listed below, with their reasons): the result and every input afterwards (an in-place op
must write into the recorded value as it does eagerly). Each run starts from the same RNG seed,
so random ops draw the same numbers. The eager runs also check each op's
:func:`~lazytensor.core.ops.facts`: whether it writes into, or returns, its first argument.

Adding an op to the allow-list fails :func:`test_every_allowed_op_has_a_sample` until it gets a
sample here (or a reason in :data:`SKIP`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import lazytensor as lt
from lazytensor.core import ops, tree
from lazytensor.frontend.served import Client, in_process
from lazytensor_server.registry import ServedModel
from lazytensor_server.service import Service

#: The name the test server serves ``nn.Identity`` under.
IDENTITY = "identity"

Call = tuple[tuple, dict]
_GEN = torch.Generator()


def call(*args: Any, **kwargs: Any) -> Call:
    return args, kwargs


# -- sample inputs (drawn from _GEN, reseeded before each sample is built) ---------------------


def x(*shape: int) -> torch.Tensor:
    """Floats in (-0.9, 0.9): in the domain of asin, atanh, erfinv...; default (3, 4)."""
    return torch.rand(shape or (3, 4), generator=_GEN) * 1.8 - 0.9


def p(*shape: int) -> torch.Tensor:
    """Floats in (0.1, 0.9): probabilities, and in the domain of log, sqrt, logit..."""
    return torch.rand(shape or (3, 4), generator=_GEN) * 0.8 + 0.1


def n(*shape: int, high: int = 5) -> torch.Tensor:
    """int64 in [0, high)."""
    return torch.randint(0, high, shape or (3, 4), generator=_GEN)


def b(*shape: int) -> torch.Tensor:
    return torch.rand(shape or (3, 4), generator=_GEN) > 0.5


def c(*shape: int) -> torch.Tensor:
    return torch.complex(x(*shape), x(*shape))


def spd(size: int = 3) -> torch.Tensor:
    """A symmetric positive definite matrix (cholesky, inv, solve...)."""
    a = x(size, size)
    return a @ a.T + torch.eye(size)


def special() -> torch.Tensor:
    """(3, 4) floats with a nan, an inf and a -inf."""
    t = x()
    t[0, 0], t[1, 1], t[2, 2] = float("nan"), float("inf"), float("-inf")
    return t


def idx(*rows: list[int]) -> torch.Tensor:
    """A fixed index tensor (scatter/index_copy need distinct indices to be deterministic)."""
    return torch.tensor(rows[0] if len(rows) == 1 else list(rows))


def unary() -> Call:
    return call(x())


def binary() -> Call:
    return call(x(), x())


# Defaults: ops that take one (3, 4) tensor, or two.
_UNARY = """
abs absolute acos all amax amin aminmax angle any arccos arcsin arctan argmax argmin argsort
argwhere asin asinh atan atanh bfloat16 bool byte ceil char clone conj contiguous corrcoef cos
cosh count_nonzero cov cpu deg2rad detach diag diag_embed diagflat diagonal diff digamma dim
double element_size erf erfc erfinv exp exp2 expm1 fliplr flipud float floor frac half i0 int
is_contiguous is_floating_point isreal lgamma long matrix_norm matrix_rank max mean median min
mode msort ndimension neg negative nelement nonzero norm numel pinv pinverse positive prod
rad2deg ravel reciprocal relu resolve_conj resolve_neg round sgn short sigmoid sign signbit sin
sinc sinh size sort square std std_mean sum svd svdvals t tan tanh trace trapezoid tril triu
trunc unique unique_consecutive var var_mean vector_norm celu elu gelu glu hardshrink hardsigmoid
hardswish hardtanh leaky_relu logsigmoid mish normalize relu6 rrelu selu silu softplus
softshrink softsign tanhshrink dropout gumbel_softmax qr
"""
_BINARY = """
add allclose arctan2 atan2 cdist complex copy_ cosine_similarity div divide dist eq equal
floor_divide fmax fmin fmod ge greater greater_equal gt heaviside huber_loss hypot inner
isclose kron l1_loss le less less_equal logaddexp logaddexp2 logical_and logical_or logical_xor
lt maximum minimum mse_loss mul multiply ne nextafter not_equal pairwise_distance remainder
smooth_l1_loss sub subtract true_divide vecdot
"""

#: Each op's sample call, by op id (``torch.linalg.cross``, ``Tensor.where``) or, shared by every
#: op of that name, by bare name; an in-place method without one uses its out-of-place form's.
SAMPLES: dict[str, Callable[[], Call]] = {
    **dict.fromkeys(_UNARY.split(), unary),
    **dict.fromkeys(_BINARY.split(), binary),
    # positive inputs, nan/inf inputs
    **dict.fromkeys("log log10 log1p log2 sqrt rsqrt logit".split(), lambda: call(p())),
    **dict.fromkeys(
        "isfinite isinf isnan isneginf isposinf nan_to_num nanmean nanmedian nansum".split(),
        lambda: call(special()),
    ),
    "acosh": lambda: call(p() + 1),
    "mvlgamma": lambda: call(p() + 1, 2),
    "nanquantile": lambda: call(special(), 0.3),
    "quantile": lambda: call(x(), 0.3),
    "pow": lambda: call(p(), x()),
    "float_power": lambda: call(p(), x()),
    "xlogy": lambda: call(x(), p()),
    "polar": lambda: call(p(), x()),
    "ldexp": lambda: call(x(), n(high=3)),
    # products
    "addbmm": lambda: call(x(3, 5), x(2, 3, 4), x(2, 4, 5)),
    "addcdiv": lambda: call(x(), x(), p()),
    "addcmul": lambda: call(x(), x(), x()),
    "addmm": lambda: call(x(3, 5), x(3, 4), x(4, 5)),
    "addmv": lambda: call(x(3), x(3, 4), x(4)),
    "addr": lambda: call(x(), x(3), x(4)),
    "baddbmm": lambda: call(x(2, 3, 5), x(2, 3, 4), x(2, 4, 5)),
    "bmm": lambda: call(x(2, 3, 4), x(2, 4, 5)),
    "dot": lambda: call(x(4), x(4)),
    "vdot": lambda: call(x(4), x(4)),
    "einsum": lambda: call("ij,kj->ik", x(), x()),
    "matmul": lambda: call(x(3, 4), x(4, 5)),
    "mm": lambda: call(x(3, 4), x(4, 5)),
    "mv": lambda: call(x(3, 4), x(4)),
    "outer": lambda: call(x(3), x(4)),
    "tensordot": lambda: call(x(3, 4), x(4, 5), 1),
    "torch.linalg.multi_dot": lambda: call([x(2, 3), x(3, 4), x(4, 2)]),
    "cross": lambda: call(x(3, 4), x(3, 4), dim=0),
    "torch.linalg.cross": lambda: call(x(4, 3), x(4, 3)),
    # linear algebra on a symmetric positive definite matrix
    **dict.fromkeys(
        "cholesky cond det eig eigh eigvals eigvalsh inv logdet lu slogdet".split(),
        lambda: call(spd()),
    ),
    "lstsq": lambda: call(spd(), x(3, 2)),
    "solve": lambda: call(spd(), x(3, 2)),
    "matrix_power": lambda: call(spd(), 2),
    # factories
    "arange": lambda: call(5),
    "empty": lambda: call(2, 3),
    "eye": lambda: call(3),
    "full": lambda: call((2, 3), 1.5),
    "linspace": lambda: call(0.0, 1.0, 5),
    "logspace": lambda: call(0.0, 1.0, 5),
    "ones": lambda: call(2, 3),
    "zeros": lambda: call(2, 3),
    "rand": lambda: call(2, 3),
    "randn": lambda: call(2, 3),
    "randint": lambda: call(0, 10, (2, 3)),
    "randperm": lambda: call(5),
    "tensor": lambda: call([1.0, 2.0]),
    "tril_indices": lambda: call(3, 3),
    "triu_indices": lambda: call(3, 3, 1),
    **dict.fromkeys(
        "empty_like ones_like zeros_like rand_like randn_like".split(), lambda: call(x())
    ),
    "full_like": lambda: call(x(), 2.0),
    "randint_like": lambda: call(x(), 10),
    # random draws
    "bernoulli": lambda: call(p()),
    "multinomial": lambda: call(p(), 2),
    "normal": lambda: call(x(), p()),
    "normal_": lambda: call(x(), 0.0, 2.0),
    "uniform_": lambda: call(x(), -2.0, 2.0),
    # integers and booleans
    "bincount": lambda: call(n(6)),
    **dict.fromkeys("bitwise_and bitwise_or bitwise_xor gcd lcm".split(), lambda: call(n(), n())),
    "bitwise_not": lambda: call(n()),
    "logical_not": lambda: call(b()),
    "isin": lambda: call(n(), n(3)),
    "histc": lambda: call(x(), 4),
    "bucketize": lambda: call(x(), torch.linspace(-0.5, 0.5, 3)),
    "searchsorted": lambda: call(torch.linspace(-0.5, 0.5, 3), x()),
    "unravel_index": lambda: call(n(4, high=12), (3, 4)),
    # joining and splitting
    **dict.fromkeys("cat concat concatenate stack hstack vstack".split(), lambda: call([x(), x()])),
    "dstack": lambda: call([x(), x()]),
    "column_stack": lambda: call([x(3), x(3, 2)]),
    "block_diag": lambda: call(x(2, 2), x(3)),
    "broadcast_tensors": lambda: call(x(3, 1), x(1, 4)),
    "cartesian_prod": lambda: call(x(2), x(3)),
    "combinations": lambda: call(x(4), 2),
    "chunk": lambda: call(x(), 2),
    "split": lambda: call(x(), 2),
    "tensor_split": lambda: call(x(), 3, 1),
    "hsplit": lambda: call(x(), 2),
    "vsplit": lambda: call(x(4, 3), 2),
    "dsplit": lambda: call(x(2, 2, 4), 2),
    "unbind": lambda: call(x()),
    # shapes and views
    "as_strided_copy": lambda: call(x(), (2, 2), (1, 2)),
    "broadcast_to": lambda: call(x(3, 1), (3, 4)),
    "expand": lambda: call(x(3, 1), 3, 4),
    "expand_as": lambda: call(x(3, 1), x()),
    "flatten": lambda: call(x(2, 3, 2)),
    "unflatten": lambda: call(x(), 1, (2, 2)),
    "flip": lambda: call(x(), (0,)),
    "roll": lambda: call(x(), 1, 1),
    "rot90": lambda: call(x()),
    "permute": lambda: call(x(), (1, 0)),
    **dict.fromkeys("movedim moveaxis".split(), lambda: call(x(2, 3, 4), 0, 2)),
    **dict.fromkeys("swapaxes swapdims transpose".split(), lambda: call(x(), 0, 1)),
    "narrow": lambda: call(x(), 1, 1, 2),
    "narrow_copy": lambda: call(x(), 1, 1, 2),
    "select": lambda: call(x(), 1, 2),
    "select_scatter": lambda: call(x(), x(3), 1, 2),
    "slice_scatter": lambda: call(x(), x(3, 2), 1, 0, 2),
    "repeat": lambda: call(x(), 2, 1),
    "repeat_interleave": lambda: call(x(), 2),
    "reshape": lambda: call(x(), (4, 3)),
    "reshape_as": lambda: call(x(), x(4, 3)),
    "view": lambda: call(x(), 4, 3),
    "view_as": lambda: call(x(), x(4, 3)),
    "squeeze": lambda: call(x(3, 1, 4)),
    "unsqueeze": lambda: call(x(), 0),
    "tile": lambda: call(x(), (2, 1)),
    "unfold": lambda: call(x(), 1, 2, 1),
    "vander": lambda: call(x(3)),
    "view_as_complex": lambda: call(x(3, 2)),
    "view_as_real": lambda: call(c(3)),
    # dtypes and devices
    "to": lambda: call(x(), torch.float64),
    "type_as": lambda: call(x(), n(2)),
    "new_empty": lambda: call(x(), (2, 3)),
    "new_full": lambda: call(x(), (2, 3), 1.5),
    "new_ones": lambda: call(x(), (2, 3)),
    "new_zeros": lambda: call(x(), (2, 3)),
    "new_tensor": lambda: call(x(), [1.0, 2.0]),
    # reductions and scans along a dim
    **dict.fromkeys(
        "cummax cummin cumprod cumsum logcumsumexp logsumexp log_softmax softmax softmin".split(),
        lambda: call(x(), 1),
    ),
    "kthvalue": lambda: call(x(), 2),
    "topk": lambda: call(x(), 2),
    "renorm": lambda: call(x(), 2, 0, 1.0),
    "pdist": lambda: call(x()),
    # indexing
    "clamp": lambda: call(x(), -0.5, 0.5),
    "clip": lambda: call(x(), -0.5, 0.5),
    "clamp_max": lambda: call(x(), 0.2),
    "clamp_min": lambda: call(x(), -0.2),
    "gather": lambda: call(x(), 1, n(3, 2, high=4)),
    "take": lambda: call(x(), n(5, high=12)),
    "take_along_dim": lambda: call(x(), n(3, 2, high=4), 1),
    "index_select": lambda: call(x(), 0, idx([2, 0])),
    "index_add": lambda: call(x(), 0, idx([2, 0]), x(2, 4)),
    "index_copy": lambda: call(x(), 0, idx([2, 0]), x(2, 4)),
    "index_fill": lambda: call(x(), 1, idx([0, 2]), -1.0),
    "index_put": lambda: call(x(), (idx([2, 0]),), x(2, 4)),
    "index_reduce": lambda: call(x(), 0, idx([2, 0]), x(2, 4), "prod"),
    "masked_fill": lambda: call(x(), b(), -1.0),
    "masked_scatter": lambda: call(x(), b(), x()),
    "masked_select": lambda: call(x(), b()),
    "scatter": lambda: call(x(), 1, idx([0, 1], [1, 2], [2, 3]), x(3, 2)),
    "scatter_add": lambda: call(x(), 1, idx([0, 1], [1, 2], [2, 3]), x(3, 2)),
    "scatter_reduce": lambda: call(x(), 1, idx([0, 1], [1, 2], [2, 3]), x(3, 2), "amax"),
    "where": lambda: call(b(), x(), x()),
    "Tensor.where": lambda: call(x(), b(), x()),
    "lerp": lambda: call(x(), x(), 0.3),
    # in-place methods whose out-of-place sample would not change their input
    "fill_": lambda: call(x(), 0.5),
    "fill_diagonal_": lambda: call(x(), 1.0),
    "zero_": lambda: call(x()),
    # torch.nn.functional
    "adaptive_avg_pool1d": lambda: call(x(1, 2, 6), 3),
    "avg_pool1d": lambda: call(x(1, 2, 6), 2),
    "max_pool1d": lambda: call(x(1, 2, 6), 2),
    "batch_norm": lambda: call(x(2, 3, 4), x(3), p(3)),
    "binary_cross_entropy": lambda: call(p(), p()),
    "binary_cross_entropy_with_logits": lambda: call(x(), p()),
    "conv1d": lambda: call(x(1, 2, 5), x(3, 2, 2)),
    "conv2d": lambda: call(x(1, 2, 4, 4), x(3, 2, 2, 2)),
    "cosine_embedding_loss": lambda: call(x(), x(), idx([1.0, -1.0, 1.0])),
    "soft_margin_loss": lambda: call(x(), idx([1.0, -1.0, 1.0, -1.0])),
    "triplet_margin_loss": lambda: call(x(), x(), x()),
    "cross_entropy": lambda: call(x(), n(3, high=4)),
    "nll_loss": lambda: call(x(), n(3, high=4)),
    "kl_div": lambda: call(x(), p(), reduction="batchmean"),
    "embedding": lambda: call(n(2, 3), x(5, 4)),
    "one_hot": lambda: call(n(3), 5),
    "group_norm": lambda: call(x(2, 4, 3), 2),
    "instance_norm": lambda: call(x(2, 3, 4)),
    "layer_norm": lambda: call(x(), (4,)),
    "rms_norm": lambda: call(x(), (4,)),
    "local_response_norm": lambda: call(x(1, 3, 4), 2),
    "linear": lambda: call(x(), x(5, 4), x(5)),
    "pad": lambda: call(x(), (1, 2)),
    "prelu": lambda: call(x(), p(4)),
    "threshold": lambda: call(x(), 0.2, -1.0),
    "scaled_dot_product_attention": lambda: call(x(1, 2, 3, 4), x(1, 2, 3, 4), x(1, 2, 3, 4)),
    # operator
    **dict.fromkeys(("operator.and_", "operator.or_", "operator.xor"), lambda: call(b(), b())),
    "operator.invert": lambda: call(b()),
    **dict.fromkeys(("operator.lshift", "operator.rshift"), lambda: call(n(), n(high=3))),
    **dict.fromkeys(("operator.floordiv", "operator.mod", "operator.truediv"), binary),
    "operator.pos": unary,
    "operator.getitem": lambda: call(x(), (slice(None), 1)),
    "operator.setitem": lambda: call(x(), (0,), x(4)),
    # attributes (complex where a real tensor would make the op trivial or fail)
    **dict.fromkeys(
        ("Tensor.T", "Tensor.mT", "Tensor.shape", "Tensor.dtype", "Tensor.device"), unary
    ),
    **dict.fromkeys(
        ("Tensor.ndim", "Tensor.is_cuda", "Tensor.is_leaf", "Tensor.requires_grad"), unary
    ),
    **dict.fromkeys(("Tensor.H", "Tensor.mH", "Tensor.real", "Tensor.imag"), lambda: call(c(3, 4))),
}

#: Allowed ops that are not run, and why.
SKIP = {
    "Tensor.cuda": "needs a CUDA device",
    # These three are methods only because ops._methods() takes the last part of every
    # torch.linalg name; torch removed them as methods (they raise).
    "Tensor.eig": "removed from torch: raises",
    "Tensor.lstsq": "removed from torch: raises",
    "Tensor.solve": "removed from torch: raises",
    "Tensor.grad": "a gradient is read inside `with loss.backward():` (test_gradients.py)",
}

#: Ops run here only. A server decodes its inputs as views of the request's frames, so they
#: are views where the same inputs here are not.
LOCAL_ONLY = {"Tensor.detach_": "torch refuses detach_ on a view"}

#: Ops whose last bits differ from run to run on the same inputs: compared with tolerances.
APPROXIMATE = {"torch.linalg.lstsq": "LAPACK's least squares driver"}

#: Ops that return uninitialized memory: only their shape and dtype are compared.
UNINITIALIZED = frozenset(("torch.empty", "torch.empty_like", "Tensor.new_empty"))

#: Ops that warn, as deprecated or beta (the suite turns warnings into errors).
WARNS = frozenset(
    ("Tensor.cholesky", "Tensor.lu", "Tensor.qr", "torch.index_reduce", "Tensor.index_reduce")
)

#: Calls that record no node of their own name, and what they record instead. Sizes are
#: answered in the block from shapes (``None``: the test also records them with
#: ``tracer.apply``, so the executor and the server run them). Two functionals are Python
#: functions that call a tensor method.
RECORDED_AS: dict[str, tuple[str, str] | None] = {
    **dict.fromkeys(
        f"Tensor.{name}"
        for name in """size dim numel ndimension nelement element_size is_floating_point
        is_contiguous shape dtype device ndim is_cuda""".split()
    ),
    "torch.nn.functional.sigmoid": ("method", "sigmoid"),
    "torch.nn.functional.tanh": ("method", "tanh"),
}


# -- the ops ---------------------------------------------------------------------------------


def all_ops() -> list[str]:
    """Every allow-listed op: function names, ``Tensor.<method>``, ``Tensor.<attribute>``."""
    names = sorted(ops._functions())
    names += sorted(f"Tensor.{m}" for m in ops._methods())
    names += sorted(f"Tensor.{a}" for a in ops.TENSOR_ATTRIBUTES)
    return names


def kind(op: str) -> tuple[str, str]:
    """The graph op and target an op id records as (``("method", "add")``...)."""
    if not op.startswith("Tensor."):
        return "function", op
    name = op.removeprefix("Tensor.")
    return ("method", name) if ops.is_method(name) else ("getattr", name)


def sample_key(op: str) -> str | None:
    """The :data:`SAMPLES` key of ``op``: its own, its bare name's, or (``add_``) ``add``'s."""
    bare = op.rpartition(".")[2]
    candidates = [op, bare]
    if op.startswith("Tensor.") and bare.endswith("_"):
        candidates += [op[:-1], bare[:-1]]
    return next((k for k in candidates if k in SAMPLES), None)


def sample(op: str) -> Call:
    _GEN.manual_seed(0)
    return SAMPLES[sample_key(op)]()


def invoke(op: str, args: tuple, kwargs: dict) -> Any:
    """Call ``op`` as user code would: the function, the method, or the attribute read."""
    what, target = kind(op)
    if what == "function":
        return ops.resolve_function(target)(*args, **kwargs)
    if what == "method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    return getattr(args[0], target)


def tensors_of(value: Any) -> list[torch.Tensor]:
    return [t for t in tree.leaves(value) if isinstance(t, torch.Tensor)]


# -- running it three ways ---------------------------------------------------------------------


def eager(op: str, args: tuple, kwargs: dict) -> tuple[Any, list[torch.Tensor]]:
    """The result, and every input tensor afterwards."""
    args, kwargs = copy.deepcopy((args, kwargs))
    torch.default_generator.manual_seed(0)
    return invoke(op, args, kwargs), tensors_of((args, kwargs))


def recorded(
    model: lt.Model, op: str, args: tuple, kwargs: dict, remote: Any = False
) -> tuple[Any, list[torch.Tensor]]:
    """The same, recorded on the output of ``model`` (``nn.Identity`` of the inputs)."""
    args, kwargs = copy.deepcopy((args, kwargs))
    inputs = tensors_of((args, kwargs))
    torch.default_generator.manual_seed(0)
    with model.trace(inputs, remote=remote) as tracer:
        out = model.output
        proxies = [out[i].save() for i in range(len(inputs))]
        by_id = {id(t): proxy for t, proxy in zip(inputs, proxies)}
        pargs, pkwargs = tree.map(lambda v: by_id.get(id(v), v), (args, kwargs))
        start = len(tracer.graph.nodes)
        result = answered = invoke(op, pargs, pkwargs)
        if op in RECORDED_AS and RECORDED_AS[op] is None:  # answered without a node
            result = tracer.apply(*kind(op), pargs, pkwargs)
        nodes = {(node.op, node.target) for node in tracer.graph.nodes[start:]}
        if isinstance(result, lt.Proxy):
            result.save()
    assert_recorded(op, nodes)
    # After the block the trace has put the values in place of the saved proxies.
    if answered is not result:
        assert_same(answered, real(result), where="the value answered in the block")
    return real(result), [real(proxy) for proxy in proxies]


def real(value: Any) -> Any:
    return value.value if isinstance(value, lt.Proxy) else value


def assert_recorded(op: str, nodes: set[tuple[str, str]]) -> None:
    what, target = RECORDED_AS.get(op) or kind(op)
    if what == "function":
        fn = ops.resolve_function(target)
        found = any(o == "function" and ops.resolve_function(t) is fn for o, t in nodes)
    else:
        found = (what, target) in nodes
    assert found, f"{op} recorded {sorted(nodes)}, not a {what} node {target!r}"


def assert_same(got: Any, want: Any, how: str = "exact", where: str = "result") -> None:
    """Equal values (nan equal to nan), containers compared item by item.

    ``how`` is ``"exact"``, ``"close"`` (default float tolerances) or ``"shape"``.
    """
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__}, not a tensor"
        assert (got.shape, got.dtype) == (want.shape, want.dtype), where
        if how != "shape":
            tolerance = {} if how == "close" else {"rtol": 0, "atol": 0}
            torch.testing.assert_close(
                got, want, equal_nan=True, msg=lambda m: f"{where}: {m}", **tolerance
            )
    elif isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), where
        assert fields(got) == fields(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, how, f"{where}[{i}]")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


def fields(value: tuple | list) -> tuple[str, ...] | None:
    """A named tuple's field names (a ``torch.return_types`` one's too)."""
    return getattr(type(value), "__match_args__", None)


@pytest.fixture(scope="module")
def server() -> Iterator[Client]:
    """A client of an in-process server that serves ``nn.Identity`` as :data:`IDENTITY`."""
    service = Service([ServedModel.wrap(IDENTITY, torch.nn.Identity())])
    yield in_process(service, timeout=30.0)
    service.shutdown(grace=5.0)


@pytest.fixture(scope="module")
def model() -> lt.Model:
    return lt.Model(torch.nn.Identity(), name=IDENTITY)


@pytest.fixture(autouse=True)
def _own_rng() -> Iterator[None]:
    """The runs seed the global RNG; give it back as it was."""
    with torch.random.fork_rng(devices=[]):
        yield


RUN = [op for op in all_ops() if op not in SKIP]


@pytest.mark.parametrize("op", RUN)
def test_recorded_equals_eager_here_and_on_a_server(op: str, model: lt.Model, server: Client):
    args, kwargs = sample(op)
    with warnings.catch_warnings():
        if op in WARNS:
            warnings.simplefilter("ignore", UserWarning)
        want, want_inputs = eager(op, args, kwargs)
        local, local_inputs = recorded(model, op, args, kwargs)
        if op not in LOCAL_ONLY:
            remote, remote_inputs = recorded(model, op, args, kwargs, remote=server)
    how = "shape" if op in UNINITIALIZED else "close" if op in APPROXIMATE else "exact"
    assert_same(local, want, how)
    assert_same(local_inputs, want_inputs, where="inputs after the op")
    if op in LOCAL_ONLY:
        return
    assert_same(remote, local, how, where="remote result")
    assert_same(remote_inputs, local_inputs, where="remote inputs after the op")


def _first_is_a_tensor(op: str) -> bool:
    args, _ = sample(op)
    return bool(args) and isinstance(args[0], torch.Tensor)


@pytest.mark.parametrize("op", [op for op in RUN if _first_is_a_tensor(op)])
def test_facts_match_what_the_op_does(op: str) -> None:
    """An op that writes into its first argument, or returns its memory, says so in its facts.

    Checked on the eager run of each sample: the first argument changed (values or shape) iff
    ``facts.writes``; a result tensor shares its storage only if ``facts.aliases``.
    """
    args, kwargs = sample(op)
    first = args[0]
    facts = ops.facts(*kind(op))
    before = first.clone()
    with warnings.catch_warnings():
        if op in WARNS:
            warnings.simplefilter("ignore", UserWarning)
        torch.default_generator.manual_seed(0)
        result = invoke(op, args, kwargs)
    changed = first.shape != before.shape or not bool(
        ((first == before) | (first.isnan() & before.isnan())).all()
    )
    if op != "Tensor.detach_":  # writes (requires_grad) but changes no value
        assert changed == facts.writes, f"{op} changed its input: {changed}; {facts}"
    storage = first.untyped_storage().data_ptr()
    shares = any(
        t.numel() > 0 and t.untyped_storage().data_ptr() == storage for t in tensors_of(result)
    )
    assert facts.aliases or not shares, f"{op} returned its input's memory; {facts}"


def test_every_allowed_op_has_a_sample() -> None:
    missing = [op for op in all_ops() if op not in SKIP and sample_key(op) is None]
    assert not missing, f"add a sample to SAMPLES for: {', '.join(missing)}"
    unused = set(SAMPLES) - {sample_key(op) for op in all_ops()}
    assert not unused, f"samples for no allowed op: {sorted(unused)}"
    for table in (SKIP, LOCAL_ONLY, APPROXIMATE, RECORDED_AS, UNINITIALIZED, WARNS):
        assert set(table) <= set(all_ops()), set(table) - set(all_ops())
