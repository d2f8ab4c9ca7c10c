"""The op allow-list: which functions, methods and attributes a graph may use, by name.

This is the security boundary of the project. A graph names its functions as strings
(``"torch.add"``, ``"torch.nn.functional.softmax"``, ``"operator.getitem"``); the executor
resolves them here and nowhere else, so nothing outside these hand-written lists can run:
no ``torch.load``/``torch.save``/``torch.from_file``, no storage or pointer access, no
``torch.hub`` or ``torch.distributed``, no ``setattr``, no lookup by reflection on a name the
peer chose. Adding an op is one line in a list below and one test.

Each allowed op also has *facts* (:func:`facts`): whether it writes into its first argument
(``x.add_(1)``, ``x[i] = v``) and whether its result shares memory with its first argument (a
view such as ``x.transpose(0, 1)`` or ``x[:, -1]``). The executor uses them to check that an
in-place write lands while its module still runs; a test checks them against ATen's schema
annotations.

The recorder uses the reverse direction: :func:`function_name` maps a callable that reached
``__torch_function__`` back to its allow-listed name, or raises :class:`OpNotAllowedError`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import LimitExceeded, OpNotAllowedError

_TORCH = """
abs absolute acos acosh add addbmm addcdiv addcmul addmm addmv addr all allclose amax amin
aminmax angle any arange arccos arcsin arctan arctan2 argmax argmin argsort argwhere as_strided_copy
asin asinh atan atan2 atanh baddbmm bernoulli bincount bitwise_and bitwise_not bitwise_or
bitwise_xor block_diag bmm broadcast_tensors broadcast_to bucketize cartesian_prod cat cdist ceil
chunk clamp clamp_max clamp_min clip clone column_stack combinations complex concat concatenate
conj corrcoef cos cosh cosine_similarity count_nonzero cov cross cummax cummin cumprod cumsum
deg2rad diag diag_embed diagflat diagonal diff digamma dist div divide dot dsplit dstack einsum
empty empty_like eq equal erf erfc erfinv exp exp2 expm1 eye flatten flip fliplr flipud
float_power floor floor_divide fmax fmin fmod frac full full_like gather gcd ge greater
greater_equal gt heaviside histc hsplit hstack hypot i0 index_add index_copy index_fill
index_put index_reduce index_select inner isclose isfinite isin isinf isnan isneginf isposinf
isreal kron kthvalue lcm ldexp le lerp less less_equal lgamma linspace log log10 log1p log2
log_softmax logaddexp logaddexp2 logcumsumexp logdet logical_and logical_not logical_or
logical_xor logit logspace logsumexp lt masked_fill masked_scatter masked_select
matmul max maximum mean median min minimum mm mode moveaxis movedim msort mul multinomial
multiply mv mvlgamma nan_to_num nanmean nanmedian nanquantile nansum narrow narrow_copy ne neg
negative nextafter nonzero norm normal not_equal numel ones ones_like outer pairwise_distance
pdist permute pinverse polar positive pow prod quantile rad2deg rand rand_like randint
randint_like randn randn_like randperm ravel reciprocal relu remainder renorm repeat_interleave
reshape resolve_conj resolve_neg roll rot90 round rsqrt scatter scatter_add scatter_reduce
searchsorted select select_scatter sgn sigmoid sign signbit sin sinc sinh slice_scatter slogdet
softmax sort split sqrt square squeeze stack std std_mean sub subtract sum svd swapaxes
swapdims t take take_along_dim tan tanh tensor tensor_split tensordot tile topk trace transpose
trapezoid tril tril_indices triu triu_indices true_divide trunc unbind unflatten unique
unique_consecutive unravel_index unsqueeze vander var var_mean vdot view_as_complex
view_as_real vsplit vstack where xlogy zeros zeros_like
"""

_LINALG = """
cholesky cond cross det diagonal eig eigh eigvals eigvalsh inv lstsq lu matmul matrix_norm
matrix_power matrix_rank multi_dot norm pinv qr slogdet solve svd svdvals vector_norm vecdot
"""

_FUNCTIONAL = """
adaptive_avg_pool1d avg_pool1d batch_norm binary_cross_entropy binary_cross_entropy_with_logits
celu conv1d conv2d cosine_embedding_loss cosine_similarity cross_entropy dropout elu embedding
gelu glu group_norm gumbel_softmax hardshrink hardsigmoid hardswish hardtanh huber_loss
instance_norm kl_div l1_loss layer_norm leaky_relu linear local_response_norm log_softmax
logsigmoid max_pool1d mish mse_loss nll_loss normalize one_hot pad pairwise_distance prelu relu
relu6 rms_norm rrelu scaled_dot_product_attention selu sigmoid silu smooth_l1_loss soft_margin_loss
softmax softmin softplus softshrink softsign tanh tanhshrink threshold triplet_margin_loss
"""

_OPERATOR = """
abs add and_ eq floordiv ge getitem gt invert le lshift lt matmul mod mul ne neg or_ pos pow
rshift setitem sub truediv xor
"""

#: Tensor methods beyond those that share a name with an allowed ``torch.*`` function.
_METHODS_ONLY = """
abs_ add_ addcdiv_ addcmul_ bfloat16 bool byte char clamp_ clamp_max_ clamp_min_ contiguous
copy_ cpu cuda detach detach_ dim div_ double element_size exp_ expand expand_as fill_
fill_diagonal_ float floor_ half index_add_ index_copy_ index_fill_ index_put_ int is_contiguous
is_floating_point lerp_ log_ long masked_fill_ masked_scatter_ mul_ nan_to_num_ ndimension
neg_ nelement new_empty new_full new_ones new_tensor new_zeros normal_ pow_ reciprocal_ relu_
repeat reshape_as round_ rsqrt_ scatter_ scatter_add_ scatter_reduce_ short sigmoid_ size sqrt_
square_ squeeze_ sub_ t_ tanh_ to transpose_ tril_ triu_ trunc_ type_as uniform_ unfold
unsqueeze_ view view_as zero_ clamp_ abs_ sign_ sin_ cos_ exp_ log_softmax softmax
"""

#: Non-method attributes a ``getattr`` node may read on a tensor.
TENSOR_ATTRIBUTES = frozenset(
    "T mT H mH real imag shape dtype device ndim is_cuda is_leaf requires_grad grad".split()
)

#: Functions that build a tensor from nothing: captured inside a trace even with no proxy
#: among their arguments, so they run where the graph runs.
FACTORIES = frozenset(
    f"torch.{name}"
    for name in """arange empty eye full linspace logspace ones rand randint randn randperm
    tensor tril_indices triu_indices zeros""".split()
)

#: Names (without a ``torch.`` prefix) whose result may share memory with their first
#: argument: views, and ops that return their input itself when nothing needs to change
#: (``contiguous``, ``to``, ``reshape``, ``detach``, ``conj`` of a real tensor, ``dropout`` when
#: not training, ``cartesian_prod`` of one tensor). Attribute reads ``T``/``mT``/``H``/``mH``/
#: ``real``/``imag`` are views too. ``tests/test_ops.py`` checks this against ATen's schemas.
ALIASING = frozenset(
    """getitem view view_as reshape reshape_as transpose permute narrow select unsqueeze
    squeeze expand expand_as t flatten unflatten split chunk unbind diagonal movedim moveaxis
    swapaxes swapdims detach contiguous to unfold T mT H mH real imag tensor_split hsplit vsplit
    dsplit view_as_real view_as_complex ravel broadcast_to broadcast_tensors type_as conj
    resolve_conj resolve_neg positive pos cpu cuda float double half bfloat16 int long short
    bool byte char dropout cartesian_prod""".split()
)

#: Function names (fully qualified) that write into their first argument.
_WRITING_FUNCTIONS = frozenset(("operator.setitem",))


@dataclass(frozen=True, slots=True)
class OpFacts:
    """What an op does to its first argument's memory."""

    writes: bool = False  # it writes into its first argument (in place)
    aliases: bool = False  # its result may share memory with its first argument


