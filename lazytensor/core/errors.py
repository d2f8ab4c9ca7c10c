"""Errors: what lazytensor raises, how errors travel as data, and how they name the user's line.

The tree::

    LazytensorError
    ├── TraceError              misuse of the tracing API (wrong state, unsaved value, bad path)
    │   └── StrictModeError     a materialization inside a ``strict=True`` trace
    ├── GraphError              a node can never run (needs a later value, a step never ran)
    ├── OpNotAllowedError       an op outside the allow-list (also raised by the server)
    ├── ProtocolError           a malformed or incompatible wire message
    ├── NodeFailure             carrier: node ``n`` failed with ``error`` (re-raised at its line)
    └── RemoteError             the server failed a request for a reason with no local type
        ├── LimitExceeded       a request over one of the server's limits
        ├── RemoteOutOfMemory   the server ran out of (GPU) memory; also a ``MemoryError``
        └── RemoteTimeout       a time limit passed, server or client side; also a ``TimeoutError``

An exception raised *by the user's own ops* during replay (an ``IndexError`` from an
out-of-range index, a ``RuntimeError`` from a shape mismatch) keeps its original type; its
message is rewritten by :func:`at_site` to quote the user's source line.

Every exception crosses the wire in one place: :func:`to_data` on the server, :func:`from_data`
on the client. Only the type *names* in :data:`_BY_NAME` come back as those types; anything
else becomes a :class:`RemoteError` carrying the server's message.
"""

from __future__ import annotations

from typing import Any

from .site import Site


class LazytensorError(Exception):
    """Base class of every error lazytensor raises itself."""


class TraceError(LazytensorError):
    """The tracing API was used in a way it cannot honour."""


class StrictModeError(TraceError):
    """A value was materialized inside a trace opened with ``strict=True``."""


class GraphError(LazytensorError):
    """A recorded node can never run during the forward pass."""


class OpNotAllowedError(LazytensorError):
    """An op is not in the allow-list of :mod:`lazytensor.core.ops`."""


class ProtocolError(LazytensorError):
    """A wire message is malformed, truncated or from an incompatible version."""


class RemoteError(LazytensorError):
    """The server failed a request; the message is the server's."""


class LimitExceeded(RemoteError):
    """A request was over one of the server's limits (the message names the flag)."""


class RemoteOutOfMemory(RemoteError, MemoryError):
    """The server ran out of memory (on the GPU, usually) while running the request."""


class RemoteTimeout(RemoteError, TimeoutError):
    """A request ran past a time limit: the server's ``--max-seconds`` or the client's wait."""


class UnknownRequest(RemoteError, KeyError):
    """The server holds no request with that id (it expired, or was never received)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NodeFailure(LazytensorError):
    """Replay of node ``node`` failed with ``error``.

    The executor knows node ids, not source lines; whoever holds the graph's sites turns this
    into the user's exception with :func:`at_site` (the client, after a remote failure too).
    """

    def __init__(
        self, node: int, error: BaseException, hint: str = "", segment: int | None = None
    ) -> None:
        super().__init__(f"node {node}: {type(error).__name__}: {error}")
        self.node = node
        self.error = error
        self.hint = hint
        self.segment = segment  # in a session: which of its runs


def at_site(exc: BaseException, site: Site | None, hint: str = "") -> BaseException:
    """Return an exception of ``exc``'s type whose message names the user's line.

    The original exception is kept as ``__cause__``. Types whose constructor does not take a
    single message fall back to :class:`GraphError`.
    """
    where = f" at {site}" if site is not None else ""
    message = f"{type(exc).__name__}{where}: {text_of(exc)}"
    if hint:
        message += f"\n  {hint}"
    try:
        new = type(exc)(message)
    except Exception:
        new = GraphError(message)
    if str(new) != message:  # e.g. KeyError quotes its argument
        new = GraphError(message)
    new.__cause__ = exc
    return new


def text_of(exc: BaseException) -> str:
    """The message of ``exc`` (``str`` of a ``KeyError`` is the repr of its message)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


#: The exception types that cross the wire as themselves, by name.
_BY_NAME: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (IndexError, ValueError, TypeError, KeyError, AttributeError, RuntimeError,
                ZeroDivisionError, NotImplementedError, PermissionError, OverflowError,
                LazytensorError, TraceError, StrictModeError, GraphError, OpNotAllowedError,
                ProtocolError, RemoteError, LimitExceeded, RemoteOutOfMemory, RemoteTimeout,
                UnknownRequest)
}  # fmt: skip


def to_data(exc: BaseException) -> dict[str, Any]:
    """An exception as plain data for the wire: ``{"type", "message"[, "node", "hint"]}``.

    Memory and time errors are named by what they mean to the client (``RemoteOutOfMemory``,
    ``RemoteTimeout``), whatever class raised them on the server.
    """
    data: dict[str, Any] = {}
    if isinstance(exc, NodeFailure):
        data = {"node": exc.node, "hint": exc.hint}
        if exc.segment is not None:
            data["segment"] = exc.segment
        exc = exc.error
    return {"type": _wire_name(exc), "message": text_of(exc), **data}


def _wire_name(exc: BaseException) -> str:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "RemoteOutOfMemory"  # torch.cuda.OutOfMemoryError is a RuntimeError
    if isinstance(exc, TimeoutError) and not isinstance(exc, RemoteError):
        return "RemoteTimeout"
    return type(exc).__name__


def from_data(data: Any) -> BaseException:
    """The exception :func:`to_data` described; a :class:`NodeFailure` when it names a node."""
    data = data if isinstance(data, dict) else {}
    cls = _BY_NAME.get(str(data.get("type")), RemoteError)
    message = str(data.get("message") or "the server failed the request")
    try:
        exc = cls(message)
    except Exception:
        exc = RemoteError(message)
    node, segment = data.get("node"), data.get("segment")
    if type(node) is int:
        segment = segment if type(segment) is int else None
        return NodeFailure(node, exc, str(data.get("hint") or ""), segment)
    return exc
