"""Source: the values inside a module's ``forward``, one *site* per call it makes.

A module's forward is code, not modules: ``self.q_proj(x)`` has hooks, ``softmax(scores)``
has none. This module names each call expression in ``type(module).forward`` (its callee's
last name and a count, in source order: ``q_proj_0``, ``view_1``, ``softmax_0``) and, for a run
that reads or writes one of them, runs an *instrumented* copy of the forward in which every call
``f(*a, **k)`` goes through a site function. The site function gives the run's listener the
call's ``(args, kwargs)`` before the call and its result after (each may be replaced), so a
site is a moment like a module's input and output, addressed as ``"<module path>:<site>"``.

Nothing here runs code it did not find in the model's own classes: the forward's source is
parsed from its file, only its call expressions are rewritten, and the copy is compiled with
the original's globals and closure cells. Decorators (``deprecate_kwarg``, a checkpointing
wrapper) are kept by rebuilding each wrapper around the copy. The copy is installed as the
module's instance ``forward`` while a run needs it and removed after (:func:`instrument`).

Attention: Hugging Face models call ``attention_interface(self, q, k, v, mask, ...)``, which is
eager attention or ``torch``'s fused SDPA. The calls of the modeling file's own
``eager_attention_forward`` are sites of the calling module too (``softmax_0`` is the attention
pattern). When a run touches one of them, the call runs an instrumented eager attention
instead of the fused kernel, with SDPA's causal and boolean masks made additive, so its
result equals the fused one up to rounding.
"""

from __future__ import annotations

import ast
import copy
import difflib
import functools
import inspect
import linecache
import types
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..core import tree
from ..core.errors import GraphError
from .plan import POST, PRE

#: Separates a module path from a site name: ``"model.layers.0.self_attn:softmax_0"``.
SEP = ":"
#: The callee through which a Hugging Face forward calls its attention function.
ATTENTION = "attention_interface"
_EAGER = "eager_attention_forward"
_SITE = "__lt_site__"
#: Calls that read their caller's frame: rewriting them would change what they see.
_FRAME_CALLS = frozenset(("super", "locals", "globals", "vars", "eval", "exec", "dir"))


@dataclass(frozen=True)
class Site:
    """One call in a forward: its name, its source line, and the inlined function it is in
    (``""``: the forward itself; ``"eager_attention_forward"``: the attention)."""

    name: str
    line: str
    inside: str = ""


@dataclass(frozen=True)
class _Rewritten:
    """A function whose calls go through a site function, ready to be made per install.

    ``chain`` is the function as the class holds it, outermost wrapper first, the function
    itself last; ``code`` is its rewritten code, whose free variables are the original's plus
    the site function.
    """

    chain: tuple[types.FunctionType, ...]
    code: types.CodeType

    def make(self, site: Any) -> types.FunctionType:
        """The rewritten function calling ``site``, inside copies of the original wrappers."""
        inner = self.chain[-1]
        cells = dict(zip(inner.__code__.co_freevars, inner.__closure__ or ()))
        cells[_SITE] = types.CellType(site)
        new = types.FunctionType(
            self.code,
            inner.__globals__,
            inner.__name__,
            inner.__defaults__,
            tuple(cells[name] for name in self.code.co_freevars),
        )
        new.__kwdefaults__ = inner.__kwdefaults__
        new.__qualname__ = inner.__qualname__
        for wrapper, old in zip(reversed(self.chain[:-1]), reversed(self.chain[1:])):
            new = _rewrap(wrapper, old, new)
        return new


@dataclass(frozen=True)
class Source:
    """The sites of one module class's forward (see the module docstring).

    Attributes:
        cls_name: the class's name.
        sites: in source order; the attention function's after the call that runs it.
        reason: why there are no sites (no source, a wrapper it cannot see through), or ``""``.
        attention: the site of the attention call whose function's sites are inlined.
    """

    cls_name: str
    sites: tuple[Site, ...] = ()
    reason: str = ""
    attention: str = ""
    forward: _Rewritten | None = field(default=None, repr=False)
    eager: _Rewritten | None = field(default=None, repr=False)

    @functools.cached_property
    def names(self) -> frozenset[str]:
        return frozenset(site.name for site in self.sites)

    @functools.cached_property
    def inlined(self) -> frozenset[str]:
        return frozenset(site.name for site in self.sites if site.inside)

    def check(self, name: str) -> None:
        """Raise ``AttributeError`` naming the close matches unless ``name`` is a site."""
        if name not in self.names:
            where = f"{self.cls_name}.forward"
            raise AttributeError(unknown(name, [s.name for s in self.sites], where, self.reason))