_PLAIN = OpFacts()


#: Python operator dunders of ``torch.Tensor`` and the allow-listed function they mean.
#: Reflected forms (``__radd__``) swap their two arguments.
DUNDERS = {
    "__add__": "operator.add", "__sub__": "operator.sub", "__mul__": "operator.mul",
    "__truediv__": "operator.truediv", "__floordiv__": "operator.floordiv",
    "__mod__": "operator.mod", "__pow__": "operator.pow", "__matmul__": "operator.matmul",
    "__and__": "operator.and_", "__or__": "operator.or_", "__xor__": "operator.xor",
    "__lshift__": "operator.lshift", "__rshift__": "operator.rshift",
    "__eq__": "operator.eq", "__ne__": "operator.ne", "__lt__": "operator.lt",
    "__le__": "operator.le", "__gt__": "operator.gt", "__ge__": "operator.ge",
    "__neg__": "operator.neg", "__pos__": "operator.pos", "__abs__": "operator.abs",
    "__invert__": "operator.invert", "__getitem__": "operator.getitem",
    "__setitem__": "operator.setitem",
}  # fmt: skip
REFLECTED = {
    "__radd__": "operator.add", "__rsub__": "operator.sub", "__rmul__": "operator.mul",
    "__rtruediv__": "operator.truediv", "__rfloordiv__": "operator.floordiv",
    "__rmod__": "operator.mod", "__rpow__": "operator.pow", "__rmatmul__": "operator.matmul",
    "__rand__": "operator.and_", "__ror__": "operator.or_", "__rxor__": "operator.xor",
}  # fmt: skip
INPLACE = {
    "__iadd__": "add_", "__isub__": "sub_", "__imul__": "mul_", "__itruediv__": "div_",
    "__ipow__": "pow_",
}  # fmt: skip


