"""Hooks: the executor's own forward hooks, and keeping the user's out of shape-only passes.

:func:`install` registers the executor's hooks: a pre-hook or a forward hook on each module a
point node names, and, for generation, a pre-hook on the model that counts steps and reads
each forward's row layout. A hook hands its moment to the executor and gives PyTorch back
what the point writes replaced. Each is marked (:func:`mark`).

During a shape-only pass the model runs on fake tensors, which the user's own forward hooks (a
logger, a cache) must never see: :func:`quiet` takes them off the model's modules, and the
global ones, for the duration of the pass and puts them back after, also on error. Hooks of the
model's own libraries (Hugging Face's capture of ``hidden_states``) stay: the model needs them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.modules import module as torch_module

from ..core.errors import GraphError, NodeFailure, OpNotAllowedError
from . import skips, source
from .moments import TOKENS_KEY, forward_layout
from .plan import POST, PRE, Key

if TYPE_CHECKING:
    from .executor import Executor

#: The executor running in this thread/context. Hooks live on the shared module, so a hook
#: must ignore forward passes that another thread runs on the same model at the same time.
running: ContextVar[Executor | None] = ContextVar("lazytensor_executor", default=None)

_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")


def install(ex: Executor) -> list[Any]:
    """Register ``ex``'s hooks; the handles to remove them with. Resolves the modules of
    ``module`` nodes too (a wrong path is a failure of the node that names it)."""
    handles = []
    try:
        if ex.batch.generate:  # each forward is a step, with rows of its own
            root = ex.model.register_forward_pre_hook(_root(ex), with_kwargs=True, prepend=True)
            handles.append(root)
        else:
            ex.forwards = 1
            ex.layout = forward_layout(ex.batch.args, ex.batch.kwargs, ex.batch.size)
        sites: dict[str, list[tuple[str, int]]] = {}  # module path -> (site name, node)
        for key, ids in ex.points.items():
            if key[1] in (PRE, POST) and source.SEP in key[0]:
                path, _, name = key[0].partition(source.SEP)
                sites.setdefault(path, []).append((name, ids[0]))
            elif key[1] in (PRE, POST):
                handles.append(_register(_module(ex, key[0], ids[0]), key, ex))
            elif key == TOKENS_KEY and not ex.batch.generate:
                raise NodeFailure(ids[0], GraphError("only a generation has tokens"))
        for path, names in sites.items():
            handles.append(_instrument(ex, path, names))
        handles.extend(skips.install(ex, running))  # after the hooks, which resolve the paths
        if ex.plan.modules:
            first = {n.target: n.id for n in reversed(ex.graph.nodes) if n.op == "module"}
            ex.modules = {path: _module(ex, path, first[path]) for path in ex.plan.modules}
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def _module(ex: Executor, path: str, node: int) -> torch.nn.Module:
    try:
        return submodule(ex.model, path)
    except AttributeError as exc:
        raise NodeFailure(node, AttributeError(f"the model has no module {path!r}")) from exc


def submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """``model.get_submodule(path)``, read straight from each module's registered children
    (one dict lookup per name, where ``get_submodule`` asks ``hasattr`` and ``getattr`` of
    ``Module.__getattr__``); anything else, and every error, is ``get_submodule``'s."""
    module = model
    for name in path.split(".") if path else ():
        kind = type(module)
        child = module._modules.get(name) if kind.__getattr__ is _GETATTR else None
        if child is None or name in module.__dict__ or _on_class(kind, name):
            return model.get_submodule(path)  # missing, or shadowed by an attribute
        module = child
    return module


@functools.lru_cache(maxsize=4096)
def _on_class(kind: type, name: str) -> bool:
    """Whether a class of ``kind``'s MRO defines ``name`` (which would shadow a child of that
    name); kept per class and name, as a model's classes do not change between runs."""
    return any(name in c.__dict__ for c in kind.__mro__)


_GETATTR = torch.nn.Module.__getattr__


def _root(ex: Executor) -> Callable:
    def hook(module, args, kwargs):
        """Before each forward of the model: a new step, and the layout of its rows."""
        if running.get() is ex and ex.side is None:
            ex.forwards += 1
            ex.layout = forward_layout(args, kwargs, ex.batch.size)

    return mark(hook)


class Escaped(BaseException):
    """A failure inside a hook, carried out of the model's forward to the executor, which
    raises ``error`` again: as a ``BaseException`` it skips PyTorch's ``Exception`` handler,
    which iterates hook dicts that other threads may be changing (see ``executor._Stop``)."""

    def __init__(self, error: Exception) -> None:
        super().__init__("a failure inside a hook, on its way to the executor")
        self.error: Exception | None = error


