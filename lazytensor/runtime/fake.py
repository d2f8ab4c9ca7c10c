"""Fake runs: the shape-only forward passes that answer ``.shape`` inside a trace.

A fake run replays a graph on tensors with shape, dtype and device but no data
(``FakeTensorMode``). For ``generate`` it takes two forwards, the prompt step and one decoding
step, whose shapes stand for every later step. A fake run may stop at the model's own
data-dependent op (``x[mask]``): what ran before it still has its shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.graph import Batch


def mode() -> Any:
    """A new ``FakeTensorMode`` that accepts real tensors (the model's weights)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def runs(batch: Batch, fake_mode: Any) -> list[Batch]:
    """The fake forwards for ``batch``: one; for ``generate``, the prompt step then one step."""

    def convert(value: Any) -> Any:
        return fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    args = tuple(convert(a) for a in batch.args)
    kwargs = {k: convert(v) for k, v in batch.kwargs.items()}
    if not batch.generate:
        return [Batch(args, kwargs, batch.size)]
    prompt = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    step = {"input_ids": prompt["input_ids"][:, -1:]} if "input_ids" in prompt else prompt
    return [Batch(args, prompt, batch.size), Batch(args, step, batch.size)]


def tokens(prompt: Batch, batch: Batch) -> Any:
    """A fake of what ``generate`` returns: the prompt plus ``max_new_tokens`` ids."""
    ids = prompt.kwargs["input_ids"]  # (B, T)
    steps = int(batch.kwargs.get("max_new_tokens", 1))
    return ids.new_empty(ids.shape[0], ids.shape[1] + steps)  # (B, T + steps)


def is_data_dependent(exc: BaseException) -> bool:
    """Whether ``exc`` is a fake tensor's refusal of an op whose shape depends on values."""
    name = type(exc).__name__
    return "DataDependent" in name or "DynamicOutputShape" in name
