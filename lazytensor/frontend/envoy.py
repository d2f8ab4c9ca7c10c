"""Envoy: the stand-in for one module of the model, mirroring ``named_modules()``.

``model.transformer.h[3].mlp`` walks envoys, not modules. Inside a trace an envoy's
``.output``, ``.input`` and ``.inputs`` record point reads (and assignments record writes) at
that module's path; calling an envoy records a call of the module. Outside a trace an envoy
is transparent: attributes come from the module and calling it runs the module.

An envoy needs only its module's ``_modules`` mapping and attributes, so the same class serves
a real ``nn.Module`` and a module tree described by a remote server.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..core.errors import TraceError
from ..tracing.trace import current

_OWN = frozenset(("output", "input", "inputs"))


class Envoy:
    """One module of the tree; see the module docstring."""

    def __init__(self, module: Any, path: str = "", root: Envoy | None = None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root", root if root is not None else self)
        object.__setattr__(self, "_children", {})

    # -- tree -----------------------------------------------------------------------------
    def _child(self, name: str) -> Envoy:
        child = self._children.get(name)
        if child is None:
            module = self._module._modules[name]
            path = f"{self._path}.{name}" if self._path else name
            child = Envoy(module, path, self._root)
            self._children[name] = child
        return child

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        modules = self._module._modules
        if name in modules and modules[name] is not None:
            return self._child(name)
        try:
            return getattr(self._module, name)
        except AttributeError:
            pass
        close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        children = ", ".join(list(modules)[:12]) or "none"
        raise AttributeError(
            f"{self._describe()} has no submodule or attribute {name!r}; {hint}"
            f"its submodules are: {children}"
        )

    def __getitem__(self, key: int | str | slice) -> Any:
        names = [n for n, m in self._module._modules.items() if m is not None]
        if isinstance(key, slice):
            return [self._child(n) for n in names[key]]
        if isinstance(key, str):
            if key not in names:
                raise KeyError(f"{self._describe()} has no submodule {key!r}")
            return self._child(key)
        if not -len(names) <= key < len(names):
            raise IndexError(
                f"index {key} is out of range for {self._describe()}, which has "
                f"{len(names)} submodules"
            )
        return self._child(names[key])

    def __iter__(self):
        return iter(self[:])

    def __len__(self) -> int:
        return sum(1 for m in self._module._modules.values() if m is not None)

    def get(self, path: str) -> Envoy:
        """The envoy at a dotted path relative to this one, e.g. ``"model.layers.3.mlp"``."""
        envoy = self
        for part in path.split(".") if path else ():
            if part in envoy._module._modules:
                envoy = envoy._child(part)
            elif part.lstrip("-").isdigit():
                envoy = envoy[int(part)]
            else:
                envoy = getattr(envoy, part)
            if not isinstance(envoy, Envoy):
                raise AttributeError(f"{path!r}: {part!r} is not a submodule")
        return envoy

    def modules(self) -> list[Envoy]:
        """This envoy and every envoy below it, in ``named_modules()`` order."""
        found = [self]
        for name, module in self._module._modules.items():
            if module is not None:
                found.extend(self._child(name).modules())
        return found

    @property
    def path(self) -> str:
        return self._path

    def _describe(self) -> str:
        kind = getattr(self._module, "cls_name", None) or type(self._module).__name__
        return f"module {self._path or '<root>'!r} ({kind})"

    def __repr__(self) -> str:
        return f"<Envoy {self._describe()}>"

    # -- recording ----------------------------------------------------------------------------
    def _trace(self):
        trace = current()
        if trace is None or trace.root is not self._root:
            what = "no trace is active" if trace is None else "the active trace is another model's"
            raise TraceError(
                f".output/.input of {self._describe()} can be used only inside "
                f"this model's trace, and {what}"
            )
        return trace

    @property
    def output(self) -> Any:
        """The module's return value (a proxy inside a trace)."""
        return self._trace().read(self._path, "output")

    @property
    def input(self) -> Any:
        """The module's first positional argument (a proxy inside a trace)."""
        return self._trace().read(self._path, "input")

    @property
    def inputs(self) -> Any:
        """The module's ``(args, kwargs)`` (a proxy inside a trace)."""
        return self._trace().read(self._path, "inputs")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            self._trace().write(self._path, f"set_{name}", value)
        else:
            raise AttributeError(
                f"cannot set {name!r} on {self._describe()}: only .output, "
                ".input and .inputs can be assigned"
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trace = current()
        if trace is not None and trace.root is self._root:
            return trace.apply("module", self._path, args, kwargs)
        return self._module(*args, **kwargs)
