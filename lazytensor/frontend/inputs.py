"""Inputs: what an invoke's inputs become, and how several invokes join into one batch.

A trace hands each invoke's ``(args, kwargs)`` to its model's inputs adapter, which returns a
:class:`Part` (the inputs and how many batch rows they hold), and at run time asks it to join
the parts into one :class:`~lazytensor.core.graph.Batch`. :class:`TensorInputs` serves any
module (tensors concatenated along the batch dimension); :class:`TokenInputs` serves a language
model (text, token ids or encodings, left-padded together with an attention mask and matching
position ids, so every row of the batch computes what its prompt computes alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import TraceError
from ..core.graph import Batch


@dataclass
class Part:
    """One invoke's inputs, ready to be joined with the others into a batch."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    size: int = 1


class TensorInputs:
    """Inputs of any module: the batch size is the first dimension of the first tensor."""

    def prepare(self, args: tuple, kwargs: dict) -> Part:
        tensors = (t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        size = next((t.shape[0] for t in tensors if t.dim() > 0), 1)
        return Part(args, kwargs, size)

    def batch(self, parts: list[Part], *, generate: bool = False, options: dict) -> Batch:
        size = sum(p.size for p in parts)
        if len(parts) == 1:
            return Batch(parts[0].args, dict(parts[0].kwargs), size, generate)
        first = parts[0]
        if any(
            len(p.args) != len(first.args) or p.kwargs.keys() != first.kwargs.keys() for p in parts
        ):
            raise TraceError(
                "every invoke must pass the same positional and keyword inputs "
                "to be batched into one forward pass"
            )
        args = tuple(_join([p.args[i] for p in parts]) for i in range(len(first.args)))
        kwargs = {k: _join([p.kwargs[k] for p in parts]) for k in first.kwargs}
        return Batch(args, kwargs, size, generate)


def _join(values: list[Any]) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values)
    if any(v != values[0] for v in values[1:]):
        raise TraceError("non-tensor inputs differ between invokes, so they cannot be batched")
    return values[0]


class TokenInputs:
    """Inputs of a causal language model, tokenized by ``tokenizer``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def prepare(self, args: tuple, kwargs: dict) -> Part:
        if len(args) != 1:
            raise TraceError(
                "a language model takes one input per invoke: a string, a list "
                "of strings, token ids or a tokenizer encoding"
            )
        rows = token_rows(self.tokenizer, args[0])
        return Part((rows,), kwargs, len(rows))

    def batch(self, parts: list[Part], *, generate: bool = False, options: dict) -> Batch:
        rows = [row for part in parts for row in part.args[0]]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        padded = any(len(r) != width for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T)
        if padded:
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
        else:
            mask = torch.ones_like(ids)  # (B, T)
        kwargs: dict[str, Any] = {}
        for part in parts:
            kwargs.update(part.kwargs)
        kwargs.update(input_ids=ids, attention_mask=mask)
        if generate:
            kwargs.setdefault("pad_token_id", pad)
            kwargs.update(options or {})
        elif padded:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T)
        return Batch((), kwargs, len(rows), generate)


def token_rows(tokenizer: Any, value: Any) -> list[list[int]]:
    """One invoke's input as a list of token-id rows (no padding)."""
    if isinstance(value, str):
        return [tokenizer(value)["input_ids"]]
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if hasattr(value, "keys") and "input_ids" in value:
        ids, mask = value["input_ids"], value.get("attention_mask")
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        if ids and isinstance(ids[0], int):
            ids, mask = [ids], [mask] if mask is not None else None
        if mask is None:
            return [list(r) for r in ids]
        mask = mask.tolist() if isinstance(mask, torch.Tensor) else mask
        return [[t for t, m in zip(r, ms) if m] for r, ms in zip(ids, mask)]
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return [list(r) for r in tokenizer(list(value))["input_ids"]]
        if all(isinstance(v, int) for v in value):
            return [list(value)]
        if all(isinstance(v, (list, tuple)) for v in value):
            return [list(r) for r in value]
    raise TraceError(
        f"cannot use a {type(value).__name__} as language-model input: pass a "
        "string, a list of strings, token ids or a tokenizer encoding"
    )
