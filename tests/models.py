"""Small hand-written modules for tests that need a generic ``nn.Module``, not a language model."""

from __future__ import annotations

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
