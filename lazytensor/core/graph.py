"""The intervention graph: one node type shared by the recorder, the wire and the executor.

A :class:`Node` is one operation the user wrote inside a trace. Its ``op`` is a member of the
closed vocabulary :data:`OPS`, each member the name of a method of
:class:`lazytensor.executor.Executor`. Arguments are plain data: Python scalars, strings,
slices, ``Ellipsis``, tuples/lists/dicts of these, ``torch.dtype``/``torch.device``, a
:class:`Ref` to an earlier node, or a :class:`Const` naming a tensor in ``Graph.constants``.
There are no closures and no Python objects, so a graph can be sent anywhere as data.

Structure and values are separate: ``Graph.nodes`` is the program, ``Graph.constants`` holds
the tensors the user closed over, so two traces that differ only in those tensors share a
:meth:`Graph.structure_key` (what a compiled replay will cache on).

Point ops read or replace a value at a moment of the forward pass: a module's ``input``,
``inputs`` or ``output`` at its ``call``-th invocation (``EVERY_CALL`` for all of them), for
batch ``rows`` (``None`` = the whole batch), ``result`` (the return value of the run) and
``tokens`` (the tokens a generation chose at its ``call``-th step).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from . import tree
from .site import Site

#: Every op a node may carry; each is also an ``Executor`` method name.
POINT_READS = ("input", "inputs", "output", "result", "tokens")
#: ``skip``: the module does not run; its output is the node's argument (fires with its input).
POINT_WRITES = ("set_input", "set_inputs", "set_output", "skip")
COMPUTE = ("function", "method", "module", "getattr")
#: A user's own Python function (``lazytensor.apply``): the one op that carries code. A
#: server runs it only when started with ``--trusted-clients``.
TRUSTED = ("python",)
#: Backward passes (:mod:`lazytensor.runtime.grads`): ``backward`` runs one on the loss
#: ``args[0]``; ``grad`` reads and ``set_grad`` replaces the gradient of node ``args[0]`` while
#: the backward pass whose node id is ``call`` runs.
GRADIENTS = ("backward", "grad", "set_grad")
#: State a run holds beyond the forward (:mod:`lazytensor.runtime.session`): ``weight`` reads a
#: model parameter or buffer (read-only); ``parameter`` makes a trainable tensor; ``carry``
#: reads value ``args[1]`` of an earlier run ``args[0]`` of the same session; ``optimizer``
#: builds an allow-listed optimizer and ``optimize`` calls its ``step``/``zero_grad``.
STATE = ("weight", "parameter", "carry", "optimizer", "optimize")
#: ``stop`` (``tracer.stop()``): reads the nodes recorded before it; once they have run, the
#: run ends (:mod:`lazytensor.tracing.stop`).
CONTROL = ("stop",)
OPS = frozenset(POINT_READS + POINT_WRITES + COMPUTE + TRUSTED + GRADIENTS + STATE + CONTROL)

#: ``Node.call`` for nodes that run at every call. (A call range is ``(start, stop, step)``,
#: ``stop`` ``None`` for no end: see :mod:`lazytensor.runtime.calls`.)
EVERY_CALL = -1


@dataclass(frozen=True, slots=True)
class Ref:
    """An argument that is the value of node ``id``."""

    id: int


def ref(node_id: int) -> Ref:
    """``Ref(node_id)``, the recorder's way: for the first :data:`SHARED_REFS` ids, the one
    shared instance in :data:`REFS` (a ``Ref`` is immutable, and recording makes one for every
    proxy argument); a hot path may index ``REFS`` itself and call this on an ``IndexError``."""
    if node_id < len(REFS):
        return REFS[node_id]
    if node_id < SHARED_REFS:
        with _GROWING:  # appends in order only: REFS[i] is Ref(i) for every reader
            for i in range(len(REFS), node_id + 1):
                REFS.append(_make_ref(i))
        return REFS[node_id]
    return _make_ref(node_id)


def _make_ref(node_id: int) -> Ref:
    made = _object_new(Ref)
    _set_ref_id(made, node_id)
    return made


#: ``REFS[i]`` is ``Ref(i)``, made on first use, for ids below :data:`SHARED_REFS`.
REFS: list[Ref] = []
SHARED_REFS = 1 << 16
_GROWING = threading.Lock()


#: The keyword arguments of every node :meth:`Graph.add` makes without any: one dict shared by
#: them all (a node's arguments are never changed in place), not one empty dict per node.
NO_KWARGS: dict = {}

#: Makes a ``Ref`` or ``Node`` without its ``__init__``: a dataclass's ``__init__`` reached
#: through ``type.__call__`` costs more than the stores it does. ``Graph.add`` then sets every
#: field of a node itself (``tests/test_graph.py`` checks each against ``Node(...)``), as do
#: ``Graph.add_call`` and the proxy's operators (``tracing.proxy._operator``, checked by
#: ``tests/test_proxy.py``).
_object_new = object.__new__
_set_ref_id = Ref.id.__set__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Const:
    """An argument that is the tensor ``Graph.constants[index]``."""

    index: int


@dataclass(slots=True)
class Node:
    """One recorded operation.

    Attributes:
        id: position in ``Graph.nodes``.
        op: a member of :data:`OPS`.
        target: for point ops and ``module``, the module path (``""`` is the root); for
            ``function`` an allow-listed function name (``"torch.add"``); for ``method`` a
            tensor method name; for ``getattr`` the attribute name; for ``python`` the
            function's qualified name (its serialized code is ``args[0]``).
        args, kwargs: plain-data arguments (see the module docstring).
        call: for point ops, which invocation of the module (``EVERY_CALL`` = all, or a
            range ``(start, stop, step)``).
        rows: for point ops, the batch rows ``(start, stop)`` this node sees, or ``None``.
    """

    id: int
    op: str
    target: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    call: int | tuple = 0
    rows: tuple[int, int] | None = None
    _deps: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)
    _key: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _shape: tuple | None = field(default=None, init=False, repr=False, compare=False)
    #: A :meth:`Graph.add_call` node's shape in brief: ``(target, back_a, back_b)``, each
    #: ``back`` how many nodes before this one the argument's node is (0: a scalar). Equal codes
    #: at one position mean equal shapes, so the plan cache keys on them where nodes have one
    #: (a string and two small ints hash and compare faster than a shape).
    _code: tuple[str, int, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_point(self) -> bool:
        return self.op in POINT_READS or self.op in POINT_WRITES

    def refs(self) -> list[int]:
        """Ids of the nodes this node reads, in argument order."""
        found: list[int] = []
        _collect_refs(self.args, found)
        _collect_refs(self.kwargs, found)
        return found

    def deps(self) -> tuple[int, ...]:
        """The distinct ids this node reads, ascending (computed once: args never change)."""
        if self._deps is None:
            if self._code is not None:
                self._decode()
            else:
                self._deps = tuple(sorted(set(self.refs()))) if self.args or self.kwargs else ()
        return self._deps

    def shape(self) -> tuple:
        """What a replay plan needs of this node (cheap: no walk into nested arguments): op,
        target, the nodes it reads, its call, the :func:`pattern` of its positional arguments
        and its keyword names with an ``inplace=True`` flag. Equal shapes plan alike, and
        replay alike (:mod:`lazytensor.runtime.chains` generates code per shape)."""
        if self._shape is None:
            if self._code is not None:
                self._decode()
                return self._shape  # type: ignore[return-value]
            kwargs = self.kwargs
            self._shape = (
                self.op,
                self.target,
                self.deps(),
                self.call,
                pattern(self.args),
                (tuple(kwargs), kwargs.get("inplace") is True) if kwargs else (),
            )
        return self._shape

    def _decode(self) -> None:
        """Fill in ``_deps`` and ``_shape`` of a node made by :meth:`Graph.add_call`."""
        _, back_a, back_b = self._code  # type: ignore[misc]
        i = self.id
        pattern = (i - back_a if back_a else None, i - back_b if back_b else None)
        reads = {p for p in pattern if p is not None}
        self._deps = tuple(sorted(reads))
        self._shape = ("function", self.target, self._deps, 0, pattern, ())

    def key(self) -> tuple:
        """This node's part of :meth:`Graph.structure_key` (computed once)."""
        if self._key is None:
            self._key = (
                self.op,
                self.target,
                _freeze(self.args),
                _freeze(self.kwargs),
                self.call,
                self.rows,
            )
        return self._key


