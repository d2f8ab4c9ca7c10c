"""Proxy: a stand-in for a value the forward pass has not computed yet.

A proxy is one node of its trace's graph. Everything done to it (torch functions through
``__torch_function__``, tensor methods, Python operators, indexing, attribute access) asks its
trace to record a new node and returns the new node's proxy. The proxy records; the trace
decides: what ``bool``, ``len``, ``.item()`` or ``print`` do is the trace's policy
(:meth:`lazytensor.tracing.trace.Trace.materialize`), and after the ``with`` block the trace answers
with real values, so a saved proxy then behaves like the value it stands for.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from ..core import ops
from ..core.errors import TraceError
from ..core.graph import INDEX_ATOMS, NO_KWARGS, OTHER, SCALARS, Node, _object_new, ref
from ..core.graph import REFS as _REFS
from ..core.site import KNOWN as _KNOWN_SITES
from ..core.site import at as _site_at
from .state import State

if TYPE_CHECKING:
    from .trace import Trace

_getframe = sys._getframe
_RECORDING = State.RECORDING


class Proxy:
    """A lazy value: node ``node`` of ``trace``'s graph.

    A ``Proxy`` stands for what a tensor op makes (an operator, a tensor method or torch
    function, an index of such a value): a tensor, or a tuple of them (``h.max(-1)``,
    ``torch.split``). Its class has a property for every public attribute of a tensor and
    every field of torch's named tuples (``.T``, ``.mT``, ``.values``, ``.eigenvalues``),
    each asking the trace as any attribute does (:meth:`Trace.attribute`), and no
    ``__getattr__``: with one, the interpreter cannot specialize a load of the proxy's own
    slots, and each recorded op loads two or four of them (:class:`OpenProxy`). A value whose
    kind is not known (a module's output, an item or attribute of one) is an
    :class:`OpenProxy`, which takes any name."""

    __slots__ = ("_trace", "_node")

    @classmethod
    def of(cls, trace: Trace, node: int) -> Proxy:
        """The proxy of node ``node`` of ``trace``.

        One is made for every recorded op, so the fast way: the class has no ``__init__``, so
        ``cls()`` is a plain allocation (cheaper than ``object.__new__(cls)``), and it has no
        ``__setattr__``, so storing a slot is the interpreter's specialized store (see
        :data:`SETTABLE`)."""
        made = cls()
        made._trace = trace
        made._node = node
        return made

    # -- the public surface -------------------------------------------------------------
    def save(self) -> Proxy:
        """Keep this value after the trace; returns ``self``."""
        self._trace.save(self)
        return self

    @property
    def value(self) -> Any:
        """The real value (after the trace, or once materialized)."""
        return self._trace.value_of(self)

    @property
    def shape(self) -> Any:
        return self._trace.attribute(self, "shape")

    @property
    def dtype(self) -> Any:
        return self._trace.attribute(self, "dtype")

    @property
    def device(self) -> Any:
        return self._trace.attribute(self, "device")

    @property
    def ndim(self) -> Any:
        return self._trace.attribute(self, "ndim")

    # -- recording ------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        trace = _trace_of(args, kwargs)
        return trace.apply_torch(func, args, kwargs or {})

    def __getitem__(self, key: Any) -> Proxy:
        trace = self._trace
        if trace.state is _RECORDING and _plain_index(key):  # h[:, 0]: see _record
            node = self._node
            args, pattern = (_ref(node), key), (node, None if type(key) in SCALARS else OTHER)
            return _record(
                trace, "function", "operator.getitem", args, (node,), pattern, kind=type(self)
            )
        return trace.apply("function", "operator.getitem", (self, key), depth=2)

    def __setitem__(self, key: Any, value: Any) -> None:
        trace = self._trace
        if trace.state is _RECORDING and _plain_index(key):
            node = self._node
            index = None if type(key) in SCALARS else OTHER
            kind = type(value)
            if kind in SCALARS:
                args, pattern = (_ref(node), key, value), (node, index, None)
                _record(trace, "function", "operator.setitem", args, (node,), pattern)
                return
            if (kind is Proxy or kind is OpenProxy) and value._trace is trace:
                read = value._node
                args, pattern = (_ref(node), key, _ref(read)), (node, index, read)
                _record(trace, "function", "operator.setitem", args, _two(node, read), pattern)
                return
        trace.apply("function", "operator.setitem", (self, key, value), depth=2)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._trace.call_value(self, args, kwargs)

    # -- materialization points (policy lives in Trace.materialize) ------------------------
    def __bool__(self) -> bool:
        return self._trace.materialize(self, bool)

    def __int__(self) -> int:
        return self._trace.materialize(self, int)

    def __float__(self) -> float:
        return self._trace.materialize(self, float)

    def __index__(self) -> int:
        return self._trace.materialize(self, _index)

    def __repr__(self) -> str:
        return self._trace.materialize(self, repr)

    def __str__(self) -> str:
        return self._trace.materialize(self, str)

    def __format__(self, spec: str) -> str:
        return self._trace.materialize(self, lambda v: format(v, spec))

    def __len__(self) -> int:
        return self._trace.length(self)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __contains__(self, item: Any) -> bool:
        return self._trace.materialize(self, lambda v: item in v)

    def __hash__(self) -> int:
        return id(self)

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        return self._trace.materialize(self, lambda v: v.__array__(*args, **kwargs))

    def __reduce__(self):
        raise TraceError("a proxy cannot be pickled; save it and pickle .value after the trace")


class OpenProxy(Proxy):
    """A lazy value of a kind not known while recording (a module's input or output, an item
    or attribute of one, a user function's result): any attribute name is asked of the trace
    (``out.logits``, ``cache.key_cache``), which records it or says what is wrong."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._trace.attribute(self, name)


#: The two proxy classes, for ``type(x) in PROXIES`` (``isinstance`` costs more; the hottest
#: paths compare with each class directly).
PROXIES = frozenset((Proxy, OpenProxy))


#: Names :meth:`Trace.attribute` has answered with a :class:`Method` while recording (allowed
#: tensor methods that are not meta or value methods): it answers them so again at once, as does
#: a proxy's property for the name.
PLAIN_METHODS: set[str] = set()


class Method:
    """A tensor method looked up on a proxy, recorded when called."""

    __slots__ = ("trace", "proxy", "name")

    def __init__(self, trace: Trace, proxy: Proxy, name: str) -> None:
        self.trace, self.proxy, self.name = trace, proxy, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trace, proxy = self.trace, self.proxy
        # h.sum(-1), h.norm(dim=-1), see _record; not a method of an ended trace's proxy,
        # which a session's trace records (Trace.attribute routes it): apply carries it over
        if trace.state is _RECORDING and proxy._trace is trace:
            plain = "out" not in kwargs  # apply says what is wrong with out=
            for arg in args:
                if type(arg) not in SCALARS:
                    plain = False
                    break
            if plain and kwargs:
                for value in kwargs.values():
                    if type(value) not in SCALARS:
                        plain = False
                        break
            if plain:
                node = proxy._node
                pattern = (node,) + (_NONES[len(args)] if len(args) < 8 else (None,) * len(args))
                args = (_ref(node), *args)
                if not kwargs:
                    return _record(trace, "method", self.name, args, (node,), pattern)
                keywords = (tuple(kwargs), kwargs.get("inplace") is True)  # as Node.shape has it
                return _record(trace, "method", self.name, args, (node,), pattern, kwargs, keywords)
        return trace.apply("method", self.name, (proxy, *args), kwargs, depth=2)


def _plain_index(key: Any) -> bool:
    """Whether ``key`` is graph data as it is (what ``Trace.apply`` would record unchanged): a
    scalar, ``...``, a slice of scalars, or a tuple of these (``h[:, -1]``, ``h[0]``)."""
    kind = type(key)
    if kind is tuple:
        for item in key:
            kind = type(item)
            if kind in INDEX_ATOMS:
                continue
            if kind is not slice or not _plain_slice(item):
                return False
        return True
    return kind in INDEX_ATOMS or (kind is slice and _plain_slice(key))


def _plain_slice(key: slice) -> bool:
    return type(key.start) in SCALARS and type(key.stop) in SCALARS and type(key.step) in SCALARS


def _ref(node: int) -> Any:
    """``graph.ref(node)``, the operators' way (``REFS`` first): 300 instructions less an
    indexing op than calling ``ref`` (callgrind)."""
    try:
        return _REFS[node]
    except IndexError:
        return ref(node)


def _two(a: int, b: int) -> tuple[int, ...]:
    return (a,) if a == b else (a, b) if a < b else (b, a)


def _record(
    trace: Trace,
    op: str,
    target: str,
    args: tuple,
    deps: tuple,
    pattern: tuple,
    kwargs: dict = NO_KWARGS,
    keywords: tuple = (),
    kind: type = Proxy,
) -> Proxy:
    """Record node ``op target(*args, **kwargs)`` reading ``deps`` and return its proxy: what
    ``Trace.apply`` does, for the callers that have checked everything it checks (the trace
    recording, ``target`` allowed, ``args`` graph data with the reads ``deps`` and the
    :func:`~lazytensor.core.graph.pattern` ``pattern``, ``kwargs`` a new dict of scalars with
    the shape's part ``keywords``, no ``out=``). The node's
    :meth:`~lazytensor.core.graph.Node.shape` is made with it: a replay asks every node for its
    shape (the plan cache's key), and working it out then costs more than making it here.
    Indexing (``h[:, i]``, ``h[:, i] = 0``) and tensor methods with scalar arguments
    (``h.sum(-1)``, ``h.norm(dim=-1)``) take it: per head or position loops record these
    thousands of times, and through ``apply`` (a frame more, the generic conversion of each
    argument, ``Graph.add``'s keywords) recording ``h[:, 0]`` took 21.1k instructions
    (callgrind). The user's line is two frames up (this function, the proxy's method);
    ``site.at`` walks on from an internal frame (``Proxy.__iter__``). (Torch functions,
    ``torch.relu(h)``, gain nothing from it: most of their 24k instructions are torch's
    dispatch to the torch-function mode.) ``kind``: the new proxy's class (an index of an
    :class:`OpenProxy` is one too)."""
    try:
        frame = _getframe(2)
    except ValueError:  # called from the top of the stack
        frame = _getframe(1)
    site = _KNOWN_SITES.get(frame.f_lasti)
    if site is None or site[0] is not frame.f_code:  # see site.KNOWN
        site = _site_at(frame)
    graph = trace.graph
    nodes = graph.nodes
    i = len(nodes)
    made = _object_new(Node)  # Graph.add, written out: see _operator
    made.id = i
    made.op = op
    made.target = target
    made.args = args
    made.kwargs = kwargs
    made.call = 0
    made.rows = None
    made._deps = deps
    made._shape = (op, target, deps, 0, pattern, keywords)
    made._key = made._code = None
    nodes.append(made)
    graph.sites.append(site)
    proxy = kind()
    proxy._trace = trace
    proxy._node = i
    return proxy


#: ``_NONES[k]``: the pattern of ``k`` scalar arguments.
_NONES = tuple((None,) * k for k in range(8))


def _index(value: Any) -> int:
    return value.__index__()


def _trace_of(args: Any, kwargs: Any) -> Trace:
    for item in (*args, *(kwargs or {}).values()):
        if isinstance(item, Proxy):
            return item._trace
        if isinstance(item, (tuple, list)):
            for inner in item:
                if isinstance(inner, Proxy):
                    return inner._trace
    raise AssertionError("__torch_function__ reached Proxy without a proxy argument")


def _binary(name: str):
    return _operator(name, ops.DUNDERS[name], False)


def _reflected(name: str):
    return _operator(name, ops.REFLECTED[name], True)


def _operator(name: str, target: str, reflected: bool):
    """The method of Python operator ``target`` (``h * 2.0``; ``2.0 * h`` when ``reflected``):
    what ``Trace.apply`` records, with ``Graph.add_call``'s node, written out in the method
    itself: two Python frames less per op on the path that loops over heads and positions
    take thousands of times (callgrind, recording ``h * 1.0001 + 0.0``: 10.37k -> 9.03k
    instructions an op). It takes the other operand a proxy of this trace or a plain scalar,
    the trace recording, the user's line one frame up; anything else takes
    ``Trace._operator_slowly``."""

    def method(self: Proxy, other: Any) -> Any:
        trace = self._trace
        node = self._node
        kind = type(other)
        if kind in SCALARS:
            theirs, read = other, None
        elif (kind is Proxy or kind is OpenProxy) and other._trace is trace:
            read = other._node
            try:
                theirs = _REFS[read]
            except IndexError:
                theirs = ref(read)
        else:
            return trace._operator_slowly(target, node, other, reflected, 3)
        if trace.state is not _RECORDING:
            return trace._operator_slowly(target, node, other, reflected, 3)
        try:
            mine = _REFS[node]
        except IndexError:
            mine = ref(node)
        frame = _getframe(1)
        site = _KNOWN_SITES.get(frame.f_lasti)
        if site is None or site[0] is not frame.f_code:  # see site.KNOWN
            site = _site_at(frame)
        # Graph.add_call written out too (its fields, its code in brief): a frame less again.
        graph = trace.graph
        nodes = graph.nodes
        i = len(nodes)
        made = _object_new(Node)
        made.id = i
        made.op = "function"
        made.target = target
        if reflected:
            made.args = (theirs, mine)
            made._code = (target, 0 if read is None else i - read, i - node)
        else:
            made.args = (mine, theirs)
            made._code = (target, i - node, 0 if read is None else i - read)
        made.kwargs = NO_KWARGS
        made.call = 0
        made.rows = None
        made._deps = made._key = made._shape = None
        nodes.append(made)
        graph.sites.append(site)
        proxy = Proxy()
        proxy._trace = trace
        proxy._node = i
        return proxy

    method.__name__ = name
    return method


def _unary(name: str):
    target = ops.DUNDERS[name]

    def method(self: Proxy) -> Any:
        return self._trace.apply("function", target, (self,), depth=2)

    method.__name__ = name
    return method


def _inplace(name: str):
    target = ops.INPLACE[name]

    def method(self: Proxy, other: Any) -> Any:
        return self._trace.apply("method", target, (self, other), depth=2)

    method.__name__ = name
    return method


def _method_attribute(name: str) -> property:
    def read(self: Proxy) -> Any:
        trace = self._trace
        if name in PLAIN_METHODS and trace.state is _RECORDING:  # Trace.attribute's first case
            method = _object_new(Method)
            method.trace, method.proxy, method.name = trace, self, name
            return method
        return trace.attribute(self, name)

    read.__name__ = name
    return property(read, doc=f"``proxy.{name}``: asks the trace (``Trace.attribute``)")


for _name in ops.DUNDERS:
    if _name in ("__getitem__", "__setitem__"):
        continue
    _unary_names = ("__neg__", "__pos__", "__abs__", "__invert__")
    setattr(Proxy, _name, _unary(_name) if _name in _unary_names else _binary(_name))
for _name in ops.REFLECTED:
    setattr(Proxy, _name, _reflected(_name))
for _name in ops.INPLACE:
    setattr(Proxy, _name, _inplace(_name))
# The allowed tensor methods (``h.sum``) are found on the class, so they skip __getattr__: Python
# reaches that only after raising and catching an AttributeError, which costs more than the op.
for _name in dir(torch.Tensor):
    if not _name.startswith("_") and ops.is_method(_name) and not hasattr(Proxy, _name):
        setattr(Proxy, _name, _method_attribute(_name))


def _attribute(name: str) -> property:
    def read(self: Proxy) -> Any:
        return self._trace.attribute(self, name)

    read.__name__ = name
    return property(read, doc=f"``proxy.{name}``: asks the trace (``Trace.attribute``)")


def _settable(name: str) -> property:
    def write(self: Proxy, value: Any) -> None:
        self._trace.set_attribute(self, name, value)

    write.__name__ = name
    return property(
        _attribute(name).fget, write, doc=f"``proxy.{name}`` (``= value``): asks the trace"
    )


#: The attribute names a proxy takes writes to (``h.grad = g``; the trace answers the others
#: with an error that says what to do instead). A proxy has no ``__setattr__``: with one, the
#: interpreter cannot specialize any store into a proxy's slots, and storing the two slots of
#: the proxy every recorded op makes through their descriptors cost ~1.2k instructions an op,
#: 14% of recording ``h * 1.0001`` (callgrind). Writing any other name raises Python's own
#: ``AttributeError`` at the user's line. Reading one asks the trace, as any attribute does.
SETTABLE = ("grad", "data", "requires_grad", "logits", "loss", "last_hidden_state",
            "hidden_states", "attentions", "past_key_values")  # fmt: skip
for _name in SETTABLE:
    setattr(Proxy, _name, _settable(_name))


def _return_fields() -> list[str]:
    """The field names of torch's named tuples (``torch.return_types``)."""
    from types import MemberDescriptorType

    import torch.return_types

    return [
        field
        for kind in vars(torch.return_types).values()
        if isinstance(kind, type)
        for field, member in vars(kind).items()
        if isinstance(member, MemberDescriptorType)
    ]


# Every other public name of a tensor (``.T``, ``.values``, ``.backward``) and every field of
# torch's named tuples (``h.max(-1).indices``, ``torch.linalg.eigh(a).eigenvalues``): a Proxy
# answers them as an OpenProxy does, without a __getattr__ (see Proxy).
for _name in (*dir(torch.Tensor), *_return_fields()):
    if not _name.startswith("_") and not hasattr(Proxy, _name):
        setattr(Proxy, _name, _attribute(_name))
