"""Device: where a module's weights live, and moving a run's inputs there."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..core import tree
from ..core.graph import Batch

#: Each module's first parameter, found once: the same Parameter object stays across ``.to()``.
_FIRST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def device_of(module: Any) -> torch.device:
    """Where ``module``'s first parameter lives (CPU for a module without parameters)."""
    try:
        param = _FIRST[module]
    except (KeyError, TypeError):
        parameters = getattr(module, "parameters", None)
        param = next(parameters(), None) if parameters is not None else None
        if param is not None:
            _FIRST[module] = param
    if param is None or param.device.type == "meta":
        return torch.device("cpu")
    return param.device


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor moved to ``device`` (no copy for those already there)."""

    values = batch.kwargs.values()
    if not batch.args and all(type(v) is torch.Tensor and v.device == device for v in values):
        return batch  # the usual batch of a trace: tensors only, all in place already

    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    args, kwargs = tree.map(move, batch.args), tree.map(move, batch.kwargs)
    return Batch(args, kwargs, batch.size, batch.generate)


def moved(values: list, device: torch.device) -> list:
    """``values`` with every tensor on ``device`` (a compiled program's constants), the rest
    as they are."""
    return [v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for v in values]
