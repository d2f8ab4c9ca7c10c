"""Bounds: how many bytes one op may allocate, checked from its arguments before it runs.

A server holds every node of a graph to its ``--max-memory`` (:data:`MAX_BYTES`, set by the
worker's thread; ``None`` on a local run, which has no bound). The ops whose output size comes
from their *arguments* rather than from their inputs' shapes (factories such as
``torch.ones(2**28)``, ``repeat``, ``tile``, ``repeat_interleave``, ``bincount``, ``one_hot``,
``new_ones``) are sized before they run; any other op whose input is over the bound (the
``2**28``-element view ``expand`` builds for free, which ``contiguous`` would copy) is refused
before it runs too, and every result is checked after, so a chain never grows past the bound.
A shape-only pass over the whole graph (the server's admission, ``lazytensor_server.admission``)
catches the rest before anything runs.

>>> token = MAX_BYTES.set(2**20)
>>> try:
...     check("torch.ones", (2**28,), {})
... except LimitExceeded as exc:
...     print(str(exc)[:50])
torch.ones would allocate 1,073,741,824 bytes, ove
>>> MAX_BYTES.reset(token)
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any

import torch

from ..core.errors import LimitExceeded

#: The most bytes one op may allocate in this context (a server's ``--max-memory``).
MAX_BYTES: ContextVar[int | None] = ContextVar("lazytensor_max_bytes", default=None)

_SIZE_FIRST = frozenset("ones zeros empty rand randn".split())  # size as *args or one sequence
_NEW = frozenset("new_ones new_zeros new_empty new_full".split())  # methods: size after self
_INDEXES = frozenset("randperm randint tril_indices triu_indices bincount one_hot".split())
#: Ops that only make a view (no new memory) whatever their input holds.
_VIEWS = frozenset(
    """getitem view view_as transpose permute narrow select unsqueeze squeeze expand expand_as
    t unflatten split chunk unbind diagonal movedim moveaxis swapaxes swapdims detach T mT H mH
    real imag tensor_split hsplit vsplit dsplit broadcast_to broadcast_tensors size dim numel
    element_size nelement ndimension is_contiguous is_floating_point""".split()
)


def check(name: str, args: tuple, kwargs: dict) -> None:
    """Refuse the call ``name(*args, **kwargs)`` if it would allocate over :data:`MAX_BYTES`.

    ``name`` is a function's allow-listed name (``torch.ones``) or a tensor method's name.
    """
    limit = MAX_BYTES.get()
    if limit is None:
        return
    bare = name.rpartition(".")[2]
    size = _output_bytes(bare, args, kwargs)
    if size is None and bare not in _VIEWS:
        size = max((_logical(a) for a in args if isinstance(a, torch.Tensor)), default=0)
    if size is not None and size > limit:
        _refuse(name, size, limit)


def check_result(name: str, value: Any) -> None:
    """Refuse a result over :data:`MAX_BYTES` (a size only the run could know)."""
    limit = MAX_BYTES.get()
    if limit is not None and isinstance(value, torch.Tensor):
        size = _logical(value)
        if size > limit and not (name.rpartition(".")[2] in _VIEWS and value._is_view()):
            _refuse(name, size, limit)  # a view's logical size is no memory of its own


def _refuse(name: str, size: int, limit: int) -> None:
    raise LimitExceeded(
        f"{name} would allocate {size:,} bytes, over this server's limit of {limit:,} bytes "
        "per request (--max-memory); compute on less data per request"
    )


def _logical(t: torch.Tensor) -> int:
    """The bytes ``t`` holds once copied: an expanded view counts every element it shows."""
    return t.numel() * t.element_size()


def _output_bytes(bare: str, args: tuple, kwargs: dict) -> int | None:
    """The bytes of ``bare``'s result, from its arguments; ``None`` if not sized here."""
    item = _item_size(bare, kwargs)
    if bare in _SIZE_FIRST:
        return _numel(kwargs.get("size", args)) * item
    if bare == "full":
        return _numel(args[0] if args else kwargs.get("size", ())) * item
    if bare in _NEW and args:
        size = args[1:2] if bare == "new_full" else args[1:]  # new_full(size, fill_value)
        return _numel(kwargs.get("size", size)) * _item_size(bare, kwargs, args[0])
    if bare == "arange":
        return _arange(args, kwargs) * item
    if bare in ("linspace", "logspace"):
        return _int(args[2] if len(args) > 2 else kwargs.get("steps", 0)) * item
    if bare == "eye":
        n = _int(args[0] if args else kwargs.get("n", 0))
        return n * _int(args[1] if len(args) > 1 else kwargs.get("m", n)) * item
    if bare == "randperm":
        return _int(args[0] if args else kwargs.get("n", 0)) * item
    if bare == "randint":
        sized = [a for a in args if isinstance(a, (tuple, list, torch.Size))]
        return _numel(kwargs.get("size", sized[-1] if sized else ())) * item
    if bare in ("tril_indices", "triu_indices"):
        return 2 * _int(args[0] if args else 0) * _int(args[1] if len(args) > 1 else 0) * item
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor):
        return None
    if bare in ("repeat", "tile"):  # x.repeat(2, 3), x.repeat((2, 3)), torch.tile(x, (2, 3))
        return _logical(first) * _numel(kwargs.get("dims", kwargs.get("repeats", args[1:])))
    if bare == "repeat_interleave":
        return _repeat_interleave(first, args, kwargs)
    if bare == "bincount":
        minlength = _int(kwargs.get("minlength", args[2] if len(args) > 2 else 0))
        return max(minlength, _top(first)) * 8
    if bare == "one_hot":
        classes = _int(args[1] if len(args) > 1 else kwargs.get("num_classes", -1))
        return first.numel() * (classes if classes >= 0 else _top(first)) * 8
    if bare == "histc":
        return _int(args[1] if len(args) > 1 else kwargs.get("bins", 100)) * first.element_size()
    if bare == "multinomial":
        rows = first.shape[0] if first.dim() == 2 else 1
        return rows * _int(args[1] if len(args) > 1 else kwargs.get("num_samples", 1)) * 8
    return None