def unknown(name: str, names: list[str], where: str, reason: str = "") -> str:
    """The message for a site name that the forward ``where`` names does not have."""
    if not names:
        why = f": {reason}" if reason else ""
        return f"{where} has no source sites{why}"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return f"{where} has no call site {name!r}; {hint}print the module's .source to list its sites"


@functools.cache
def of(cls: type) -> Source:
    """The sites of ``cls.forward``, computed once per class."""
    if cls.forward is torch.nn.Module.forward:
        return Source(cls.__name__, reason="it has no forward of its own")
    try:
        return _read(cls)
    except (OSError, TypeError, ValueError, SyntaxError) as exc:
        return Source(cls.__name__, reason=str(exc))


def _read(cls: type) -> Source:
    chain = _chain(cls.forward)
    tree = _definition(chain[-1])
    inner = chain[-1]
    eager = inner.__globals__.get(_EAGER)
    eager_tree = None
    if isinstance(eager, types.FunctionType) and any(_callee(c) == ATTENTION for c in _calls(tree)):
        try:
            eager_tree = _definition(eager)
        except (OSError, TypeError, ValueError):
            eager_tree = None
    sites, names, attention = _name(inner, tree, eager, eager_tree)
    return Source(
        cls.__name__,
        tuple(sites),
        attention=attention,
        forward=_Rewritten(chain, _compile(inner, tree, names)),
        eager=_Rewritten((eager,), _compile(eager, eager_tree, names)) if attention else None,
    )


# -- finding and rewriting the code ---------------------------------------------------------------
def _chain(function: Any) -> tuple[types.FunctionType, ...]:
    """``function`` and the functions it wraps (``__wrapped__``), outermost first."""
    chain = [function]
    while hasattr(chain[-1], "__wrapped__"):
        wrapper, inner = chain[-1], chain[-1].__wrapped__
        cells = getattr(wrapper, "__closure__", None) or ()
        if not any(_holds(cell, inner) for cell in cells):
            raise TypeError(f"its forward is wrapped by {wrapper!r}, which hides the function")
        chain.append(inner)
    if not all(isinstance(f, types.FunctionType) for f in chain):
        raise TypeError(f"its forward is {function!r}, not a Python function")
    return tuple(chain)


