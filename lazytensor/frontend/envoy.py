"""Envoy: the stand-in for one module of the model, mirroring ``named_modules()``.

``model.transformer.h[3].mlp`` walks envoys, not modules. Inside a trace an envoy's
``.output``, ``.input`` and ``.inputs`` record point reads (and assignments record writes) at
that module's path; calling an envoy records a call of the module. Outside a trace an envoy
is transparent: attributes come from the module and calling it runs the module.

An envoy needs only its module's ``_modules`` mapping and attributes, so the same class serves
a real ``nn.Module`` and a module tree described by a remote server. The envoys of one model
share an :class:`EnvoyTree`: its aliases (``rename``), its envoy classes (``envoys``) and a
weak reference to the root, so a dropped model is freed by reference counting alone.

Users may subclass :class:`Envoy` to add derived views::

    class Heads(lt.Envoy):
        @property
        def heads(self):
            b, s, h = self.output.shape
            return self.output.view(b, s, 8, h // 8)

    lm = lt.LanguageModel(path, envoys={"self_attn.o_proj": Heads})
"""

from __future__ import annotations

import difflib
import weakref
from typing import Any

from ..core.errors import TraceError
from ..tracing.trace import current
from .source import Source

_OWN = frozenset(("output", "input", "inputs"))


def _weights(module: Any) -> Any:
    """The names of a module's own parameters and buffers (a described module lists them)."""
    described = module.__dict__.get("_weights")
    if described is not None:
        return described
    return (*module.__dict__.get("_parameters", ()), *module.__dict__.get("_buffers", ()))


class EnvoyTree:
    """What the envoys of one model share: aliases, envoy classes, and their root.

    Args:
        rename: ``{name: alias}`` makes every child called ``name`` reachable as ``alias``
            too; ``{"a.b": "c"}`` (a dotted path) makes the module at path ``a.b`` reachable as
            the root's attribute path ``c``.
        envoys: ``{path suffix: Envoy subclass}``; a module whose path is that suffix, or
            ends in ``.suffix``, gets an envoy of that class.
    """

    def __init__(
        self, rename: dict[str, str] | None = None, envoys: dict[str, type] | None = None
    ) -> None:
        rename = rename or {}
        self.names = {alias: name for name, alias in rename.items() if "." not in name}
        self.paths = {alias: path for path, alias in rename.items() if "." in path}
        self.classes = dict(envoys or {})
        for cls in self.classes.values():
            if not (isinstance(cls, type) and issubclass(cls, Envoy)):
                raise TypeError(f"envoys= takes Envoy subclasses, got {cls!r}")
        self.root: Any = None  # a weak reference, set by the root envoy

    def envoy_class(self, path: str) -> type[Envoy]:
        for suffix, cls in self.classes.items():
            if path == suffix or path.endswith("." + suffix):
                return cls
        return Envoy


class Envoy:
    """One module of the tree; see the module docstring."""

    def __init__(self, module: Any, path: str = "", tree: EnvoyTree | None = None) -> None:
        if tree is None:
            tree = EnvoyTree()
        if not path:
            tree.root = weakref.ref(self)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_children", {})

    # -- tree -----------------------------------------------------------------------------
    def _child(self, name: str) -> Envoy:
        module = self._module._modules[name]
        child = self._children.get(name)
        if child is None or child._module is not module:  # new, or replaced by the user
            path = f"{self._path}.{name}" if self._path else name
            child = self._tree.envoy_class(path)(module, path, self._tree)
            self._children[name] = child
        return child

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        modules = self._module._modules
        if name in modules and modules[name] is not None:
            return self._child(name)
        alias = self._alias(name)
        if alias is not None:
            return alias
        if name in _weights(self._module):
            trace = current()
            if trace is not None and getattr(trace.root, "_tree", None) is self._tree:
                return trace.weight(f"{self._path}.{name}" if self._path else name)
            if "_weights" in self._module.__dict__:  # a served model's module: weights are there
                raise AttributeError(
                    f"{self._describe()}'s {name!r} lives on the server: read it inside a trace "
                    f"(`{self._path + '.' if self._path else ''}{name}` there is a read-only "
                    "value of the graph) and save what you need"
                )
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

    def _alias(self, name: str) -> Envoy | None:
        tree = self._tree
        full = f"{self._path}.{name}" if self._path else name
        if full in tree.paths and tree.root is not None:
            return tree.root().get(tree.paths[full])
        source = tree.names.get(name)
        if source is not None and self._module._modules.get(source) is not None:
            return self._child(source)
        return None

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

    def __bool__(self) -> bool:
        return True  # a leaf (no submodules) is still a module

    def get(self, path: str) -> Any:
        """The envoy at a dotted path relative to this one, e.g. ``"model.layers.3.mlp"``;
        a last part that names a parameter or attribute (``"lm_head.weight"``) reads it."""
        envoy: Any = self
        parts = path.split(".") if path else []
        for index, part in enumerate(parts):
            if not isinstance(envoy, Envoy):
                raise AttributeError(f"{path!r}: {parts[index - 1]!r} is not a submodule")
            if part in envoy._module._modules:
                envoy = envoy._child(part)
            elif part.lstrip("-").isdigit():
                envoy = envoy[int(part)]
            else:
                envoy = getattr(envoy, part)
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
    def _trace(self, what: str = ".output/.input"):
        trace = current()
        if trace is None or getattr(trace.root, "_tree", None) is not self._tree:
            state = "no trace is active" if trace is None else "the active trace is another model's"
            clash = [n for n in _OWN if n in self._module._modules]
            hint = f"; its submodule named {clash[0]!r} is envoy[{clash[0]!r}]" if clash else ""
            raise TraceError(
                f"{what} of {self._describe()} can be used only inside this model's trace, "
                f"and {state}{hint}"
            )
        return trace

    @property
    def output(self) -> Any:
        """The module's return value (a proxy inside a trace)."""
        return self._trace(".output").read(self._path, "output")

    @property
    def input(self) -> Any:
        """The module's first positional argument (a proxy inside a trace)."""
        return self._trace(".input").read(self._path, "input")

    @property
    def inputs(self) -> Any:
        """The module's ``(args, kwargs)`` (a proxy inside a trace)."""
        return self._trace(".inputs").read(self._path, "inputs")

    @property
    def source(self) -> Source:
        """The calls inside the module's forward, each readable and writable like a module
        (``.source.softmax_0.output``); print it to list them (see :mod:`.source`)."""
        return Source(self)

    def skip(self, replacement: Any) -> None:
        """Inside a trace: the module does not run (nor anything inside it) and its output is
        ``replacement``, which may be computed from the module's own ``.input``.

        Raises:
            TraceError: outside this model's trace, or on the root module.
        """
        trace = self._trace(".skip()")
        if not self._path:
            raise TraceError("the root module cannot be skipped: skip one of its submodules")
        trace.write(self._path, "skip", replacement)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            self._trace(f".{name}").write(self._path, f"set_{name}", value)
        else:
            raise AttributeError(
                f"cannot set {name!r} on {self._describe()}: only .output, "
                ".input and .inputs can be assigned"
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trace = current()
        if trace is not None and getattr(trace.root, "_tree", None) is self._tree:
            return trace.apply("module", self._path, args, kwargs)
        return self._module(*args, **kwargs)