@functools.cache
def _functions() -> dict[str, Callable[..., Any]]:
    import torch
    import torch.nn.functional as F

    table: dict[str, Callable[..., Any]] = {}
    for names, owner, prefix in (
        (_TORCH, torch, "torch."),
        (_LINALG, torch.linalg, "torch.linalg."),
        (_FUNCTIONAL, F, "torch.nn.functional."),
        (_OPERATOR, operator, "operator."),
    ):
        for name in names.split():
            fn = getattr(owner, name, None)
            if fn is not None:
                table[prefix + name] = fn
    return table


@functools.cache
def _methods() -> frozenset[str]:
    import torch

    names = {n.split(".")[-1] for n in _functions() if n.startswith("torch.")}
    names.update(_METHODS_ONLY.split())
    return frozenset(n for n in names if hasattr(torch.Tensor, n))


@functools.cache
def _names_by_function() -> dict[int, str]:
    return {id(fn): name for name, fn in _functions().items()}


def resolve_function(name: str) -> Callable[..., Any]:
    """The callable an allow-listed function name stands for."""
    fn = _functions().get(name)
    if fn is None:
        raise OpNotAllowedError(
            f"function {name!r} is not in lazytensor's op allow-list; "
            "use a torch, torch.nn.functional or operator function from lazytensor.ops"
        )
    return fn


#: Ops that return uninitialized memory run as their zero-filled twins: memory another run (on
#: a server, another user's) freed must never reach a client. Same shapes, dtypes and devices.
_ZEROED_FUNCTIONS = {"torch.empty": "torch.zeros", "torch.empty_like": "torch.zeros_like"}
_ZEROED_METHODS = {"new_empty": "new_zeros"}


@functools.cache
def runnable_function(name: str) -> Callable[..., Any]:
    """What a replay calls for the allow-listed function ``name`` (see ``_ZEROED_FUNCTIONS``)."""
    return resolve_function(_ZEROED_FUNCTIONS.get(name, name))


def runnable_method(name: str) -> str:
    """The tensor method a replay calls for the allow-listed method ``name``."""
    return _ZEROED_METHODS.get(check_method(name), name)


def function_name(fn: Callable[..., Any]) -> str:
    """The allow-listed name of ``fn`` (the reverse of :func:`resolve_function`)."""
    name = _names_by_function().get(id(fn))
    if name is None:
        label = f"{getattr(fn, '__module__', None) or ''}.{getattr(fn, '__name__', fn)}"
        raise OpNotAllowedError(
            f"{label.lstrip('.')} is not in lazytensor's op allow-list, so it cannot be "
            "recorded in a trace; compute it after the trace, or use an allowed op"
        )
    return name


def factory_name(fn: Callable[..., Any]) -> str | None:
    """The allow-listed name of ``fn`` if it is a tensor factory, else ``None``."""
    name = _names_by_function().get(id(fn))
    return name if name in FACTORIES else None


def is_method(name: str) -> bool:
    return name in _methods()


def check_method(name: str) -> str:
    if name not in _methods():
        raise OpNotAllowedError(
            f"tensor method {name!r} is not in lazytensor's op allow-list; "
            "see lazytensor.ops for the methods a trace may call"
        )
    return name


def check_attribute(name: str) -> str:
    """Attributes may be read on any value except private and dunder names."""
    if not name or name.startswith("_") or not name.isidentifier():
        raise OpNotAllowedError(
            f"attribute {name!r} cannot be read in a trace: private and dunder attributes "
            "are not allowed"
        )
    return name


