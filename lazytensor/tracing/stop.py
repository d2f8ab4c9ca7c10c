"""Stop: ``tracer.stop()``, the end of a run as graph data.

A ``stop`` node reads every node recorded before it that nothing else reads yet (the graph's
sinks), so it becomes ready exactly when everything recorded before it has run; the executor
then ends the forward pass (and a generation) there. Being a node, it travels to a server like
any other. Nothing can be recorded after it: nothing after it would run.

Without a ``stop`` the executor ends the forward on its own once every node has run and none
waits for a later call (:meth:`lazytensor.runtime.executor.Executor._fire`); ``tracer.stop()``
says so explicitly, and also ends a generation whose nodes repeat at every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.errors import TraceError
from ..core.graph import Ref
from ..core.site import here

if TYPE_CHECKING:
    from .trace import Trace


def record(trace: Trace) -> None:
    """Record ``tracer.stop()`` on ``trace``."""
    trace._check_recording()
    nodes = trace.graph.nodes
    read: set[int] = set()
    for node in nodes:
        read.update(node.deps())
    sinks = tuple(node.id for node in nodes if node.id not in read)
    site = here()
    stop = trace.graph.add("stop", "", tuple(Ref(i) for i in sinks), site=site)
    stop._deps = sinks
    trace.stopped = site


def refuse_after(trace: Trace) -> None:
    """Raise if ``trace`` was stopped: what is recorded after ``tracer.stop()`` never runs."""
    raise TraceError(
        f"{here()}: nothing can be recorded after tracer.stop() (at {trace.stopped}): the "
        "run ends there, so this would never run; record it before the stop"
    )