def _repeat_interleave(first: torch.Tensor, args: tuple, kwargs: dict) -> int:
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    if repeats is None:  # torch.repeat_interleave(repeats): the repeats are the input
        return _tensor_sum(first) * 8
    if isinstance(repeats, torch.Tensor):
        if repeats.numel() <= 1:
            return _logical(first) * _tensor_sum(repeats)
        per = first.numel() // max(repeats.numel(), 1)  # elements per repeated slice
        return per * _tensor_sum(repeats) * first.element_size()
    return _logical(first) * _int(repeats)


def _tensor_sum(t: torch.Tensor) -> int:
    real = _real(t)
    return int(real.sum()) if real is not None and real.numel() else 0


def _top(t: torch.Tensor) -> int:
    """One more than the largest value of ``t``: the size ``bincount``/``one_hot`` give."""
    real = _real(t)
    return int(real.max()) + 1 if real is not None and real.numel() else 0


def _real(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s values, if known: a fake tensor knows them when it is a small constant (which
    a shape-only pass computes with for real), else the run itself checks."""
    return getattr(t, "constant", None) if _is_fake(t) else t


def _arange(args: tuple, kwargs: dict) -> int:
    parts = [a for a in args if isinstance(a, (int, float))]
    start, end, step = 0, None, 1
    if len(parts) == 1:
        end = parts[0]
    elif len(parts) >= 2:
        start, end = parts[0], parts[1]
        step = parts[2] if len(parts) > 2 else 1
    start, end, step = kwargs.get("start", start), kwargs.get("end", end), kwargs.get("step", step)
    if not all(isinstance(v, (int, float)) for v in (start, end, step)) or not step:
        return 0  # torch refuses it itself
    count = math.ceil((end - start) / step) if math.isfinite((end - start) / step) else 0
    return max(count, 0)


def _item_size(bare: str, kwargs: dict, like: Any = None) -> int:
    dtype = kwargs.get("dtype")
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if isinstance(like, torch.Tensor):
        return like.element_size()
    if bare in _INDEXES or bare == "arange":
        return 8  # int64, or at most a float64
    return torch.get_default_dtype().itemsize


def _numel(size: Any) -> int:
    """The element count of a size given as ints or one sequence of ints (negative: 0)."""
    if isinstance(size, (tuple, list, torch.Size)):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = size[0]
        return math.prod(max(_int(d), 0) for d in size)
    return max(_int(size), 0)


def _int(value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        real = _real(value)
        return int(real) if real is not None else 0
    return value if isinstance(value, int) else 0


def _is_fake(value: Any) -> bool:
    return type(value).__name__ == "FakeTensor"