#: Argument types a node carries as themselves (its value is read from the node at replay).
SCALARS = frozenset((int, float, bool, str, type(None)))
#: Index items that are graph data as they are: the scalars and ``...`` (a recorded index such as
#: ``h[..., 0]`` keeps them; a replay uses them unchanged).
INDEX_ATOMS = SCALARS | {type(Ellipsis)}
#: :func:`pattern`'s mark for an argument that is neither a node's value nor a scalar.
OTHER = -1


def pattern(args: tuple) -> tuple:
    """Per positional argument: the node id of a :class:`Ref`, ``None`` for a scalar (one of
    :data:`SCALARS`), :data:`OTHER` for anything else (a constant, a slice, a container)."""
    return tuple([a.id if type(a) is Ref else None if type(a) in SCALARS else OTHER for a in args])


def _collect_refs(value: Any, found: list[int]) -> None:
    found.extend(leaf.id for leaf in tree.leaves(value) if type(leaf) is Ref)


@dataclass
class Batch:
    """What the model is run on: ``model(*args, **kwargs)``, or ``model.generate(...)``.

    ``size`` is the number of batch rows the inputs hold (what invokes' ``rows`` index).
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    size: int = 1
    generate: bool = False


@dataclass
class Segment:
    """One run of a session: a graph run inside the model on ``batch``, or, with no batch,
    session code run between traces (optimizer steps, trainable tensors)."""

    graph: Graph
    batch: Batch | None = None


@dataclass
class Graph:
    """A recorded program: nodes in recording order, the tensors they use, what to return.

    ``sites`` runs parallel to ``nodes`` and holds each node's user ``file:line``; it is
    metadata for error messages and never changes what the graph computes.
    """

    nodes: list[Node] = field(default_factory=list)
    constants: list[Any] = field(default_factory=list)
    saved: list[int] = field(default_factory=list)
    sites: list[Site | None] = field(default_factory=list)
    #: ``(node count, plan)`` of the last replay plan (see :class:`lazytensor.runtime.plan.Plan`).
    planned: Any = field(default=None, repr=False, compare=False)

    def add(
        self,
        op: str,
        target: str,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        call: int | tuple = 0,
        rows: tuple[int, int] | None = None,
        site: Site | None = None,
    ) -> Node:
        assert op in OPS, op
        nodes = self.nodes
        node = _object_new(Node)  # Node(len(nodes), op, ...) without __init__: see _object_new
        node.id = len(nodes)
        node.op = op
        node.target = target
        node.args = args
        node.kwargs = kwargs or NO_KWARGS
        node.call = call
        node.rows = rows
        node._deps = node._key = node._shape = node._code = None
        nodes.append(node)
        self.sites.append(site)
        return node

    def add_call(
        self, target: str, args: tuple, a: int | None, b: int | None, site: Site | None
    ) -> int:
        """Append ``function`` node ``target(*args)`` and return its id: :meth:`add` for the
        recorder's operators (``h * 2.0``), two arguments each a :class:`Ref` or a scalar;
        ``a`` and ``b`` are the nodes they read (``None``: a scalar). The node keeps its
        code (``_code``); its reads and :meth:`Node.shape` follow from it when asked."""
        nodes = self.nodes
        i = len(nodes)
        node = _object_new(Node)  # as in add
        node.id = i
        node.op = "function"
        node.target = target
        node.args = args
        node.kwargs = NO_KWARGS
        node.call = 0
        node.rows = None
        node._deps = node._key = node._shape = None
        node._code = (target, 0 if a is None else i - a, 0 if b is None else i - b)
        nodes.append(node)
        self.sites.append(site)
        return i

    def constant(self, tensor: Any) -> Const:
        """Store ``tensor`` once (by identity) and return the argument that names it."""
        for index, known in enumerate(self.constants):
            if known is tensor:
                return Const(index)
        self.constants.append(tensor)
        return Const(len(self.constants) - 1)

    def save(self, node_id: int) -> None:
        if node_id not in self.saved:
            self.saved.append(node_id)

    def prefix(self, stop: int) -> Graph:
        """The graph of nodes ``0..stop`` inclusive, saving only node ``stop``."""
        return Graph(self.nodes[: stop + 1], self.constants, [stop], self.sites[: stop + 1])

    def structure_key(self) -> tuple:
        """A hashable key equal for graphs that differ only in constant *values*."""
        consts = tuple((tuple(t.shape), str(t.dtype)) for t in self.constants)
        return tuple([n.key() for n in self.nodes]), consts, tuple(self.saved)


#: What :func:`_freeze` gives the plain containers' and numbers' own types, without asking
#: for the ``_fields`` and ``cls_name`` they lack (each such miss raises and catches inside
#: ``getattr``: most of a node's key cost).
_PLAIN_KINDS = {kind: (kind.__name__, None) for kind in (tuple, list, dict, slice)}
_NUMBERS = frozenset((bool, int, float, complex))
_ATOMS = frozenset((type(None), str, Ref, Const))  # hashable, and their own key


def _freeze(value: Any) -> Any:
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind in _NUMBERS:
        return (kind.__name__, repr(value))
    plain = _PLAIN_KINDS.get(kind)
    if plain is not None:
        if kind is dict:
            return (plain, tuple(value), *[_freeze(v) for v in value.values()])
        items = (value.start, value.stop, value.step) if kind is slice else value
        return (plain, (), *[_freeze(v) for v in items])
    if tree.is_container(value):
        keys = tuple(value) if isinstance(value, dict) else getattr(value, "_fields", ())
        kind = (type(value).__name__, getattr(value, "cls_name", None))  # a record's own name
        return (kind, keys, *(_freeze(v) for v in tree.children(value)))
    if isinstance(value, (bool, int, float, complex)):
        # 1 == 1.0 == True, yet x[True] is not x[1] and arange(3.0) is not arange(3)
        return (type(value).__name__, repr(value))
    return value
