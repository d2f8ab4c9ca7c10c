"""The wire format: how a message becomes ZeroMQ frames and back, as data only.

A message is a ``kind`` (what the peer should do, e.g. ``"run"``) and a ``body`` (a dict of
plain values). On the wire it is a list of frames::

    [b"LZT" + version byte, msgpack header, tensor bytes, tensor bytes, ...]

The header is msgpack of ``{"kind": str, "body": value, "tensors": [{"dtype": name, "shape":
[...], "nbytes": n}, ...]}``. Each tensor in the body is replaced by its index into
``tensors``, and its raw bytes travel in frame ``2 + index``. Encoding does not copy a
contiguous CPU tensor: its frame is a read-only view of the tensor's memory, so send the frames
with ``copy=False`` and leave the tensors unchanged until they are sent. Decoding copies each
frame once into a new tensor of its own, so the result is writable and outlives the frames.

Values msgpack has no type for travel as msgpack extension types; the data of each is the
msgpack of its payload:

    ====  ============  ==============================================
    code  value         payload
    ====  ============  ==============================================
    1     tuple         ``[item, ...]``
    2     slice         ``[start, stop, step]``, each nil, int or Ref
    3     Ellipsis      nil
    4     graph.Ref     node id
    5     graph.Const   constant index
    6     torch.dtype   allow-listed name, a key of :data:`DTYPES`
    7     torch.device  ``[type, index or nil]``
    8     torch.Size    ``[dim, ...]``
    9     torch.Tensor  index into the header's ``tensors``
    10    Record        ``[class name, {field: value}]``
    11    named tuple   ``[class name, [field, ...], [item, ...]]`` (``torch.return_types``)
    ====  ============  ==============================================

Nothing a peer sends is unpickled or evaluated: decoding builds only the types above, checks
every size, shape and reference against :class:`Limits`, and raises
:class:`~lazytensor.errors.ProtocolError` for anything else, including a peer that speaks
another :data:`PROTOCOL_VERSION`.
"""

from __future__ import annotations

import collections
import functools
import keyword
import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from .errors import ProtocolError
from .graph import EVERY_CALL, OPS, Const, Graph, Node, Ref

PROTOCOL_VERSION = 1
MAGIC = b"LZT"
VERSION_FRAME = MAGIC + bytes([PROTOCOL_VERSION])
MAX_RANK = 64

#: The only tensor dtypes that travel; names are the ``torch`` attribute names.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
        "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2",
        "complex64", "complex128",
    )
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

TUPLE, SLICE, ELLIPSIS, REF, CONST, DTYPE, DEVICE, SIZE, TENSOR, RECORD, NAMED = range(1, 12)
_MAX_FIELDS = 64

