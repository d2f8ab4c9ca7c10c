"""Small hand-written modules for tests that need a generic ``nn.Module``, not a language model.

Also :func:`hooked`, the oracle those tests compare lazytensor with: the same intervention
written by hand with plain PyTorch hooks.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class TinyMLP(nn.Module):
    """A three-layer perceptron, ``8 -> 16 -> 16 -> 4``, with deterministic weights.

    Its submodules are ``layer1``, ``act``, ``layer2`` and ``layer3``; only ``layer1`` is
    followed by the activation, so ``layer2``'s input is ``act``'s output.

    Args:
        seed: Seed for the weights; the caller's global RNG state is left untouched.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layer1 = nn.Linear(8, 16)
            self.act = nn.ReLU()
            self.layer2 = nn.Linear(16, 16)
            self.layer3 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 8) -> (B, 16) -> (B, 16) -> (B, 4)
        return self.layer3(self.layer2(self.act(self.layer1(x))))


Pair = namedtuple("Pair", "main gate")


class Split(nn.Module):
    """Returns a namedtuple ``Pair(main, gate)``: a module whose output is not a tensor."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, width)
        self.down = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(self.up(x), torch.sigmoid(self.down(x)))


class Scale(nn.Module):
    """A parameter-free module whose forward takes keyword arguments."""

    def forward(self, x: torch.Tensor, *, factor: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return x * factor + shift


class Zoo(nn.Module):
    """A small model with the module shapes real models have, ``(B, 8) -> (B, 4)``.

    ``split`` returns a namedtuple, ``scale`` is called with keyword arguments, ``block`` is
    called twice per forward (shared weights), ``layers`` is a ``ModuleList`` of three residual
    layers and ``unused`` is never called.

    Args:
        seed: Seed for the weights; the caller's global RNG state is left untouched.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Linear(8, 8)
            self.split = Split(8)
            self.scale = Scale()
            self.block = nn.Linear(8, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.head = nn.Linear(8, 4)
            self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
        x = self.embed(x)  # (B, 8)
        pair = self.split(x)
        x = self.scale(pair.main * pair.gate, factor=factor)
        x = torch.tanh(self.block(x))
        x = torch.tanh(self.block(x))  # the same weights a second time
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)  # (B, 4)


def hooked(
    module: nn.Module,
    *args: Any,
    pre: Sequence[tuple[nn.Module, Callable]] = (),
    pre_kwargs: Sequence[tuple[nn.Module, Callable]] = (),
    post: Sequence[tuple[nn.Module, Callable]] = (),
    **kwargs: Any,
) -> Any:
    """The oracle: ``module(*args, **kwargs)`` under ``no_grad`` with plain PyTorch hooks.

    ``pre`` hooks get ``(module, args)``, ``pre_kwargs`` hooks ``(module, args, kwargs)`` and
    ``post`` hooks ``(module, args, output)``; every hook is removed afterwards.
    """
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre]
    handles += [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in pre_kwargs]
    handles += [m.register_forward_hook(fn) for m, fn in post]
    try:
        with torch.no_grad():
            return module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