def _moment(ex: Executor, key: Key, value: Any) -> Any:
    """Hand ``ex`` the moment ``key`` with ``value``: what replaces the value, or None."""
    if running.get() is not ex or not ex.sides.listens(ex.side, key):
        return None
    ex.current, ex.replaced = value, False
    try:
        ex._fire(key)
    except Exception as exc:
        raise Escaped(exc) from None
    new, ex.current = ex.current, None
    return new if ex.replaced else None


def _register(module: torch.nn.Module, key: Key, ex: Executor) -> Any:
    if key[1] == PRE:
        pre = mark(lambda module, args, kwargs: _moment(ex, key, (args, kwargs)))
        return module.register_forward_pre_hook(pre, with_kwargs=True)
    return module.register_forward_hook(mark(lambda module, args, output: _moment(ex, key, output)))


class _Sites:
    """The executor's side of a module whose forward :mod:`.source` instruments: its sites'
    moments are the executor's, like a module hook's."""

    def __init__(self, ex: Executor, path: str, names: frozenset[str]) -> None:
        self.ex, self.path, self.names = ex, path, names

    def active(self) -> bool:
        return running.get() is self.ex

    def fire(self, name: str, kind: str, value: Any) -> Any:
        key = (f"{self.path}{source.SEP}{name}", kind)
        new = _moment(self.ex, key, value) if key in self.ex.points else None
        if new is None:
            return value
        if not self.ex.trusted and not (source.is_data(value) and source.is_data(new)):
            # A call's values may be the model's own objects (a module, a function): an
            # untrusted graph must not swap which ones the server's code goes on to use.
            write = next(i for i in self.ex.points[key] if self.ex.graph.nodes[i].op[:4] == "set_")
            refused = OpNotAllowedError(
                f"{key[0]}'s {'inputs' if kind == PRE else 'output'} hold Python objects, not "
                "only tensors and numbers; this server lets a graph replace data only"
            )
            raise NodeFailure(write, refused)
        return new


def _instrument(ex: Executor, path: str, names: list[tuple[str, int]]) -> Any:
    """Run the instrumented forward of the module at ``path`` for the sites ``names`` read."""
    module = _module(ex, path, names[0][1])
    sites = source.of(type(module))
    for name, node in names:
        try:
            sites.check(name)
        except AttributeError as exc:
            raise NodeFailure(node, exc) from None
    try:
        return source.instrument(module, _Sites(ex, path, frozenset(n for n, _ in names)))
    except GraphError as exc:
        raise NodeFailure(names[0][1], exc) from None


def mark(hook: Callable) -> Callable:
    """Mark ``hook`` as the executor's own: :func:`quiet` leaves it in place."""
    hook._lazytensor = True  # type: ignore[attr-defined]
    return hook


#: Libraries whose forward hooks are part of how the model computes (Hugging Face's output
#: capture fills ``hidden_states``): they stay during a shape-only pass.
_LIBRARIES = frozenset(("transformers", "accelerate", "peft", "torch"))


def _kept(hook: Callable) -> bool:
    """The executor's own hooks and the model libraries': not the user's."""
    if getattr(hook, "_lazytensor", False):
        return True
    function = getattr(hook, "func", hook)  # a functools.partial
    return (getattr(function, "__module__", None) or "").split(".")[0] in _LIBRARIES


#: Held while hooks are taken off for a shape-only pass or put back, and while the executor
#: registers or removes its own: the hook dicts are shared by every thread using the model.
LOCK = threading.RLock()


@contextlib.contextmanager
def quiet(model: torch.nn.Module) -> Iterator[None]:
    """Run the block without the user's forward hooks on ``model`` (and global ones).

    The hook dicts stay the same objects (a hook's handle removes it from the dict it was
    added to, from any thread): the user's hooks are taken out in place and put back in
    their places afterwards, also on error.
    """
    stashed: list[tuple[OrderedDict, list, list]] = []
    owners = [(m, _MODULE_HOOKS) for m in model.modules()] + [(torch_module, _GLOBAL_HOOKS)]
    with LOCK:
        for owner, names in owners:
            for name in names:
                hooks = getattr(owner, name)
                users = [(k, h) for k, h in hooks.items() if not _kept(h)]
                if users:
                    stashed.append((hooks, list(hooks), users))
                    for key, _ in users:
                        del hooks[key]
    try:
        yield
    finally:
        with LOCK:
            for hooks, order, users in stashed:
                now = dict(hooks)
                now.update((k, h) for k, h in users if k not in now)
                hooks.clear()
                hooks.update((k, now.pop(k)) for k in order if k in now)
                hooks.update(now)  # added during the pass: after the others