_SHORT = reprlib.Repr()  # elides long lists, dicts and strings in error messages
_INT_RANGE = range(-(2**63), 2**64)  # what a msgpack integer can hold
_SUPPORTED = (
    "None, bool, int, float, str, bytes, list, dict (str or int keys), tuple, slice, Ellipsis, "
    "Ref, Const, torch.dtype, torch.device, torch.Size, torch.Tensor, and mappings or "
    "ModelOutput-like objects (sent as Record)"
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a message must respect; :func:`decode` checks them before trusting anything."""

    max_frames: int = 4096
    max_header_bytes: int = 64 << 20
    max_total_bytes: int = 4 << 30
    max_depth: int = 64


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: what to do (``kind``), its arguments (``body``), the protocol."""

    kind: str
    body: dict
    version: int = PROTOCOL_VERSION


class Record(dict):
    """A dict-like model output (such as a Hugging Face ``ModelOutput``) as it travels.

    Fields read as attributes (``rec.logits``) or by name (``rec["logits"]``); an integer or
    slice indexes the fields that are not ``None``, as ``ModelOutput`` does (``rec[0]``).

    >>> rec = Record("CausalLMOutput", {"loss": None, "logits": 1.0})
    >>> (rec.logits, rec[0], rec.to_tuple(), rec.cls_name)
    (1.0, 1.0, (1.0,), 'CausalLMOutput')
    """

    __slots__ = ("cls_name",)

    def __init__(self, cls_name: str, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__(fields or {})
        self.cls_name = cls_name

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("__") and dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        raise AttributeError(f"record has no field {name!r}; its fields are {list(self)}")

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        """The field values that are not ``None``, in field order."""
        return tuple(value for value in self.values() if value is not None)

    def __repr__(self) -> str:
        return f"Record({self.cls_name!r}, {dict.__repr__(self)})"


def encode(kind: str, body: dict, *, limits: Limits | None = None) -> list[bytes | memoryview]:
    """Turn a message into frames: the version, the msgpack header, then one per tensor.

    Args:
        kind: what the peer should do with the message.
        body: a dict of values of the types in the module docstring, nested freely.
        limits: bounds to respect, so a message the peer would refuse fails here instead.

    Returns:
        The frames; tensor frames are views of the tensors' memory (send with ``copy=False``).

    Raises:
        TypeError: a value, key or tensor dtype the wire cannot carry.
        ValueError: the message breaks ``limits``, or an int does not fit in 64 bits.

    >>> frames = encode("run", {"x": torch.ones(2), "index": (0, slice(None, 3))})
    >>> decode(frames).body["index"]
    (0, slice(None, 3, None))
    """
    limits = limits or Limits()
    if not isinstance(kind, str) or type(body) is not dict:
        raise TypeError(
            f"encode takes a str kind and a dict body, got {type(kind).__name__} and "
            f"{type(body).__name__}; wrap the values in a dict"
        )
    encoder = _Encoder(limits.max_depth)
    packed_body = encoder.value(body, 0)
    header = msgpack.packb({"kind": kind, "body": packed_body, "tensors": encoder.specs})
    frames: list[bytes | memoryview] = [VERSION_FRAME, header, *encoder.frames]
    _check_sizes(frames, limits, ValueError)
    return frames


def decode(frames: Sequence[Any], *, limits: Limits | None = None) -> Message:
    """Turn frames from a peer back into a :class:`Message`, checking everything.

    Args:
        frames: ``bytes``, ``memoryview`` or ``zmq.Frame`` objects (anything with ``.buffer``).
        limits: bounds the message must respect.

    Raises:
        ProtocolError: the message is malformed, too large, or from another protocol version.
    """
    limits = limits or Limits()
    if not frames:
        raise ProtocolError("empty message: expected a version frame and a header frame")
    _check_version(_buffer(frames[0], 0))
    if len(frames) < 2:
        raise ProtocolError("message has a version frame but no header frame after it")
    views = [_buffer(frame, index) for index, frame in enumerate(frames)]
    _check_sizes(views, limits, ProtocolError)
    kind, body, specs = _split_header(_unpack(views[1], "header"))
    if len(views) != len(specs) + 2:
        raise ProtocolError(
            f"message has {len(views)} frames but its header describes {len(specs)} tensors, "
            f"expected {len(specs) + 2} frames (version, header, one per tensor)"
        )
    pairs = enumerate(zip(specs, views[2:], strict=True))
    tensors = [_tensor_from_frame(spec, view, index) for index, (spec, view) in pairs]
    return Message(kind, _Decoder(tensors, limits.max_depth).value(body, 0), PROTOCOL_VERSION)


def encode_graph(graph: Graph) -> dict:
    """The body entry for ``graph``: ``{"nodes": [...], "saved": [...], "constants": [...]}``.

    Each node is ``[id, op, target, args, kwargs, call, rows]``; constants stay tensors and
    become frames when the body is encoded. Sites stay on the client: they are for its errors.
    """
    nodes = [
        [n.id, n.op, n.target, tuple(n.args), dict(n.kwargs), n.call, n.rows] for n in graph.nodes
    ]
    return {"nodes": nodes, "saved": list(graph.saved), "constants": list(graph.constants)}


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
    if not isinstance(item, list) or len(item) != 7:
        raise _malformed(f"node {position}", item, "[id, op, target, args, kwargs, call, rows]")
    node_id, op, target, args, kwargs, call, rows = item
    pair = isinstance(rows, (tuple, list)) and len(rows) == 2 and all(map(_is_int, rows))
    checks = (
        ("id", node_id, _is_int(node_id) and node_id == position, f"{position}, counting from 0"),
        ("op", op, isinstance(op, str) and op in OPS, f"one of {sorted(OPS)}"),
        ("target", target, isinstance(target, str), "a str"),
        ("args", args, isinstance(args, tuple), "a tuple"),
        ("kwargs", kwargs, isinstance(kwargs, dict) and all(map(_is_str, kwargs)), "str keys"),
        ("call", call, _is_int(call) and call >= EVERY_CALL, f"an int >= {EVERY_CALL}"),
        ("rows", rows, rows is None or (pair and 0 <= rows[0] <= rows[1]), "None or (a, b)"),
    )
    for name, got, ok, expected in checks:
        if not ok:
            raise _malformed(f"node {position}'s {name}", got, expected)
    _check_args((args, kwargs), position, n_consts)
    return Node(node_id, op, target, args, kwargs, call, None if rows is None else tuple(rows))


def _check_args(value: Any, node_id: int, n_consts: int) -> None:
    """Every Ref names an earlier node and every Const an existing constant."""
    if isinstance(value, Ref) and not 0 <= value.id < node_id:
        raise ProtocolError(
            f"node {node_id} reads node {value.id}, which is not recorded before it: a node "
            "may only read earlier nodes; the graph was built or edited incorrectly"
        )
    if isinstance(value, Const) and not 0 <= value.index < n_consts:
        raise ProtocolError(
            f"node {node_id} uses constant {value.index}, but the graph has {n_consts} "
            "constants; send every tensor the graph uses in its constants"
        )
    if isinstance(value, slice):
        value = (value.start, value.stop, value.step)
    items = value.values() if isinstance(value, dict) else value
    for item in items if isinstance(value, (tuple, list, dict)) else ():
        _check_args(item, node_id, n_consts)


class _Encoder:
    """Turns a body into msgpack-ready data, collecting its tensors as frames."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.specs: list[dict] = []
        self.frames: list[memoryview] = []
        self._index: dict[int, int] = {}  # id(tensor) -> frame; a tensor sent twice goes once
        self._keep: list[torch.Tensor] = []  # keeps those ids from being reused

    def value(self, v: Any, depth: int) -> Any:
        if depth > self.max_depth:
            raise ValueError(
                f"value nests deeper than Limits.max_depth={self.max_depth}; flatten it, "
                "or raise the limit on both sides (a cycle never fits)"
            )
        if v is None or isinstance(v, (bool, float, str, bytes)):
            return v
        if isinstance(v, int):
            return _int_value(v)
        if isinstance(v, torch.Tensor):
            return _ext(TENSOR, self.tensor(v))
        if isinstance(v, torch.Size):
            return _ext(SIZE, [int(d) for d in v])
        if isinstance(v, tuple):
            items = [self.value(x, depth + 1) for x in v]
            fields = getattr(type(v), "__match_args__", None)  # namedtuple, torch.return_types
            if type(v) is not tuple and fields and len(fields) == len(v):
                return _ext(NAMED, [type(v).__name__, list(fields), items])
            return _ext(TUPLE, items)
        if isinstance(v, list):
            return [self.value(x, depth + 1) for x in v]
        if type(v) is dict:
            return {_key(k): self.value(x, depth + 1) for k, x in v.items()}
        if isinstance(v, Mapping) or (hasattr(v, "to_tuple") and hasattr(v, "keys")):
            return self.record(v, depth)
        return _leaf(v)

    def record(self, v: Any, depth: int) -> msgpack.ExtType:
        name = v.cls_name if isinstance(v, Record) else type(v).__name__
        fields = {}
        for key in v.keys():
            if not isinstance(key, str):
                raise TypeError(f"{name} has a {type(key).__name__} key {key!r}; records need str")
            fields[key] = self.value(v[key], depth + 1)
        return _ext(RECORD, [name, fields])

    def tensor(self, t: torch.Tensor) -> int:
        if id(t) not in self._index:
            self._index[id(t)] = len(self.frames)
            self._keep.append(t)
            spec, frame = _tensor_frame(t)
            self.specs.append(spec)
            self.frames.append(frame)
        return self._index[id(t)]


def _leaf(v: Any) -> msgpack.ExtType:
    if v is Ellipsis:
        return _ext(ELLIPSIS, None)
    if isinstance(v, Ref):
        return _ext(REF, _int_value(v.id))
    if isinstance(v, Const):
        return _ext(CONST, _int_value(v.index))
    if isinstance(v, torch.dtype):
        return _ext(DTYPE, _dtype_name(v))
    if isinstance(v, torch.device):
        return _ext(DEVICE, [v.type, v.index])
    if isinstance(v, slice):
        return _ext(SLICE, [_slice_part(p) for p in (v.start, v.stop, v.step)])
    raise TypeError(f"cannot send a {type(v).__qualname__} over the wire; supported: {_SUPPORTED}")


def _slice_part(v: Any) -> Any:
    if v is None or _is_int(v):
        return v if v is None else _int_value(v)
    if isinstance(v, Ref):
        return _ext(REF, _int_value(v.id))
    raise TypeError(f"a slice bound is a {type(v).__name__}; the wire carries None, int or Ref")


def _tensor_frame(t: torch.Tensor) -> tuple[dict, memoryview]:
    if t.layout != torch.strided or t.device.type == "meta":
        raise TypeError(f"cannot send a {t.layout} tensor on {t.device}; send a dense tensor")
    name = _dtype_name(t.dtype)
    data = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    raw = data.reshape(-1).view(torch.uint8)  # (nbytes,), same memory as `data`
    spec = {"dtype": name, "shape": list(data.shape), "nbytes": raw.numel()}
    return spec, memoryview(raw.numpy()).toreadonly()


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype {dtype} cannot travel; supported: {', '.join(DTYPES)}")
    return _DTYPE_NAMES[dtype]


def _int_value(v: int) -> int:
    if not _is_int(v):
        raise TypeError(f"expected an int, got a {type(v).__name__} ({v!r})")
    if v not in _INT_RANGE:
        raise ValueError(f"{v} is outside [-2**63, 2**64), the integers the wire can carry")
    return int(v)


def _key(k: Any) -> str | int:
    if isinstance(k, str):
        return k
    if _is_int(k):
        return _int_value(k)
    raise TypeError(f"a dict key is a {type(k).__name__} ({k!r}); the wire carries str or int keys")


def _ext(code: int, payload: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(payload))


class _Decoder:
    """Turns a header's body back into values, checking each one."""

    def __init__(self, tensors: list[torch.Tensor], max_depth: int) -> None:
        self.tensors = tensors
        self.max_depth = max_depth

    def value(self, v: Any, depth: int) -> Any:
        if depth > self.max_depth:
            raise ProtocolError(
                f"message exceeds Limits.max_depth: a value nests deeper than "
                f"{self.max_depth}; send flatter values or raise the limit on this side"
            )
        if v is None or isinstance(v, (bool, int, float, str, bytes)):
            return v
        if isinstance(v, list):
            return [self.value(x, depth + 1) for x in v]
        if isinstance(v, dict):
            return {self.key(k): self.value(x, depth + 1) for k, x in v.items()}
        if isinstance(v, msgpack.ExtType):
            return self.ext(v.code, _unpack(v.data, f"extension {v.code} payload"), depth)
        raise _malformed("a value", v, "a type listed in lazytensor.wire")

    def key(self, k: Any) -> str | int:
        if isinstance(k, str) or _is_int(k):
            return k
        raise _malformed("a dict key", k, "a str or int")

    def ext(self, code: int, p: Any, depth: int) -> Any:
        if code == TUPLE and isinstance(p, list):
            return tuple(self.value(x, depth + 1) for x in p)
        if code == SLICE and isinstance(p, list) and len(p) == 3:
            return slice(*(_slice_bound(x) for x in p))
        if code == ELLIPSIS and p is None:
            return Ellipsis
        if code in (REF, CONST) and _is_int(p) and p >= 0:
            return Ref(p) if code == REF else Const(p)
        if code == DTYPE and isinstance(p, str) and p in DTYPES:
            return DTYPES[p]
        if code == DEVICE:
            return _device(p)
        if code == SIZE and isinstance(p, list) and all(map(_is_int, p)):
            return torch.Size(p)
        if code == TENSOR and _is_int(p) and 0 <= p < len(self.tensors):
            return self.tensors[p]
        if code == RECORD and isinstance(p, list) and len(p) == 2 and isinstance(p[0], str):
            if isinstance(p[1], dict) and all(isinstance(k, str) for k in p[1]):
                return Record(p[0], {k: self.value(x, depth + 1) for k, x in p[1].items()})
        if code == NAMED and _is_named(p):
            cls = _named_tuple(p[0], tuple(p[1]))
            return cls(*(self.value(x, depth + 1) for x in p[2]))
        if code in range(TUPLE, NAMED + 1):
            raise _malformed(f"the payload of extension {code}", p, "the form in lazytensor.wire")
        raise _malformed("an extension code", code, f"{TUPLE} to {NAMED}")


def _is_named(p: Any) -> bool:
    """``[name, fields, items]`` with plain identifiers only: they become a namedtuple class."""
    if not (isinstance(p, list) and len(p) == 3 and isinstance(p[1], list)):
        return False
    name, fields, items = p
    names = [name, *fields]
    return (
        isinstance(items, list)
        and len(fields) == len(items) <= _MAX_FIELDS
        and len(set(fields)) == len(fields)
        and all(
            isinstance(n, str)
            and n.isidentifier()
            and not n.startswith("_")
            and not keyword.iskeyword(n)
            for n in names
        )
    )


@functools.lru_cache(maxsize=256)
def _named_tuple(name: str, fields: tuple[str, ...]) -> type:
    return collections.namedtuple(name, fields)


def _slice_bound(v: Any) -> int | Ref | None:
    if v is None or _is_int(v):
        return v
    if isinstance(v, msgpack.ExtType) and v.code == REF:
        ref = _unpack(v.data, "slice bound")
        if _is_int(ref) and ref >= 0:
            return Ref(ref)
    raise _malformed("a slice bound", v, "None, int or Ref")


def _device(p: Any) -> torch.device:
    if isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and p[0].isidentifier():
        if p[1] is None or (_is_int(p[1]) and 0 <= p[1] < 2**16):
            try:
                return torch.device(p[0], p[1])
            except RuntimeError:
                pass
    raise _malformed("a device", p, "[type, index or None] naming a torch device type")


def _tensor_from_frame(spec: Any, view: memoryview, index: int) -> torch.Tensor:
    what = f"tensor {index} (frame {index + 2})"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "nbytes"}:
        raise _malformed(f"{what}'s header", spec, '{"dtype", "shape", "nbytes"}')
    name, shape, nbytes = spec["dtype"], spec["shape"], spec["nbytes"]
    if not isinstance(name, str) or name not in DTYPES:
        raise _malformed(f"{what}'s dtype", name, f"one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise _malformed(f"{what}'s shape", shape, f"a list of at most {MAX_RANK} sizes")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise _malformed(f"{what}'s shape", shape, "non-negative int sizes")
    dtype = DTYPES[name]
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected or len(view) != expected:
        raise ProtocolError(
            f"{what} claims {nbytes!r} bytes and its frame has {len(view)}, but shape {shape} "
            f"of {name} needs {expected}; the sender built a corrupt message"
        )
    out = _adopt(view) if expected else None
    if out is None:  # read-only or unaligned bytes: one copy into memory of its own
        out = torch.empty(expected, dtype=torch.uint8)
        out.numpy()[:] = np.frombuffer(view, dtype=np.uint8)
    if dtype == torch.bool and expected and int(out.max()) > 1:
        raise _malformed(f"{what}'s bool data", "a byte > 1", "only 0 and 1")
    return out.view(dtype).reshape(shape)


def _adopt(view: memoryview) -> torch.Tensor | None:
    """The frame's own memory as a tensor, when it is writable and aligned (a received
    ``zmq.Frame``): no copy, and the tensor keeps the frame alive."""
    if view.readonly or np.frombuffer(view, dtype=np.uint8).ctypes.data % 64:
        return None
    return torch.frombuffer(view, dtype=torch.uint8)


def _split_header(header: Any) -> tuple[str, dict, list]:
    if not isinstance(header, dict) or set(header) != {"kind", "body", "tensors"}:
        raise _malformed("the header", header, '{"kind", "body", "tensors"}')
    kind, body, specs = header["kind"], header["body"], header["tensors"]
    if not isinstance(kind, str) or not isinstance(body, dict) or not isinstance(specs, list):
        raise _malformed("the header", header, "a str kind, a dict body and a tensors list")
    return kind, body, specs


def _check_version(view: memoryview) -> None:
    if len(view) < len(MAGIC) + 1 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise ProtocolError(
            f"not a lazytensor message: its first frame starts {bytes(view[:16])!r}, expected "
            f"{VERSION_FRAME!r}; check what is connected to this socket"
        )
    version = view[len(MAGIC)]
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks lazytensor protocol {version}, this side speaks {PROTOCOL_VERSION}: "
            "upgrade lazytensor on the older side so both speak the same protocol"
        )
    if len(view) != len(VERSION_FRAME):
        raise _malformed("the version frame", bytes(view[:16]), repr(VERSION_FRAME))


def _check_sizes(frames: Sequence, limits: Limits, error: type) -> None:
    sizes = (
        ("frame count", len(frames), "max_frames"),
        ("header size in bytes", len(frames[1]) if len(frames) > 1 else 0, "max_header_bytes"),
        ("total size in bytes", sum(map(len, frames)), "max_total_bytes"),
    )
    for what, value, limit in sizes:
        if value > getattr(limits, limit):
            raise error(
                f"message exceeds Limits.{limit}: its {what} is {value}, the maximum is "
                f"{getattr(limits, limit)}; send less per message or raise the limit on both sides"
            )


def _buffer(frame: Any, index: int) -> memoryview:
    """The bytes of one frame, without copying; a ``zmq.Frame`` exposes them as ``.buffer``."""
    try:
        view = memoryview(getattr(frame, "buffer", frame))
    except TypeError:
        raise ProtocolError(
            f"frame {index} is a {type(frame).__name__}, expected bytes, memoryview or zmq.Frame"
        ) from None
    if not view.c_contiguous:
        raise ProtocolError(f"frame {index} is not contiguous memory; pass each frame's bytes")
    return view.cast("B")


def _unpack(data: Any, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(
            f"malformed lazytensor message: the {what} is not valid msgpack ({exc}); "
            "check that the peer speaks lazytensor protocol"
        ) from exc


def _malformed(what: str, got: Any, expected: str) -> ProtocolError:
    shown = _SHORT.repr(got)  # bounded: never the repr of a whole hostile header
    return ProtocolError(
        f"malformed lazytensor message: {what} is {shown}, expected {expected}; the peer is "
        f"not speaking lazytensor protocol {PROTOCOL_VERSION} correctly"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)
