"""Messages: every request and reply between client and server, as frozen dataclasses.

Each message class has a ``KIND`` (the string on the wire), builds its body with ``body()``
and is rebuilt from a peer's body by ``from_body``, which checks every field and raises
:class:`~lazytensor.core.errors.ProtocolError` for anything a correct peer would not send. A
server matches on these classes, never on dict keys. :func:`encode` turns a message into frames
and :func:`decode_request` / :func:`decode_reply` turn frames back into one.

A client sends::

    ListModels    "models"    what is served
    Describe      "describe"  one model's module tree and tokenizer
    Run           "run"       a graph and the batch to run it on
    Fetch         "fetch"     a result again, by request id (after a lost connection)
    Ack           "ack"       the client has its result: the server may forget it
    Cancel        "cancel"    stop waiting for a request that has not run yet

A server answers with ``Status`` (received, queued with position, running), then one of
``Result``, ``Failure`` (kind ``"error"``), ``ModelList`` or ``Description``.

Graphs travel as ``{"nodes": [[id, op, target, args, kwargs, call, rows], ...], "saved": [...],
"constants": [tensor, ...]}`` (:func:`encode_graph`); sites stay on the client, for its errors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar

import torch

from ..core import errors, tree
from ..core.errors import ProtocolError
from ..core.graph import EVERY_CALL, OPS, Batch, Const, Graph, Node, Ref, Segment
from . import codec
from .values import _is_int, _malformed

#: Longest request id accepted (ids are chosen by clients: bounded, printable).
MAX_ID_LENGTH = 128
#: Most earlier results one request may acknowledge (``Request.acks``).
MAX_ACKS = 64
#: The ``torch.compile`` backends a run may name in its ``compile`` field (compiled replay,
#: :mod:`lazytensor.runtime.compiled`); a server compiles with those its operator allows.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
#: Longest ``note`` a result may carry.
MAX_NOTE = 1024


def encode_graph(graph: Graph) -> dict:
    """The body entry for ``graph``: ``{"nodes": [...], "saved": [...], "constants": [...]}``.

    Each node is ``[id, op, target, args, kwargs, call, rows]``; constants stay tensors and
    become frames when the body is encoded. Sites stay on the client: they are for its errors.
    A ``python`` node's function (``lazytensor.apply``) travels as cloudpickle bytes, which a
    server runs only with ``--trusted-clients``.
    """
    nodes = [
        [n.id, n.op, n.target, _shipped(n), dict(n.kwargs), n.call, n.rows] for n in graph.nodes
    ]
    return {"nodes": nodes, "saved": list(graph.saved), "constants": list(graph.constants)}


def _shipped(node: Node) -> tuple:
    args = tuple(node.args)
    if node.op == "python" and args and callable(args[0]):
        import cloudpickle  # the client's own function, sent to a server it trusts

        return (cloudpickle.dumps(args[0]), *args[1:])
    return args


def decode_graph(data: Any, constants: Sequence[torch.Tensor] | None = None) -> Graph:
    """Rebuild and check a graph from :func:`encode_graph`'s dict, as :func:`decode` left it.

    Args:
        data: the decoded dict.
        constants: the tensors ``Const`` arguments name; ``None`` takes ``data["constants"]``
            (pass them to reuse a graph's structure with new values).

    Raises:
        ProtocolError: a node, reference or saved id that could not have been recorded.
    """
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise _malformed("graph", data, 'a dict with a "nodes" list')
    consts = data.get("constants") if constants is None else constants
    if not isinstance(consts, (list, tuple)) or not all(map(_is_tensor, consts)):
        raise _malformed("graph constants", consts, "a list of tensors")
    nodes = [_decode_node(item, i, len(consts)) for i, item in enumerate(data["nodes"])]
    saved = data.get("saved")
    if not isinstance(saved, list) or not all(_is_int(s) and 0 <= s < len(nodes) for s in saved):
        raise _malformed("graph saved ids", saved, f"a list of node ids below {len(nodes)}")
    return Graph(nodes, list(consts), list(saved), [None] * len(nodes))


def _decode_node(item: Any, position: int, n_consts: int) -> Node:
    if type(item) is not list or len(item) != 7:
        raise _malformed(f"node {position}", item, "[id, op, target, args, kwargs, call, rows]")
    node_id, op, target, args, kwargs, call, rows = item
    if not (_is_int(node_id) and node_id == position):
        raise _bad_node(position, "id", node_id, f"{position}, counting from 0")
    if not (isinstance(op, str) and op in OPS):
        raise _bad_node(position, "op", op, f"one of {sorted(OPS)}")
    if not isinstance(target, str):
        raise _bad_node(position, "target", target, "a str")
    if not isinstance(args, tuple):
        raise _bad_node(position, "args", args, "a tuple")
    if not (isinstance(kwargs, dict) and all(map(_is_str, kwargs))):
        raise _bad_node(position, "kwargs", kwargs, "str keys")
    if not (type(call) is int and call >= EVERY_CALL) and not _is_call(call):
        expected = f"an int >= {EVERY_CALL} or (start, stop|nil, step)"
        raise _bad_node(position, "call", call, expected)
    if rows is not None:
        pair = isinstance(rows, (tuple, list)) and len(rows) == 2 and all(map(_is_int, rows))
        if not (pair and 0 <= rows[0] <= rows[1]):
            raise _bad_node(position, "rows", rows, "None or (a, b)")
        rows = tuple(rows)
    if args or kwargs:
        _check_args((args, kwargs), position, n_consts)
    return Node(node_id, op, target, args, kwargs, call, rows)


def _bad_node(position: int, name: str, got: Any, expected: str) -> ProtocolError:
    return _malformed(f"node {position}'s {name}", got, expected)


def _is_call(call: Any) -> bool:
    """A node's call: an int >= EVERY_CALL, or a range ``(start, stop or None, step)`` with
    ``0 <= start < stop`` and ``step >= 1`` (see :mod:`lazytensor.runtime.calls`)."""
    if _is_int(call):
        return call >= EVERY_CALL
    if not (isinstance(call, tuple) and len(call) == 3):
        return False
    start, stop, step = call
    if not (_is_int(start) and _is_int(step) and (stop is None or _is_int(stop))):
        return False
    return start >= 0 and step >= 1 and (stop is None or stop > start)


def _check_args(value: Any, node_id: int, n_consts: int) -> None:
    """Every Ref names an earlier node, every Const an existing constant; no bare tensors."""
    args, kwargs = value
    if all(type(a) is Ref and 0 <= a.id < node_id for a in args) and not kwargs:
        return  # the common case, a node that reads earlier nodes, without the walk below
    for leaf in tree.leaves(value):
        if isinstance(leaf, Ref) and not 0 <= leaf.id < node_id:
            raise ProtocolError(
                f"node {node_id} reads node {leaf.id}, which is not recorded before it: a node "
                "may only read earlier nodes; the graph was built or edited incorrectly"
            )
        if isinstance(leaf, Const) and not 0 <= leaf.index < n_consts:
            raise ProtocolError(
                f"node {node_id} uses constant {leaf.index}, but the graph has {n_consts} "
                "constants; send every tensor the graph uses in its constants"
            )
        if isinstance(leaf, torch.Tensor):
            raise ProtocolError(
                f"node {node_id} holds a tensor in its arguments; tensors travel in the graph's "
                "constants, named by Const"
            )


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


# -- messages ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """Base of every message: ``id`` is the request the message belongs to."""

    KIND: ClassVar[str] = ""
    id: str | None = None

    def body(self) -> dict:
        return {name: getattr(self, name) for name, _, _ in _fields(type(self))}

    @classmethod
    def from_body(cls, body: dict) -> Message:
        """The message a peer's ``body`` describes; a field whose default is a str, bool, list,
        dict (or a graph or batch, decoded by the subclass) must hold one."""
        values = {"id": _reply_id(body, cls.KIND)}
        for name, default, kind in _fields(cls):
            if name == "id":
                continue
            value = values[name] = body[name] if name in body else default()
            if kind is not None and type(value) is not kind:
                what = f"the {name!r} of a {cls.KIND!r} message"
                raise _malformed(what, value, f"a {kind.__name__}")
        return cls(**values)


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Callable[[], Any], type | None], ...]:
    """Each field of a message class: its name, a maker of its default, the default's type
    (``None`` when the default is ``None``: then any value passes here)."""
    out = []
    for f in fields(cls):
        if f.default is MISSING:
            make = f.default_factory
        else:
            make = functools.partial(_same, f.default)
        default = make()
        out.append((f.name, make, None if default is None else type(default)))
    return tuple(out)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Request(Message):
    """A client's request; ``key`` is its API key (``None`` on an open server).

    ``acks`` names earlier runs of the same client whose results it has received: the
    server may forget them, as on an ``ack`` (at most :data:`MAX_ACKS`; sent only when any)."""

    key: str | None = None
    acks: tuple = field(default=(), kw_only=True)

    def body(self) -> dict:
        body = super().body()
        if not self.acks:
            del body["acks"]
        return body

    @classmethod
    def from_body(cls, body: dict) -> Request:
        key = body.get("key")
        if key is not None and not isinstance(key, str):
            raise _malformed("the API key", key, "a str or nil")
        acks = body.get("acks", ())
        if not isinstance(acks, (list, tuple)) or len(acks) > MAX_ACKS:
            raise _malformed("the acks", acks, f"a list of at most {MAX_ACKS} request ids")
        acks = tuple(check_id(a) for a in acks if a is not None)
        return super().from_body({**body, "id": check_id(body.get("id")), "acks": acks})


@dataclass(frozen=True)
class ListModels(Request):
    KIND: ClassVar[str] = "models"


@dataclass(frozen=True)
class Describe(Request):
    KIND: ClassVar[str] = "describe"
    model: str = ""


@dataclass(frozen=True)
class Run(Request):
    """Run ``graph`` on ``model`` with ``batch``; ``stop_at`` ends the run after that node;
    ``fake`` asks for shapes only (a shape-only pass answers ``.shape`` inside a trace);
    ``compile`` asks for compiled replay: ``True``, or a backend of :data:`COMPILE_BACKENDS`
    (sent only when asked; a server compiles only if its operator allows it).

    A session sends its ``segments`` instead (and an empty graph): its runs in order, each a
    graph with a batch, or session code with none; its result's values are keyed by segment,
    then node (see :mod:`lazytensor.runtime.session`)."""

    KIND: ClassVar[str] = "run"
    model: str = ""
    graph: Graph = field(default_factory=Graph)
    batch: Batch = field(default_factory=Batch)
    stop_at: int | None = None
    fake: bool = False
    segments: tuple[Segment, ...] = ()
    compile: bool | str = False

    def body(self) -> dict:
        body = {**super().body(), "graph": encode_graph(self.graph)}
        body["batch"] = _encode_batch(self.batch)
        body.pop("segments", None)
        if self.compile is False:
            del body["compile"]
        if self.segments:
            body["segments"] = [
                {"graph": encode_graph(s.graph), "batch": s.batch and _encode_batch(s.batch)}
                for s in self.segments
            ]
        return body

    @classmethod
    def from_body(cls, body: dict) -> Run:
        graph = decode_graph(body.get("graph"))
        segments = body.get("segments", [])
        if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
            raise _malformed("a session's segments", segments, "a list of mappings")
        segments = tuple(
            Segment(
                decode_graph(s.get("graph")),
                None if s.get("batch") is None else decode_batch(s.get("batch")),
            )
            for s in segments
        )
        stop_at = body.get("stop_at")
        if stop_at is not None and not (_is_int(stop_at) and 0 <= stop_at < len(graph.nodes)):
            raise ProtocolError(f"stop_at {stop_at!r} names no node of the graph")
        if not isinstance(body.get("model"), str) or not isinstance(body.get("fake", False), bool):
            raise _malformed("a run request", "its model or fake flag", "a str and a bool")
        fields_ = {**body, "graph": graph, "batch": decode_batch(body.get("batch"))}
        fields_["segments"] = segments
        wish = fields_.pop("compile", False)
        if type(wish) is not bool and wish not in COMPILE_BACKENDS:
            raise ProtocolError(
                f"compile={wish!r:.80} names no backend a lazytensor server compiles with: "
                f"send compile=True, False or one of {', '.join(map(repr, COMPILE_BACKENDS))}"
            )
        run = super().from_body(fields_)
        return replace(run, compile=wish) if wish is not False else run


@dataclass(frozen=True)
class Fetch(Request):
    """The result of request ``id`` again; ``request`` runs it if the server never got it."""

    KIND: ClassVar[str] = "fetch"
    request: Run | None = None

    def body(self) -> dict:
        inner = self.request.body() if self.request is not None else None
        return {**super().body(), "request": inner}

    @classmethod
    def from_body(cls, body: dict) -> Fetch:
        inner = body.get("request")
        run = Run.from_body({**inner, "id": body.get("id")}) if isinstance(inner, dict) else None
        return super().from_body({**body, "request": run})


@dataclass(frozen=True)
class Ack(Request):
    KIND: ClassVar[str] = "ack"


@dataclass(frozen=True)
class Cancel(Request):
    KIND: ClassVar[str] = "cancel"


@dataclass(frozen=True)
class Status(Message):
    """Where a request is: ``received``, ``queued`` (with ``position``), ``running``..."""

    KIND: ClassVar[str] = "status"
    state: str = ""
    position: int | None = None

    @classmethod
    def from_body(cls, body: dict) -> Status:
        position = body.get("position")
        if position is not None and not _is_int(position):
            raise _malformed("a status's queue position", position, "an int or nil")
        return super().from_body(body)


@dataclass(frozen=True)
class Result(Message):
    """The saved values of a run, by node id; ``note`` says why a run that asked for
    compiled replay ran eagerly (sent only when there is one)."""

    KIND: ClassVar[str] = "result"
    values: dict = field(default_factory=dict)
    note: str = ""

    def body(self) -> dict:
        body = super().body()
        if not self.note:
            del body["note"]
        return body

    @classmethod
    def from_body(cls, body: dict) -> Result:
        values = body.get("values")
        if not isinstance(values, dict) or not all(map(_is_int, values)):
            raise _malformed("a result's values", values, "a mapping of node ids to values")
        note = body.get("note", "")
        if not isinstance(note, str) or len(note) > MAX_NOTE:
            raise _malformed("a result's note", note, f"a str of at most {MAX_NOTE} characters")
        return cls(_reply_id(body, cls.KIND), values, note)


@dataclass(frozen=True)
class Failure(Message):
    """A request failed: ``error`` is :func:`lazytensor.core.errors.to_data` of the cause."""

    KIND: ClassVar[str] = "error"
    error: dict = field(default_factory=dict)

    @classmethod
    def of(cls, request_id: str | None, exc: BaseException) -> Failure:
        return cls(request_id, errors.to_data(exc))

    def exception(self) -> BaseException:
        return errors.from_data(self.error)

    def body(self) -> dict:
        return {"id": self.id, **self.error}

    @classmethod
    def from_body(cls, body: dict) -> Failure:
        return cls(_reply_id(body, cls.KIND), {k: v for k, v in body.items() if k != "id"})


@dataclass(frozen=True)
class ModelList(Message):
    KIND: ClassVar[str] = "models"
    models: list = field(default_factory=list)


@dataclass(frozen=True)
class Description(Message):
    """A served model as data: its module ``tree`` and its ``tokenizer`` (JSON and specials)."""

    KIND: ClassVar[str] = "description"
    model: str = ""
    tree: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)


REQUESTS: dict[str, type[Request]] = {
    m.KIND: m for m in (ListModels, Describe, Run, Fetch, Ack, Cancel)
}
REPLIES: dict[str, type[Message]] = {
    m.KIND: m for m in (Status, Result, Failure, ModelList, Description)
}


def encode(message: Message, limits: codec.Limits | None = None) -> list:
    """The frames of ``message`` (tensor frames are views: send them with ``copy=False``)."""
    return codec.encode(message.KIND, message.body(), limits=limits)


def decode_request(frames: Sequence[Any], limits: codec.Limits | None = None) -> Request:
    """A client's frames as a checked :class:`Request`."""
    return _typed(codec.decode(frames, limits=limits), REQUESTS, "request")


def decode_reply(frames: Sequence[Any], limits: codec.Limits | None = None) -> Message:
    """A server's frames as a checked reply message."""
    return _typed(codec.decode(frames, limits=limits), REPLIES, "reply")


def _typed(message: codec.Message, kinds: dict[str, type[Message]], what: str) -> Any:
    cls = kinds.get(message.kind)
    if cls is None:
        raise ProtocolError(f"unknown {what} kind {message.kind!r}; expected {', '.join(kinds)}")
    try:
        return cls.from_body(message.body)
    except ProtocolError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise ProtocolError(f"malformed {message.kind!r} message: {exc}") from None


def check_id(request_id: Any) -> str | None:
    """A request id as clients may choose it: a short printable string (or nil)."""
    if request_id is None:
        return None
    if (
        not isinstance(request_id, str)
        or not 0 < len(request_id) <= MAX_ID_LENGTH
        or not request_id.isprintable()
    ):
        expected = f"a printable str of 1-{MAX_ID_LENGTH} chars"
        raise _malformed("the request id", request_id, expected)
    return request_id


def _reply_id(body: dict, kind: str) -> str | None:
    """A message's id as a str or nil (a server echoes even an id it refused, so a reply's id
    is not held to :func:`check_id`; requests check theirs first)."""
    message_id = body.get("id")
    if message_id is not None and not isinstance(message_id, str):
        raise _malformed(f"the id of a {kind!r} message", message_id, "a str or nil")
    return message_id


def _encode_batch(b: Batch) -> dict:
    return {"args": list(b.args), "kwargs": b.kwargs, "size": b.size, "generate": b.generate}


def decode_batch(data: Any) -> Batch:
    """A run's inputs: positional ``args``, keyword ``kwargs``, row count, generate flag."""
    if not isinstance(data, dict):
        raise ProtocolError("a run request needs a 'batch' mapping")
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    size, generate = data.get("size", 1), data.get("generate", False)
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not _is_int(size):
        raise ProtocolError("batch must have list 'args', mapping 'kwargs' and int 'size'")
    if not all(isinstance(k, str) for k in kwargs) or not isinstance(generate, bool) or size < 0:
        raise ProtocolError("batch kwargs need str names, 'generate' a bool, 'size' >= 0")
    return Batch(tuple(args), kwargs, size, generate)
