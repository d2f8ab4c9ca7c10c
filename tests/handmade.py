"""Hand-written references for the cache, edit and scan tests: plain PyTorch hooks.

The oracle of each test is the same intervention written with ``register_forward_hook`` /
``register_forward_pre_hook`` on the same Hugging Face module, run through
``lm.trace(..., trace=False)`` (the model called directly on the batch a trace would build, so
both sides see the very same inputs).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch

import lazytensor as lt


@contextlib.contextmanager
def hooked(*hooks: tuple[torch.nn.Module, str, Callable]) -> Iterator[None]:
    """Install ``(module, "pre" | "post", fn)`` hooks for the block, then remove them."""
    with contextlib.ExitStack() as stack:
        for module, kind, fn in hooks:
            if kind == "pre":
                handle = module.register_forward_pre_hook(fn)
            else:
                handle = module.register_forward_hook(fn)
            stack.callback(handle.remove)
        yield


def forward(lm: lt.LanguageModel, prompts, *hooks) -> torch.Tensor:
    """The model's logits on ``prompts``, with ``hooks`` installed, no trace."""
    with torch.no_grad(), hooked(*hooks):
        return lm.trace(prompts, trace=False).logits


def capture(module: torch.nn.Module, paths, into: dict, *, inputs: bool = False) -> list:
    """Hooks that keep each path's outputs (and first inputs) in ``into``, a list per path."""
    hooks = []
    for path in paths:
        sub = module.get_submodule(path)
        hooks.append((sub, "post", lambda m, a, out, p=path: into.setdefault(p, []).append(out)))
        if inputs:
            keep = lambda m, a, p=path: into.setdefault(p + ":in", []).append(a[0])  # noqa: E731
            hooks.append((sub, "pre", keep))
    return hooks


@contextlib.contextmanager
def counting(module: torch.nn.Module) -> Iterator[Counter]:
    """Count the forward calls of every submodule of ``module`` (by path) during the block."""
    calls: Counter = Counter()
    hooks = [
        (sub, "pre", lambda m, a, p=path: calls.update([p])) for path, sub in module.named_modules()
    ]
    with hooked(*hooks):
        yield calls