@functools.cache
def facts(op: str, target: str) -> OpFacts:
    """The :class:`OpFacts` of a compute node (``op`` is ``function``, ``method``...).

    >>> facts("method", "add_"), facts("function", "operator.and_").writes
    (OpFacts(writes=True, aliases=True), False)
    >>> facts("function", "torch.transpose").aliases
    True
    """
    if op == "function":
        bare = target.rpartition(".")[2]
        if target in _WRITING_FUNCTIONS:
            return OpFacts(writes=True, aliases=True)
        return OpFacts(aliases=True) if bare in ALIASING else _PLAIN
    if op == "method":
        if target in _in_place_methods():
            return OpFacts(writes=True, aliases=True)
        return OpFacts(aliases=True) if target in ALIASING else _PLAIN
    if op == "getattr":
        return OpFacts(aliases=True) if target in ALIASING else _PLAIN
    return _PLAIN


@functools.cache
def _in_place_methods() -> frozenset[str]:
    """Allowed tensor methods that write into the tensor: ATen's ``name_`` convention."""
    return frozenset(n for n in _methods() if n.endswith("_") and not n.endswith("__"))


#: Bounds on Python values a graph builds with ``operator`` functions, checked before they are
#: built: ``operator.pow(3, 2 * 10**7)`` holds the GIL for seconds, ``"a" * 2**29`` is 512 MiB.
#: A graph's integers are shapes, indices and counts; 65,536 bits is far beyond any of them.
MAX_INT_BITS = 2**16
MAX_ITEMS = 2**20  # of a str, bytes, list or tuple built by ``*`` or ``+``
#: ATen's CPU pooling and convolution kernels index windows with 32-bit integers: a kernel of
#: ``2**40`` makes ``max_pool1d`` loop without end (and without the GIL, so no time limit fires).
INT32_MAX = 2**31 - 1

_SIZED_OPERATORS = frozenset(("operator.pow", "operator.lshift", "operator.mul", "operator.add"))
_WINDOWED = frozenset(
    f"torch.nn.functional.{name}"
    for name in """max_pool1d avg_pool1d adaptive_avg_pool1d conv1d conv2d
    local_response_norm""".split()
)
_SEQUENCES = (str, bytes, list, tuple)


def check_call(name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a call whose result or work has no sane bound, before it runs.

    Raises:
        LimitExceeded: a Python integer over :data:`MAX_INT_BITS` bits, a sequence over
            :data:`MAX_ITEMS` items, or a pooling/convolution size over :data:`INT32_MAX`.
    """
    if name in _SIZED_OPERATORS and len(args) == 2:
        _check_python_result(name, *args)
    elif name in _WINDOWED:
        for value in _ints((args[1:], kwargs)):
            if abs(value) > INT32_MAX:
                raise LimitExceeded(
                    f"{name} got the size {value:,}: pooling and convolution sizes must be at "
                    f"most {INT32_MAX:,} (and at most the input's length to mean anything)"
                )


def _check_python_result(name: str, a: Any, b: Any) -> None:
    if isinstance(a, int) and isinstance(b, int):
        if name == "operator.pow":
            bits = a.bit_length() * b if abs(a) > 1 and b > 0 else 0
        elif name == "operator.lshift":
            bits = a.bit_length() + b if a and b > 0 else 0
        elif name == "operator.mul":
            bits = a.bit_length() + b.bit_length()
        else:
            return  # a sum of bounded integers is bounded
        if bits > MAX_INT_BITS:
            raise LimitExceeded(
                f"{name} would build a Python integer of about {bits:,} bits, over lazytensor's "
                f"bound of {MAX_INT_BITS:,} (lazytensor.core.ops.MAX_INT_BITS); compute with "
                "tensors, or after the trace"
            )
        return
    if name == "operator.mul":
        seq, count = (a, b) if isinstance(b, int) else (b, a)
        if not (isinstance(seq, _SEQUENCES) and isinstance(count, int)):
            return
        items = len(seq) * count
    elif name == "operator.add" and isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        seq, items = a, len(a) + len(b)
    else:
        return
    if items > MAX_ITEMS:
        raise LimitExceeded(
            f"{name} would build a {type(seq).__name__} of {items:,} items, over lazytensor's "
            f"bound of {MAX_ITEMS:,} (lazytensor.core.ops.MAX_ITEMS); build large data as tensors"
        )


def _ints(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (tuple, list)):
        return [i for v in value for i in _ints(v)]
    if isinstance(value, dict):
        return [i for v in value.values() for i in _ints(v)]
    return []
