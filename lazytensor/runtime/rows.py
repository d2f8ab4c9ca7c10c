"""Batch rows: how one invoke's slice of the batch is read from and written into a value.

Several invokes run as one forward pass over their concatenated inputs. A point node with
``rows=(start, stop)`` sees, in every tensor of the value whose first dimension is the batch
size, only those rows. Reads are views (``t[start:stop]``), so in-place writes through them
land in the real activation, exactly as the same code in a hook would. Replacing a value for
some rows builds a new value with those rows swapped in.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import tree


def narrow(value: Any, rows: tuple[int, int] | None, size: int) -> Any:
    """The part of ``value`` that belongs to ``rows`` of a batch of ``size``."""
    if rows is None or rows == (0, size):
        return value
    start, stop = rows
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == size:
            return value[start:stop]
        return value
    if tree.is_container(value) and not isinstance(value, slice):
        return tree.rebuild(value, [narrow(v, rows, size) for v in tree.children(value)])
    return value


def replace(full: Any, new: Any, rows: tuple[int, int] | None, size: int) -> Any:
    """``full`` with ``rows`` replaced by ``new`` (all of it when ``rows`` is ``None``)."""
    if rows is None or rows == (0, size):
        if hasattr(full, "_fields") and type(new) is tuple and len(new) == len(full):
            return tree.rebuild(full, list(new))  # a graph carries a namedtuple as a tuple
        return new
    start, stop = rows
    if isinstance(full, torch.Tensor):
        if full.dim() > 0 and full.shape[0] == size:
            new = torch.as_tensor(new, dtype=full.dtype, device=full.device)
            new = new.expand(stop - start, *full.shape[1:])
            return torch.cat([full[:start], new, full[stop:]])
        return new
    if isinstance(full, (tuple, list)) and isinstance(new, (tuple, list)):
        if len(full) != len(new):
            raise ValueError(
                f"cannot replace rows {start}:{stop} of a {type(full).__name__} of "
                f"{len(full)} items with one of {len(new)} items"
            )
        return tree.rebuild(full, [replace(f, n, rows, size) for f, n in zip(full, new)])
    if isinstance(full, dict) and isinstance(new, dict):
        merged = [replace(v, new[k], rows, size) if k in new else v for k, v in full.items()]
        return tree.rebuild(full, merged)
    return new
