"""Cache: every chosen module's output (and input) of a run, kept by module path.

``tracer.cache()`` records a saved read of the output of every module of the model (or of the
``modules=`` given: envoys or paths), and with ``include_inputs=True`` of its ``input`` and
``inputs`` too. It returns a :class:`Cache`, a mapping from module path to :class:`Entry`, that
also walks like the model: ``cache["model.layers.2"].output`` is
``cache.model.layers[2].output``. Inside the block its entries are proxies; after the trace the
same cache holds the real values (its plain dict is saved with the trace, like ``lt.save``), and
it holds no reference to the trace or the model, so it pickles and outlives both.

In a generation the reads cover every step from the current one on (a call range, see
:mod:`lazytensor.runtime.calls`), so each entry holds a list with one value per step that ran.
Nothing else is special: the reads are ordinary nodes, so a cache of early modules lets the
forward end after them (:mod:`lazytensor.runtime.executor`), also on a server.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import TraceError
from ..core.site import here
from ..runtime.outcome import IF_CALLED
from .proxy import OpenProxy

if TYPE_CHECKING:
    from .trace import Trace

_OWN = ("output", "input", "inputs")
_MISSING = object()
#: Module classes that only hold modules: they are never called.
_CONTAINERS = frozenset(("ModuleList", "ModuleDict", "ParameterList", "ParameterDict"))


def record(trace: Trace, modules: Any, include_inputs: bool) -> Cache:
    """Record the reads of ``tracer.cache(...)`` (see the module docstring).

    Reads of every module (``modules=None``) are marked :data:`~lazytensor.runtime.outcome.
    IF_CALLED`: a module the forward never calls (a dropout the model skips) is left out of
    the cache rather than failing the run. A module named in ``modules`` must run.
    """
    trace._check_recording()
    root, graph, site = trace.root, trace.graph, here()
    paths = _paths(root, modules)
    call = trace.call
    if trace.generate and type(call) is int and call >= 0:
        call = (call, None, 1)  # this step and every later one
    flags = {IF_CALLED: True} if modules is None else {}
    kinds = _OWN if include_inputs else ("output",)
    ids: dict[str, dict[str, int]] = {}
    for path in paths:
        ids[path] = {}
        for kind in kinds:
            node = graph.add(kind, path, kwargs=dict(flags), call=call, rows=trace.rows, site=site)
            graph.save(node.id)
            ids[path][kind] = node.id
    store = {
        path: {k: OpenProxy.of(trace, i) for k, i in kinds.items()} for path, kinds in ids.items()
    }
    cache = Cache(store, _sizes(root, paths))
    trace.filled.append(_Fill(store, ids))
    return cache


class _Fill:
    """Puts a finished run's values into a cache's store (a class, not a closure, so that the
    trace holding it holds no frame)."""

    def __init__(self, store: dict[str, dict[str, Any]], ids: dict[str, dict[str, int]]) -> None:
        self.store, self.ids = store, ids

    def __call__(self, values: dict[int, Any]) -> None:
        for path, kinds in self.ids.items():
            found = {kind: values.get(i, _MISSING) for kind, i in kinds.items()}
            output = found["output"]
            if output is _MISSING or (isinstance(output, list) and not output):
                del self.store[path]  # the forward never called it: not in the cache
                continue
            self.store[path] = {k: list(v) if isinstance(v, list) else v for k, v in found.items()}


def _paths(root: Any, modules: Any) -> list[str]:
    """The module paths to cache: every module, or those ``modules`` names, checked."""
    if modules is None:  # every module that can be called (not a ModuleList's list)
        return [envoy.path for envoy in root.modules() if _callable(envoy._module)]
    if isinstance(modules, str) or _is_envoy(modules):
        modules = [modules]
    paths: list[str] = []
    for item in modules:
        if isinstance(item, str):
            try:
                found = root.get(item)
            except (AttributeError, KeyError, IndexError) as exc:
                raise AttributeError(f"tracer.cache(modules=...): {exc}") from None
            if not _is_envoy(found):
                raise TypeError(
                    f"tracer.cache(modules=...): {item!r} is a {type(found).__name__}, not a "
                    "module; pass module paths or envoys such as lm.model.layers[0]"
                )
            item = found
        elif not _is_envoy(item):
            raise TypeError(
                f"tracer.cache(modules=...) takes envoys (lm.model.layers[0]) or module paths "
                f"('model.layers.0'), not a {type(item).__name__}"
            )
        if item._tree is not root._tree:
            raise TraceError(
                f"tracer.cache(modules=...): {item!r} is a module of another model than the "
                "one this trace runs"
            )
        if item.path not in paths:
            paths.append(item.path)
    return paths


def _callable(module: Any) -> bool:
    """Whether ``module`` has a forward of its own (a served model's spec: by class name)."""
    if isinstance(module, torch.nn.Module):
        return type(module).forward is not torch.nn.Module.forward
    return getattr(module, "cls_name", None) not in _CONTAINERS


def _is_envoy(value: Any) -> bool:
    return "_tree" in getattr(value, "__dict__", {})


def _sizes(root: Any, paths: list[str]) -> dict[str, int]:
    """How many submodules each indexed container above a cached path has (for ``[-1]``)."""
    sizes: dict[str, int] = {}
    for path in paths:
        parts = path.split(".") if path else []
        for n in range(1, len(parts)):
            prefix = ".".join(parts[:n])
            if parts[n].isdigit() and prefix not in sizes:
                sizes[prefix] = len(root.get(prefix))
    return sizes


class Cache(Mapping):
    """Module path -> :class:`Entry`; also walked like the model (``cache.model.layers[2]``).

    Example:
        >>> with lm.trace("Hello") as tracer:                         # doctest: +SKIP
        ...     cache = tracer.cache(modules=["model.layers.0"])
        >>> cache["model.layers.0"].output.shape                       # doctest: +SKIP
        torch.Size([1, 2, 64])
    """

    def __init__(self, store: dict[str, dict[str, Any]], sizes: dict[str, int]) -> None:
        self._store, self._sizes = store, sizes

    def __getitem__(self, path: str) -> Entry:
        values = self._store.get(path) if isinstance(path, str) else None
        if values is None:
            close = difflib.get_close_matches(str(path), list(self._store), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(
                f"module {path!r} is not in this cache, which holds {len(self._store)} "
                f"module(s){hint} (choose them with tracer.cache(modules=[...]))"
            )
        return Entry(path, values)

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _View(self, name).own(name, "")

    def __repr__(self) -> str:
        shown = ", ".join(repr(p) for p in list(self._store)[:4])
        more = ", ..." if len(self._store) > 4 else ""
        return f"<Cache of {len(self._store)} module(s): {shown}{more}>"


class Entry:
    """What a cache holds for one module: ``.output``, and with ``include_inputs=True``
    ``.input`` (the first argument) and ``.inputs`` (``(args, kwargs)``). In a generation each
    is a list, one value per step."""

    def __init__(self, path: str, values: dict[str, Any]) -> None:
        self._path, self._values = path, values

    def _get(self, kind: str) -> Any:
        if kind not in self._values:
            raise AttributeError(
                f"the cache holds no {kind} of module {self._path!r}: pass "
                "include_inputs=True to tracer.cache(...) to keep inputs too"
            )
        return self._values[kind]

    @property
    def output(self) -> Any:
        return self._get("output")

    @property
    def input(self) -> Any:
        return self._get("input")

    @property
    def inputs(self) -> Any:
        return self._get("inputs")

    def __repr__(self) -> str:
        return f"<cache entry {self._path or '<root>'!r}: {', '.join(self._values)}>"


class _View:
    """A module path being walked in a cache: ``cache.model.layers[2]``."""

    def __init__(self, cache: Cache, path: str) -> None:
        self._cache, self._path = cache, path

    def own(self, name: str, parent: str) -> Any:
        """``parent.name``: the parent's cached output/input(s), or a deeper view. (A
        submodule that is itself called ``output`` is ``cache["path.output"]``.)"""
        if name in _OWN:
            return getattr(self._cache[parent], name)
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _View(self._cache, f"{self._path}.{name}").own(name, self._path)

    def __getitem__(self, key: int | str) -> _View:
        if isinstance(key, int) and key < 0:
            size = self._cache._sizes.get(self._path)
            if size is None or key < -size:
                raise IndexError(f"index {key} is out of range for {self._path!r} in this cache")
            key += size
        return _View(self._cache, f"{self._path}.{key}")

    def __repr__(self) -> str:
        return f"<cache view {self._path!r}>"
