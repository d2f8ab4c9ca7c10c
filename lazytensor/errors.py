"""Errors: what lazytensor raises, and how a replay failure is tied to the user's line.

The tree::

    LazytensorError
    ├── TraceError            misuse of the tracing API (wrong state, unsaved value, bad path)
    │   └── StrictModeError   a materialization inside a ``strict=True`` trace
    ├── GraphError            a node can never run (needs a later value, iteration never happened)
    ├── OpNotAllowedError     an op outside the allow-list (also raised by the server)
    ├── ProtocolError         a malformed or incompatible wire message
    └── RemoteError           the server failed a request for a reason that has no local type
        └── LimitExceeded     a request over one of the server's limits

An exception raised *by the user's own ops* during replay (an ``IndexError`` from an
out-of-range index, a ``RuntimeError`` from a shape mismatch) keeps its original type; its
message is rewritten by :func:`at_site` to quote the user's source line.
"""

from __future__ import annotations

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
    """An op is not in the allow-list of :mod:`lazytensor.ops`."""


class ProtocolError(LazytensorError):
    """A wire message is malformed, truncated or from an incompatible version."""


class RemoteError(LazytensorError):
    """The server failed a request; the message is the server's."""


class LimitExceeded(RemoteError):
    """A request was over one of the server's limits (the message names the flag)."""


def at_site(exc: BaseException, site: Site | None, hint: str = "") -> BaseException:
    """Return an exception of ``exc``'s type whose message names the user's line.

    The original exception is kept as ``__cause__``. Types whose constructor does not take a
    single message fall back to :class:`GraphError`.
    """
    where = f" at {site}" if site is not None else ""
    message = f"{type(exc).__name__}{where}: {exc}"
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


class NodeFailure(LazytensorError):
    """Replay of node ``node`` failed with ``error``.

    The executor knows node ids, not source lines; whoever holds the graph's sites turns this
    into the user's exception with :func:`at_site` (the client, after a remote failure too).
    """

    def __init__(self, node: int, error: BaseException, hint: str = "") -> None:
        super().__init__(f"node {node}: {type(error).__name__}: {error}")
        self.node = node
        self.error = error
        self.hint = hint
