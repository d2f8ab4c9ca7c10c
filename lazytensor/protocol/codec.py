"""The wire format: how a message becomes ZeroMQ frames and back, as data only.

A message is a ``kind`` (what the peer should do, e.g. ``"run"``) and a ``body`` (a dict of
plain values). On the wire it is a list of frames::

    [b"LZT" + version byte, msgpack header, tensor bytes, tensor bytes, ...]

The header is msgpack of ``{"kind": str, "body": value, "tensors": [{"dtype": name, "shape":
[...], "nbytes": n}, ...]}``. Each tensor in the body is replaced by its index into
``tensors``, and its raw bytes travel in frame ``2 + index``. Encoding does not copy a
contiguous CPU tensor: its frame is a read-only view of the tensor's memory, so send the frames
with ``copy=False`` and leave the tensors unchanged until they are sent. Decoding adopts a
frame's own memory when it is writable and aligned (a received ``zmq.Frame``), and copies
read-only or unaligned bytes once; either way the tensors are writable and outlive the frames.
The value encoding lives in :mod:`.values`, the typed messages in :mod:`.messages`.

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
:class:`~lazytensor.core.errors.ProtocolError` for anything else, including a peer that speaks
another :data:`PROTOCOL_VERSION`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from ..core.errors import ProtocolError
from .values import (
    DTYPES,
    MAGIC,
    MAX_RANK,
    PROTOCOL_VERSION,
    VERSION_FRAME,
    _Decoder,
    _Encoder,
    _malformed,
    _unpack,
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a message must respect; :func:`decode` checks them before trusting anything."""

    max_frames: int = 4096
    max_header_bytes: int = 64 << 20
    max_total_bytes: int = 4 << 30
    max_depth: int = 64


_DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: what to do (``kind``), its arguments (``body``), the protocol."""

    kind: str
    body: dict
    version: int = PROTOCOL_VERSION


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
    limits = limits or _DEFAULT_LIMITS
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
    limits = limits or _DEFAULT_LIMITS
    if not frames:
        raise ProtocolError("empty message: expected a version frame and a header frame")
    views = [_buffer(frames[0], 0)]
    _check_version(views[0])
    if len(frames) < 2:
        raise ProtocolError("message has a version frame but no header frame after it")
    views += [_buffer(frames[index], index) for index in range(1, len(frames))]
    _check_sizes(views, limits, ProtocolError)
    kind, body, specs = _split_header(_unpack(views[1], "header"))
    if len(views) != len(specs) + 2:
        raise ProtocolError(
            f"message has {len(views)} frames but its header describes {len(specs)} tensors, "
            f"expected {len(specs) + 2} frames (version, header, one per tensor)"
        )
    tensors = [  # a received zmq.Frame (it has .buffer) is adopted, other bytes are copied
        _tensor_from_frame(spec, views[i + 2], i, hasattr(frames[i + 2], "buffer"))
        for i, spec in enumerate(specs)
    ]
    return Message(kind, _Decoder(tensors, limits.max_depth).value(body, 0), PROTOCOL_VERSION)


_SPEC_KEYS = frozenset(("dtype", "shape", "nbytes"))


def _tensor_from_frame(spec: Any, view: memoryview, index: int, adopt: bool) -> torch.Tensor:
    what = f"tensor {index} (frame {index + 2})"
    if type(spec) is not dict or spec.keys() != _SPEC_KEYS:
        raise _malformed(f"{what}'s header", spec, '{"dtype", "shape", "nbytes"}')
    name, shape, nbytes = spec["dtype"], spec["shape"], spec["nbytes"]
    dtype = DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise _malformed(f"{what}'s dtype", name, f"one of {', '.join(DTYPES)}")
    if type(shape) is not list or len(shape) > MAX_RANK:
        raise _malformed(f"{what}'s shape", shape, f"a list of at most {MAX_RANK} sizes")
    numel = 1
    for d in shape:
        if type(d) is not int or d < 0:
            numel = -1
            break
        numel *= d
    if numel < 0 or _strides_overflow(shape):
        raise _malformed(f"{what}'s shape", shape, "non-negative int sizes, strides in int64")
    expected = numel * dtype.itemsize
    if nbytes != expected or len(view) != expected:
        raise ProtocolError(
            f"{what} claims {nbytes!r} bytes and its frame has {len(view)}, but shape {shape} "
            f"of {name} needs {expected}; the sender built a corrupt message"
        )
    if not expected:
        return torch.empty(shape, dtype=dtype)
    out = _adopt(view, dtype) if adopt else None
    if out is None:  # the caller's bytes, or unaligned: one copy into memory of its own
        out = torch.frombuffer(bytearray(view), dtype=dtype)  # malloc: 16-byte aligned
    if dtype is torch.bool and int(out.view(torch.uint8).max()) > 1:
        raise _malformed(f"{what}'s bool data", "a byte > 1", "only 0 and 1")
    return out.reshape(shape)


def _strides_overflow(shape: list[int]) -> bool:
    """Whether torch would overflow int64 laying out ``shape`` (an empty tensor's other sizes
    still count: ``[0, 2**63]`` holds no bytes, yet torch cannot make it)."""
    span = 1
    for d in shape:
        span *= d or 1
    return span >= 2**63


def _adopt(view: memoryview, dtype: torch.dtype) -> torch.Tensor | None:
    """A received ``zmq.Frame``'s own memory as a tensor, when it is writable and aligned to
    its elements (libzmq keeps message data 8-byte aligned): no copy, and the tensor keeps the
    frame alive. Other buffers (the caller's bytes) are copied: a tensor never aliases them."""
    if view.readonly:
        return None
    out = torch.frombuffer(view, dtype=dtype)
    return None if out.data_ptr() % min(dtype.itemsize, 8) else out


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
    header = len(frames[1]) if len(frames) > 1 else 0
    if (
        len(frames) <= limits.max_frames
        and header <= limits.max_header_bytes
        and sum(map(len, frames)) <= limits.max_total_bytes
    ):
        return
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
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
