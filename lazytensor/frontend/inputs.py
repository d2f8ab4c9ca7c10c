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


#: Keyword arguments of an invoke that go to the tokenizer, not to the model's forward.
TOKENIZER_KWARGS = frozenset(
    """add_special_tokens truncation max_length stride is_split_into_words
    pad_to_multiple_of verbose""".split()
)


class TokenInputs:
    """Inputs of a causal language model, tokenized by ``tokenizer``.

    One invoke's input is a string, a list of strings, token ids (a list, a list of lists, a
    tensor), a tokenizer encoding (``**enc`` or ``input_ids=..., attention_mask=...``; padding
    marked by the mask is dropped, whichever side it was on), or ``inputs_embeds`` (B, T, D).
    Tokenizer arguments (``truncation=True, max_length=4``) go to the tokenizer; every other
    keyword argument goes to the model's forward and must agree across invokes.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def prepare(self, args: tuple, kwargs: dict) -> Part:
        kwargs = dict(kwargs)
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in TOKENIZER_KWARGS}
        if len(args) > 1:
            raise TraceError(
                "a language model takes one input per invoke: a string, a list "
                "of strings, token ids or a tokenizer encoding"
            )
        if not args and "inputs_embeds" in kwargs:
            embeds = kwargs.pop("inputs_embeds")  # (B, T, D)
            mask = kwargs.pop("attention_mask", None)
            rows = _embedding_rows(embeds, mask)
            return Part((rows,), kwargs, len(rows))
        if args:
            value = args[0]
            if "attention_mask" in kwargs and not isinstance(value, (str, dict)):
                value = {"input_ids": value, "attention_mask": kwargs.pop("attention_mask")}
        elif "input_ids" in kwargs:
            value = {k: kwargs.pop(k) for k in ("input_ids", "attention_mask") if k in kwargs}
        else:
            raise TraceError(
                "this invoke has no input: pass a prompt, token ids, input_ids=... "
                "(with attention_mask=...) or inputs_embeds=..."
            )
        _drop_token_types(kwargs)
        rows = token_rows(self.tokenizer, value, options)
        return Part((rows,), kwargs, len(rows))

    def batch(self, parts: list[Part], *, generate: bool = False, options: dict) -> Batch:
        rows = [row for part in parts for row in part.args[0]]
        kinds = {isinstance(row, torch.Tensor) for row in rows}
        if len(kinds) > 1:
            raise TraceError("invokes mix token inputs and inputs_embeds; use one kind")
        width = max(len(r) for r in rows)
        padded = any(len(r) != width for r in rows)
        if padded:
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
        else:
            mask = torch.ones(len(rows), width, dtype=torch.long)  # (B, T)
        kwargs = forward_kwargs(parts)
        if kinds == {True}:
            kwargs["inputs_embeds"] = torch.stack([_pad_embeds(r, width) for r in rows])
        elif padded:  # reading pad_token_id costs a tokenizer lookup: only when it is used
            pad = self.tokenizer.pad_token_id
            kwargs["input_ids"] = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        else:
            kwargs["input_ids"] = torch.tensor(rows)  # (B, T)
        kwargs["attention_mask"] = mask
        if generate:
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            kwargs.update(options or {})
        elif padded:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T)
        return Batch((), kwargs, len(rows), generate)


def forward_kwargs(parts: list[Part]) -> dict:
    """The forward's keyword arguments of every invoke, which must agree where they meet."""
    kwargs: dict[str, Any] = {}
    for number, part in enumerate(parts):
        for key, value in part.kwargs.items():
            if key in kwargs and not _same(kwargs[key], value):
                raise TraceError(
                    f"invokes pass different values for the forward argument {key!r}: "
                    f"{_short(kwargs[key])} and, in invoke {number}, {_short(value)}; one "
                    "forward pass runs them all, so pass the same value (or run separate traces)"
                )
            kwargs[key] = value
    return kwargs


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _drop_token_types(kwargs: dict) -> None:
    """An encoding's ``token_type_ids`` mean nothing to a causal LM unless they are not zero."""
    types = kwargs.pop("token_type_ids", None)
    if types is not None and bool(torch.as_tensor(types).any()):
        raise TraceError("token_type_ids other than zeros are not supported for a causal LM")


def _embedding_rows(embeds: Any, mask: Any) -> list[torch.Tensor]:
    if not isinstance(embeds, torch.Tensor) or embeds.dim() not in (2, 3):
        raise TraceError("inputs_embeds must be a tensor of shape (batch, tokens, hidden)")
    embeds = embeds if embeds.dim() == 3 else embeds.unsqueeze(0)  # (B, T, D)
    if mask is None:
        return list(embeds)
    mask = torch.as_tensor(mask).reshape(embeds.shape[:2]).bool()  # (B, T)
    return [row[keep] for row, keep in zip(embeds, mask)]


def _pad_embeds(row: torch.Tensor, width: int) -> torch.Tensor:
    pad = row.new_zeros(width - row.shape[0], row.shape[1])  # (width - T, D)
    return torch.cat([pad, row])


def token_rows(tokenizer: Any, value: Any, options: dict | None = None) -> list[list[int]]:
    """One invoke's input as a list of token-id rows (no padding).

    ``options`` go to the tokenizer when ``value`` is text.
    """
    options = options or {}
    if options and not _is_text(value):
        raise TraceError(
            f"tokenizer arguments ({', '.join(options)}) apply to text inputs only; "
            "this invoke's input is already tokens"
        )
    if isinstance(value, str):
        return [tokenizer(value, **options)["input_ids"]]
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if hasattr(value, "keys") and "input_ids" in value:
        ids, mask = value["input_ids"], value.get("attention_mask")
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        mask = mask.tolist() if isinstance(mask, torch.Tensor) else mask
        if ids and isinstance(ids[0], int):
            ids, mask = [ids], [mask] if mask is not None else None
        if mask is None:
            return [list(r) for r in ids]
        return [[t for t, m in zip(r, ms) if m] for r, ms in zip(ids, mask)]
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return [list(r) for r in tokenizer(list(value), **options)["input_ids"]]
        if all(isinstance(v, int) for v in value):
            return [list(value)]
        if all(isinstance(v, (list, tuple)) for v in value):
            return [list(r) for r in value]
    raise TraceError(
        f"cannot use a {type(value).__name__} as language-model input: pass a "
        "string, a list of strings, token ids or a tokenizer encoding"
    )


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)
    )
