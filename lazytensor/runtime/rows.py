"""Batch rows: how one invoke's slice of the batch is read from and written into a value.

Several invokes run as one forward pass over their concatenated inputs. A point node with
``rows=(start, stop)`` sees only those rows of every tensor whose rows it can place. Reads are
views (``t[start:stop]``), so in-place writes through them land in the real activation, exactly
as the same code in a hook would. Replacing a value for some rows builds a new value with those
rows swapped in.

A :class:`Layout` says how the rows of the current forward relate to the batch's ``size`` rows:

* *expanded* rows: ``generate`` repeats each input row ``k`` times, consecutively
  (``repeat_interleave``) for beams or returned sequences, so batch rows ``(a, b)`` are rows
  ``(a*k, b*k)``;
* *token-major* values: a module that gets the batch flattened to ``(B*T, D)`` (a mixture of
  experts' router) holds batch rows ``(a, b)`` in rows ``(a*T, b*T)``;
* *shared* values: a first dimension of 1 (broadcast), or a vector as long as the forward's
  token count ``T`` (``cache_position``), belongs to every row alike, so a read gets it whole.

Any other first dimension has no known row layout: reading or writing an invoke's rows of it
fails with a :class:`~lazytensor.core.errors.GraphError` rather than handing over the other
invokes' rows. Reads and writes of the whole batch (``rows=None``) never look at the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core import tree
from ..core.errors import GraphError


@dataclass(frozen=True)
class Layout:
    """How the rows of the values a hook sees map onto the batch's rows.

    Attributes:
        size: the batch's rows (what invokes' ``rows`` index).
        factors: each batch row is ``f`` consecutive rows of a value with ``size * f`` rows,
            for every ``f`` here (``(1,)``: plain; ``(k, k*T)``: expanded, and token-major).
        shared: lengths of vectors every row shares (the token count); a first dimension of
            1 is shared too.
    """

    size: int
    factors: tuple[int, ...] = (1,)
    shared: tuple[int, ...] = ()

    @classmethod
    def of(cls, size: int, expand: int = 1, tokens: int | None = None) -> Layout:
        """The layout of a forward over ``size`` rows, each repeated ``expand`` times, of
        ``tokens`` tokens each (``None``: not a token model)."""
        if tokens is None:
            return cls(size, (expand,))
        return cls(size, tuple(dict.fromkeys((expand, expand * tokens))), (tokens,))

    def span(self, rows: tuple[int, int], shape: torch.Size) -> tuple[int, int] | None:
        """Where ``rows`` lie in a value of ``shape`` (``None``: a value every row shares)."""
        length = shape[0]
        for f in self.factors:
            if length == self.size * f:
                return rows[0] * f, rows[1] * f
        if length == 1 or (len(shape) == 1 and length in self.shared):
            return None
        expected = ", ".join(str(self.size * f) for f in self.factors)
        raise GraphError(
            f"cannot tell which part of a value with first dimension {length} belongs to batch "
            f"rows {rows[0]}:{rows[1]}: this forward's rows are {expected} (a batch of "
            f"{self.size}); read it outside the invoke (or in an empty `tracer.invoke()`) and "
            "select the rows yourself"
        )


def _layout(size: int | Layout) -> Layout:
    return size if isinstance(size, Layout) else Layout(size)


def narrow(value: Any, rows: tuple[int, int] | None, size: int | Layout) -> Any:
    """The part of ``value`` that belongs to ``rows`` of a batch of ``size`` (or a layout)."""
    layout = _layout(size)
    if rows is None or rows == (0, layout.size):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value
        span = layout.span(rows, value.shape)
        return value if span is None else value[span[0] : span[1]]
    if tree.is_container(value) and not isinstance(value, slice):
        return tree.rebuild(value, [narrow(v, rows, layout) for v in tree.children(value)])
    return value


def replace(full: Any, new: Any, rows: tuple[int, int] | None, size: int | Layout) -> Any:
    """``full`` with ``rows`` replaced by ``new`` (all of it when ``rows`` is ``None``)."""
    layout = _layout(size)
    if rows is None or rows == (0, layout.size):
        if hasattr(full, "_fields") and type(new) is tuple and len(new) == len(full):
            return tree.rebuild(full, list(new))  # a graph carries a namedtuple as a tuple
        return new
    start, stop = rows
    if isinstance(full, torch.Tensor):
        return _replace_tensor(full, new, rows, layout)
    if isinstance(full, (tuple, list)) and isinstance(new, (tuple, list)):
        if len(full) != len(new):
            raise ValueError(
                f"cannot replace rows {start}:{stop} of a {type(full).__name__} of "
                f"{len(full)} items with one of {len(new)} items"
            )
        return tree.rebuild(full, [replace(f, n, rows, layout) for f, n in zip(full, new)])
    if isinstance(full, dict) and isinstance(new, dict):
        merged = [replace(v, new[k], rows, layout) if k in new else v for k, v in full.items()]
        return tree.rebuild(full, merged)
    return new


def _replace_tensor(full: torch.Tensor, new: Any, rows: tuple[int, int], layout: Layout) -> Any:
    if new is full or full.dim() == 0:
        return new
    span = layout.span(rows, full.shape)
    if span is None:
        raise GraphError(
            f"cannot write batch rows {rows[0]}:{rows[1]} of a value with first dimension "
            f"{full.shape[0]}: every row shares it, so a write from one invoke would change "
            "the others; write it outside the invoke"
        )
    start, stop = span
    new = torch.as_tensor(new, dtype=full.dtype, device=full.device)
    new = new.expand(stop - start, *full.shape[1:])
    return torch.cat([full[:start], new, full[stop:]])
