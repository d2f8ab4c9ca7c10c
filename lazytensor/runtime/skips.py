"""Skips: modules whose call does not run, their output given by the graph instead.

``envoy.skip(value)`` records a ``skip`` node, a point write that fires with the module's input
(so ``value`` may be computed from it). A forward hook cannot stop a module from running, so for
each module a graph skips, :func:`install` puts a stand-in ``forward`` on the module for the
run: when the executor has a replacement for that module (its ``skip`` node ran at this call),
the stand-in returns it and the module's own ``forward`` (and every submodule) never runs;
otherwise it calls the module's own ``forward``. The stand-in answers only the run that
installed it (``running``), and its handle puts the module back as it was, also on error.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from .plan import PRE

if TYPE_CHECKING:
    from .executor import Executor

_MISSING = object()


class Restore:
    """A handle that puts a module's ``forward`` back as it was before :func:`install`."""

    def __init__(self, module: torch.nn.Module, previous: Any) -> None:
        self.module, self.previous = module, previous

    def remove(self) -> None:
        if self.previous is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.previous


def install(ex: Executor, running: ContextVar) -> list[Restore]:
    """Stand-in ``forward``s on the modules ``ex``'s graph skips; the handles that undo them."""
    nodes = ex.graph.nodes
    paths = [
        key[0]
        for key, ids in ex.points.items()
        if key[1] == PRE and any(nodes[i].op == "skip" for i in ids)
    ]
    handles: list[Restore] = []
    for path in paths:
        module = ex.model.get_submodule(path)
        handles.append(Restore(module, module.__dict__.get("forward", _MISSING)))
        module.__dict__["forward"] = _stand_in(ex, running, path, module.forward)
    return handles


def _stand_in(ex: Executor, running: ContextVar, path: str, forward: Callable) -> Callable:
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        if running.get() is ex and path in ex.skipped:
            return ex.skipped.pop(path)
        return forward(*args, **kwargs)

    return stand_in