def _holds(cell: Any, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _rewrap(wrapper: types.FunctionType, old: Any, new: Any) -> types.FunctionType:
    """A copy of ``wrapper`` that calls ``new`` where it called ``old``."""
    cells = tuple(
        types.CellType(new) if _holds(cell, old) else cell for cell in wrapper.__closure__ or ()
    )
    copy_ = types.FunctionType(
        wrapper.__code__, wrapper.__globals__, wrapper.__name__, wrapper.__defaults__, cells
    )
    copy_.__kwdefaults__ = wrapper.__kwdefaults__
    copy_.__dict__.update(wrapper.__dict__)
    return copy_


@functools.lru_cache(maxsize=64)
def _parsed(filename: str) -> ast.Module:
    return ast.parse("".join(linecache.getlines(filename)), filename)


def _definition(function: types.FunctionType) -> ast.FunctionDef:
    """A copy of ``function``'s ``def`` in its file, found by its first line."""
    code = function.__code__
    linecache.checkcache(code.co_filename)
    if not linecache.getlines(code.co_filename):
        raise OSError(f"the source of {function.__qualname__} is not available")
    for node in ast.walk(_parsed(code.co_filename)):
        if isinstance(node, ast.FunctionDef) and node.name == function.__name__:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if first == code.co_firstlineno:
                return copy.deepcopy(node)
    raise OSError(f"the definition of {function.__qualname__} was not found in its file")


def _calls(tree: ast.FunctionDef) -> list[ast.Call]:
    """The calls in the body of ``tree``, in source order (an inner call of a chain first)."""
    calls = [
        node
        for statement in tree.body
        for node in ast.walk(statement)
        if isinstance(node, ast.Call)
        and not (isinstance(node.func, ast.Name) and node.func.id in _FRAME_CALLS)
    ]
    return sorted(calls, key=lambda c: (c.lineno, c.col_offset, c.end_lineno, c.end_col_offset))


def _callee(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else "call"


def _name(
    forward: types.FunctionType,
    tree: ast.FunctionDef,
    eager: Any,
    eager_tree: ast.FunctionDef | None,
) -> tuple[list[Site], dict[int, str], str]:
    """Name every call: sites in order, ``{id(call node): name}``, the attention site."""
    counts: dict[str, int] = {}
    sites: list[Site] = []
    names: dict[int, str] = {}
    attention = ""

    def add(call: ast.Call, function: types.FunctionType, inside: str) -> str:
        base = _callee(call)
        name = names[id(call)] = f"{base}_{counts.get(base, 0)}"
        counts[base] = counts.get(base, 0) + 1
        line = linecache.getline(function.__code__.co_filename, call.lineno).strip()
        sites.append(Site(name, line, inside))
        return name

    for call in _calls(tree):
        name = add(call, forward, "")
        if eager_tree is not None and not attention and _callee(call) == ATTENTION:
            attention = name
            for inner in _calls(eager_tree):
                add(inner, eager, _EAGER)
    return sites, names, attention


class _ToSite(ast.NodeTransformer):
    """``f(*a, **k)`` -> ``__lt_site__("f_0", f, *a, **k)`` for every named call."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names

    def visit_Call(self, node: ast.Call) -> ast.AST:
        name = self.names.get(id(node))
        self.generic_visit(node)
        if name is None:
            return node
        site = ast.Name(_SITE, ast.Load())
        call = ast.Call(site, [ast.Constant(name), node.func, *node.args], node.keywords)
        return ast.copy_location(call, node)


def _compile(
    function: types.FunctionType, tree: ast.FunctionDef, names: dict[int, str]
) -> types.CodeType:
    """The code of ``tree`` with its calls rewritten, closing over the original's free
    variables and the site function (a factory's parameters), at the original's lines."""
    tree.decorator_list = []  # the wrappers are the originals' copies (_Rewritten.make)
    tree.body = [_ToSite(names).visit(statement) for statement in tree.body]
    params = [ast.arg(name) for name in (_SITE, *function.__code__.co_freevars)]
    factory = ast.FunctionDef(
        "__lt_factory__",
        ast.arguments([], params, None, [], [], None, []),
        [tree],
        [],
        lineno=tree.lineno,
        end_lineno=tree.end_lineno,
        col_offset=0,
        end_col_offset=0,
    )
    module = ast.fix_missing_locations(ast.Module([factory], []))
    code = compile(module, function.__code__.co_filename, "exec")
    factory_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    return next(
        c
        for c in factory_code.co_consts
        if isinstance(c, types.CodeType) and c.co_name == function.__name__
    )


# -- installing for a run ---------------------------------------------------------------------
class Listener(Protocol):
    """The run's side of an instrumented module (the executor's, in :mod:`.hooks`)."""

    names: frozenset[str]

    def active(self) -> bool:
        """Whether the forward running now is this listener's run."""

    def fire(self, name: str, kind: str, value: Any) -> Any:
        """The site's moment ``kind`` (pre: ``(args, kwargs)``, post: the result): the value,
        or what replaces it."""


class _Installed:
    """The instrumented forward of one module, shared by the runs that listen to it."""

    def __init__(self, module: torch.nn.Module, source: Source) -> None:
        if "forward" in module.__dict__:
            raise GraphError(
                f"this {source.cls_name}'s forward is replaced on the instance (by a library "
                "hook?), so the sites of its class's forward are not what it runs"
            )
        self.module, self.source = module, source
        self.listeners: dict[Listener, frozenset[str]] = {}
        assert source.forward is not None
        self.eager = source.eager.make(self.site) if source.eager is not None else None
        module.forward = types.MethodType(source.forward.make(self.site), module)

    def add(self, listener: Listener) -> None:
        names = listener.names
        if names & self.source.inlined:  # the attention call runs the instrumented eager one
            names = names | {self.source.attention}
        self.listeners[listener] = names

    def site(self, name: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """What each call of the instrumented forward runs."""
        listener = next((lis for lis in self.listeners if lis.active()), None)
        if listener is None or name not in self.listeners[listener]:
            return fn(*args, **kwargs)
        args, kwargs = listener.fire(name, PRE, (args, kwargs))
        if name == self.source.attention and self.eager is not None:
            eager_args, eager_kwargs, empty = _as_eager(fn, self.source, args, kwargs)
            out = self.eager(*eager_args, **eager_kwargs)
            if empty is not None:  # SDPA's output for a query that may attend to nothing
                out = (out[0].masked_fill(empty, 0.0), *out[1:])
        else:
            out = fn(*args, **kwargs)
        return listener.fire(name, POST, out)


_INSTALLED: dict[int, _Installed] = {}  # id(module) -> its installed forward, while one is


class Handle:
    """Removes one listener; the last one out restores the module's own forward."""

    def __init__(self, installed: _Installed, listener: Listener) -> None:
        self.installed, self.listener = installed, listener

    def remove(self) -> None:
        installed = self.installed
        installed.listeners.pop(self.listener, None)
        if not installed.listeners and _INSTALLED.get(id(installed.module)) is installed:
            del _INSTALLED[id(installed.module)]
            installed.module.__dict__.pop("forward", None)


def instrument(module: torch.nn.Module, listener: Listener) -> Handle:
    """Run ``module``'s instrumented forward for ``listener`` until the handle is removed.

    Callers hold one lock around instrumenting and removing (``hooks.LOCK``); every name in
    ``listener.names`` must be a site (:meth:`Source.check`).
    """
    installed = _INSTALLED.get(id(module))
    if installed is None or installed.module is not module:
        installed = _INSTALLED[id(module)] = _Installed(module, of(type(module)))
    installed.add(listener)
    return Handle(installed, listener)


_DATA = (torch.Tensor, int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device)


def is_data(value: Any) -> bool:
    """Whether ``value`` holds only tensors, numbers, strings, dtypes and devices (in
    containers): none of the model's own objects (a module, a cache, a function)."""
    return not tree.any_leaf(lambda leaf: not isinstance(leaf, _DATA), value)


def _as_eager(fn: Any, source: Source, args: tuple, kwargs: dict) -> tuple:
    """The arguments of the eager attention for a call of ``fn`` (eager, or SDPA), and
    where its output must be zero as SDPA's is: the queries a boolean mask lets see nothing."""
    assert source.eager is not None
    eager = source.eager.chain[-1]
    if fn is eager:
        return args, kwargs, None
    if getattr(fn, "__name__", "") != "sdpa_attention_forward":
        raise GraphError(
            f"the sites inside {source.cls_name}'s attention are reachable under eager or sdpa "
            f"attention, and this model uses {getattr(fn, '__name__', fn)!r}; load it with "
            "attn_implementation='eager' or 'sdpa'"
        )
    bound = inspect.signature(eager).bind(*args, **kwargs)
    names = list(bound.signature.parameters)[:5]  # (module, query, key, value, mask)
    module, query, key = (bound.arguments[n] for n in names[:3])
    mask_name = names[4]
    mask = bound.arguments.get(mask_name)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    q, kv = query.shape[-2], key.shape[-2]
    if mask is None and causal and q > 1:  # SDPA's is_causal: aligned at the top left
        mask = torch.ones(q, kv, dtype=torch.bool, device=query.device).tril()  # (q, kv)
    empty = None
    if mask is not None and mask.dtype == torch.bool:  # True attends: make it additive
        if mask.dim() == 4:  # (B, H | 1, q, kv); the output is (B, q, H, D)
            empty = (~mask.any(-1)).transpose(1, 2)[..., None]  # (B, q, H | 1, 1)
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        mask = additive.masked_fill(~mask, torch.finfo(query.dtype).min)
    bound.arguments[mask_name] = mask
    return bound.args, bound.kwargs, empty
