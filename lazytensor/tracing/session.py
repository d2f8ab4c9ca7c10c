"""Session: many traces (and the code between them) recorded as one job.

``with lm.session(remote=True):`` records every trace opened in its block, and the session's
own code between them (``lt.parameter``, ``opt.step()``), as *segments* of one request
(:class:`~lazytensor.core.graph.Segment`): one round trip and one queue slot however many
traces it holds. Nothing runs until the block ends; then every saved value arrives at once.

A value of one segment used in a later one becomes a ``carry`` node there, so it flows between
traces without leaving the process that runs them (see :mod:`lazytensor.runtime.session`).
Session code between traces records into a segment with no batch; an op on a value from a
trace that has ended records there too, in the order the code runs.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ..core.errors import TraceError
from ..core.graph import Ref, Segment
from ..core.site import here, user_frame
from .state import State, current

if TYPE_CHECKING:
    from ..backends.base import Backend
    from .proxy import Proxy
    from .trace import Trace

_current: ContextVar[Session | None] = ContextVar("lazytensor_session", default=None)


def active() -> Session | None:
    """The session whose block is running in this thread/context, if any."""
    return _current.get()


class Session:
    """One ``with model.session(...)`` block; see the module docstring.

    Created by :meth:`lazytensor.Model.session`; ``root`` is the model's root envoy.
    """

    def __init__(self, root: Any, backend: Backend, make_trace: Any) -> None:
        self.root, self.backend = root, backend
        self._make_trace = make_trace  # () -> a Trace of root with no inputs (session code)
        self.segments: list[Trace] = []
        self.index: dict[int, int] = {}  # id(trace) -> its segment
        self.plain: set[int] = set()  # ids of the session-code segments
        self.carried: dict[tuple[int, int, int], int] = {}
        self.adapters: list[Any] = []  # applied to every trace opened later (lt.lora)
        self.open = False
        self.failed = False
        self._token: Any = None

    def __enter__(self) -> Session:
        if self.open or self.segments:
            raise TraceError("a session can be entered once")
        self._token = _current.set(self)
        self.open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _current.reset(self._token)
        self.open = False
        if exc_type is not None:
            self.failed = True
            return False
        frame = user_frame()
        traces = self.segments
        segments = [Segment(t.graph, None if id(t) in self.plain else t._batch()) for t in traces]
        try:
            results = self.backend.run_session(segments) if segments else []
        except BaseException as exc:
            self.failed = True
            raise _at_site(exc, traces) from None
        for trace, values in zip(traces, results, strict=True):
            trace.values = values
            trace._frame = frame
            trace._finish()
        return False

    # -- segments -------------------------------------------------------------------------
    def begin(self, trace: Trace) -> None:
        """A trace of this session's model opens: it is the next segment."""
        if trace.root is not self.root:
            raise TraceError("a session holds traces of its own model only")
        self._append(trace)
        for adapter in self.adapters:
            adapter.apply(trace)

    def recording(self) -> Trace:
        """Where session code records now: the trace being recorded, or session code."""
        trace = current()
        if trace is not None and trace.state is State.RECORDING and id(trace) in self.index:
            return trace
        last = self.segments[-1] if self.segments else None
        if last is not None and id(last) in self.plain:
            return last
        code = self._make_trace()
        self.plain.add(id(code))
        self._append(code)
        return code

    def _append(self, trace: Trace) -> None:
        last = self.segments[-1] if self.segments else None
        if last is not None and id(last) in self.plain:
            last.state = State.SUBMITTED  # later session code records in a later segment
        self.index[id(trace)] = len(self.segments)
        self.segments.append(trace)
        trace.session = self

    def holds(self, proxy: Proxy) -> bool:
        return id(proxy._trace) in self.index

    def carry(self, proxy: Proxy, into: Trace) -> Ref:
        """``proxy`` (of an earlier segment) as an argument of a node of ``into``."""
        source = self.index[id(proxy._trace)]
        target = self.index[id(into)]
        if source > target:
            raise TraceError(f"a value at {here()} is used before the trace that computes it")
        key = (target, source, proxy._node)
        if key not in self.carried:
            node = into.graph.add("carry", "", (source, proxy._node), site=here())
            self.carried[key] = node.id
        return Ref(self.carried[key])

    def refuse_value(self, what: str) -> None:
        raise TraceError(
            f"{what} at {here()}: values of a session exist once its block ends (it runs as "
            "one job then); save them and read them after the session"
        )


def _at_site(exc: BaseException, traces: list[Trace]) -> BaseException:
    """A failure of one segment's node, re-raised at the user's line that recorded it."""
    from ..core.errors import NodeFailure, at_site

    segment = getattr(exc, "segment", None)
    if isinstance(exc, NodeFailure) and segment is not None and segment < len(traces):
        return at_site(exc.error, traces[segment].graph.sites[exc.node], exc.hint)
    return exc
