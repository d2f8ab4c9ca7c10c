"""ModuleSpec: a model's module tree as plain data, so a client can trace a model it lacks.

The server describes each served model with :func:`describe` (class names, children, a few
scalar attributes such as ``config`` fields); the client rebuilds a :class:`ModuleSpec` tree
from it. An :class:`~lazytensor.envoy.Envoy` walks a spec exactly as it walks an
``nn.Module`` (both expose ``_modules``), so ``model.model.layers[3].output`` records the
same node whether the weights are here or on the server.
"""

from __future__ import annotations

from typing import Any

import torch

_MAX_DEPTH = 64


def describe(module: torch.nn.Module) -> dict:
    """The module tree of ``module`` as plain data (no tensors, no code)."""
    return {
        "cls": type(module).__name__,
        "children": {
            name: describe(child) for name, child in module._modules.items() if child is not None
        },
    }


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ModuleSpec:
    """A described module: its class name and named children, nothing else.

    Calling it is an error: a spec stands for a module whose weights are elsewhere.
    """

    def __init__(
        self,
        cls_name: str,
        children: dict[str, ModuleSpec],
        attributes: dict[str, Any] | None = None,
    ) -> None:
        self.cls_name = cls_name
        self._modules = children
        self._attributes = attributes or {}

    @classmethod
    def from_dict(cls, data: dict, depth: int = 0) -> ModuleSpec:
        if depth > _MAX_DEPTH or not isinstance(data, dict):
            raise ValueError("a module description must be a nested dict of bounded depth")
        children = data.get("children", {})
        return cls(
            str(data.get("cls", "Module")),
            {str(k): cls.from_dict(v, depth + 1) for k, v in children.items()},
        )

    def __getattr__(self, name: str) -> Any:
        attributes = self.__dict__.get("_attributes", {})
        if name in attributes:
            return attributes[name]
        raise AttributeError(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{self.cls_name} is served remotely: call it inside a trace, or call "
            "the model handle itself for a lazy result"
        )

    def __repr__(self) -> str:
        return f"ModuleSpec({self.cls_name}, {len(self._modules)} children)"
