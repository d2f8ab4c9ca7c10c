"""Values: how the plain data inside a message becomes msgpack and back.

A body is a tree of plain values (see :mod:`lazytensor.protocol.codec` for the table of
msgpack extension types). :class:`_Encoder` turns one into msgpack-ready data and collects its
tensors as frames; :class:`_Decoder` checks every value a peer sent and builds only the types in
that table: nothing is unpickled or evaluated. A peer's named tuples become fresh
``collections.namedtuple`` classes with checked identifiers; its model outputs become
:class:`Record` objects.
"""

from __future__ import annotations

import collections
import functools
import keyword
import reprlib
from collections.abc import Mapping
from typing import Any

import msgpack
import torch

from ..core.errors import ProtocolError
from ..core.graph import Const, Ref, ref

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
#: Types that travel as they are, by exact type: the encoder's and decoder's fast paths (a
#: subclass, or an int, takes the checked path).
_AS_IS = frozenset((type(None), bool, float, str, bytes))
_new_tuple = tuple.__new__
_SUPPORTED = (
    "None, bool, int, float, str, bytes, list, dict (str or int keys), tuple, slice, Ellipsis, "
    "Ref, Const, torch.dtype, torch.device, torch.Size, torch.Tensor, and mappings or "
    "ModelOutput-like objects (sent as Record)"
)


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


class _Encoder:
    """Turns a body into msgpack-ready data, collecting its tensors as frames."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.specs: list[dict] = []
        self.frames: list[memoryview] = []
        self._index: dict[int, int] = {}  # id(tensor) -> frame; a tensor sent twice goes once
        self._keep: list[torch.Tensor] = []  # keeps those ids from being reused
        self._pack = msgpack.Packer().pack  # one packer for every extension payload

    def value(self, v: Any, depth: int) -> Any:
        if depth > self.max_depth:
            raise ValueError(
                f"value nests deeper than Limits.max_depth={self.max_depth}; flatten it, "
                "or raise the limit on both sides (a cycle never fits)"
            )
        kind = type(v)  # exact types first: most of a body is plain data
        if kind in _AS_IS:
            return v
        if kind is int:
            return _int_value(v)
        if kind is list:
            return self.items(v, depth)
        if kind is dict:
            if depth >= self.max_depth and v:  # its items would be too deep: say so
                return {_key(k): self.value(x, depth + 1) for k, x in v.items()}
            value = self.value
            return {
                (k if type(k) is str else _key(k)): x if type(x) in _AS_IS else value(x, depth + 1)
                for k, x in v.items()
            }
        if kind is tuple:
            return self.ext(TUPLE, self.items(v, depth))
        if kind is Ref:
            return self.ext(REF, _int_value(v.id))
        return self.other(v, kind, depth)

    def items(self, v: Any, depth: int) -> list:
        value = self.value
        if depth >= self.max_depth:  # every item is too deep: the first one says so
            return [value(x, depth + 1) for x in v]
        return [x if type(x) in _AS_IS else value(x, depth + 1) for x in v]

    def ext(self, code: int, payload: Any) -> msgpack.ExtType:
        # ExtType's own constructor only checks what holds here (a code below 128, bytes)
        return _new_tuple(msgpack.ExtType, (code, self._pack(payload)))

    def other(self, v: Any, kind: type, depth: int) -> Any:
        """The value of a type other than plain data, a tuple or a ``Ref``, or a subclass."""
        if v is None or isinstance(v, (bool, float, str, bytes)):
            return v
        if isinstance(v, int):
            return _int_value(v)
        if isinstance(v, torch.Tensor):
            return self.ext(TENSOR, self.tensor(v))
        if isinstance(v, torch.Size):
            return self.ext(SIZE, [int(d) for d in v])
        if isinstance(v, tuple):
            items = self.items(v, depth)
            fields = getattr(kind, "__match_args__", None)  # namedtuple, torch.return_types
            if kind is not tuple and fields is not None and len(fields) == len(v):
                payload = [kind.__name__, list(fields), items]
                if not _is_named(payload):
                    raise TypeError(
                        f"cannot send named tuple {kind.__name__}{fields}: the wire carries at "
                        f"most {_MAX_FIELDS} fields named by identifiers that do not start with "
                        "'_'; send it as a plain tuple or rename its fields"
                    )
                return self.ext(NAMED, payload)
            return self.ext(TUPLE, items)
        if isinstance(v, list):
            return self.items(v, depth)
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
        return self.ext(RECORD, [name, fields])

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
    flat = data.reshape(-1)  # (numel,)
    if flat.stride(0) != 1:  # "contiguous", yet a size-1 dimension kept an odd stride
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    raw = flat.view(torch.uint8)  # (nbytes,), the same memory as `flat`
    spec = {"dtype": name, "shape": list(data.shape), "nbytes": raw.numel()}
    return spec, memoryview(raw.numpy()).toreadonly()


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype {dtype} cannot travel; supported: {', '.join(DTYPES)}")
    return _DTYPE_NAMES[dtype]


def _int_value(v: int) -> int:
    if type(v) is int and v in _INT_RANGE:
        return v
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
        kind = type(v)  # msgpack builds exact types: plain data is returned as it is
        if kind in _AS_IS or kind is int:
            return v
        if kind is list:
            return self.items(v, depth)
        if kind is dict:
            value, key = self.value, self.key
            if depth >= self.max_depth and v:  # its items would be too deep: say so
                return {key(k): value(x, depth + 1) for k, x in v.items()}
            return {
                (k if type(k) is str else key(k)): (
                    x if type(x) in _AS_IS or type(x) is int else value(x, depth + 1)
                )
                for k, x in v.items()
            }
        if kind is msgpack.ExtType:
            return self.ext(v.code, _unpack(v.data, f"extension {v.code} payload"), depth)
        raise _malformed("a value", v, "a type listed in lazytensor.wire")

    def items(self, v: list, depth: int) -> list:
        value = self.value
        if depth >= self.max_depth:  # every item is too deep: the first one says so
            return [value(x, depth + 1) for x in v]
        return [x if type(x) in _AS_IS or type(x) is int else value(x, depth + 1) for x in v]

    def key(self, k: Any) -> str | int:
        if isinstance(k, str) or _is_int(k):
            return k
        raise _malformed("a dict key", k, "a str or int")

    def ext(self, code: int, p: Any, depth: int) -> Any:
        if code == TUPLE and type(p) is list:
            return tuple(self.items(p, depth))
        if code == REF and type(p) is int and p >= 0:
            return ref(p)
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
        if code == SIZE and isinstance(p, list) and all(map(_is_int64, p)):
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
    """``[name, fields, items]`` with plain identifiers only: they become a namedtuple class
    (whose name may start with ``_``, as a private ``_Pair`` does; its fields may not)."""
    if not (isinstance(p, list) and len(p) == 3 and isinstance(p[1], list)):
        return False
    name, fields, items = p
    return (
        isinstance(items, list)
        and len(fields) == len(items) <= _MAX_FIELDS
        and _is_identifier(name)
        and all(_is_identifier(f) and not f.startswith("_") for f in fields)
        and len(set(fields)) == len(fields)
    )


def _is_identifier(name: Any) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


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
                device = torch.device(p[0], p[1])
            except RuntimeError:
                pass
            else:
                if device.index == p[1]:  # torch wraps an index past its int8 range
                    return device
    raise _malformed("a device", p, "[type, index or None] naming a torch device type")


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


def _is_int64(v: Any) -> bool:
    return _is_int(v) and -(2**63) <= v < 2**63


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)
