"""Edits: interventions that stay applied to every later trace of a model.

``with lm.edit() as (tracer, edited):`` records a block like a trace, with no inputs, and never
runs it: its nodes are kept on a new wrapper ``edited`` that shares ``lm``'s module (no weight is
copied), and every trace of ``edited`` starts with them, ahead of its own nodes. So an edit is
graph data like the rest: it travels to a server with each trace, and a handle on a served model
(``client.model(name)``) is edited the same way. ``lm.edit(inplace=True)`` keeps the nodes on
``lm`` itself (the tuple is ``(tracer, lm)``), and ``lm.clear_edits()`` drops them.

An edit's nodes are recorded as in a trace: a module access means its first call, unless the
block says otherwise (``with tracer.all():`` for every generation step). A later edit of the
same wrapper adds to the earlier ones (its graph starts from them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..core.errors import TraceError
from ..core.graph import Graph
from ..tracing.trace import Trace


def of(model: Any) -> Graph | None:
    """The edits applied to ``model``'s traces, if any."""
    return model.__dict__.get("_edits")


def seed(model: Any, trace: Trace) -> Trace:
    """Start ``trace``'s graph with ``model``'s edits; return the trace."""
    edits = of(model)
    if edits is not None:
        assert not trace.graph.nodes, "edits go first: seed a trace before it records"
        trace.graph = Graph(list(edits.nodes), list(edits.constants), [], list(edits.sites))
    return trace


@contextlib.contextmanager
def edit(model: Any, inplace: bool) -> Iterator[tuple[Trace, Any]]:
    """``model.edit(inplace=...)``: see the module docstring."""
    target = model if inplace else copy(model)
    tracer = seed(target, Trace(target, target._inputs, target.backend(False), edit=True))
    with tracer:
        yield tracer, target
    _check(tracer)
    graph = tracer.graph
    object.__setattr__(target, "_edits", Graph(graph.nodes, graph.constants, [], graph.sites))


def copy(model: Any) -> Any:
    """A new wrapper of the same module: same tokenizer, backend and names, its own envoys."""
    new = object.__new__(type(model))
    new.__dict__.update(model.__dict__)
    object.__setattr__(new, "_children", {})
    return new


def clear(model: Any) -> None:
    object.__setattr__(model, "_edits", None)


def _check(tracer: Trace) -> None:
    if tracer.graph.saved:
        site = tracer.graph.sites[tracer.graph.saved[0]]
        raise TraceError(
            f"a value is saved inside an edit (at {site}): an edit is never run on its own, "
            "it applies to later traces; save values inside those traces"
        )
    if tracer.parts:
        raise TraceError(
            "an edit takes no inputs (it applies to every later trace, whatever its inputs); "
            "open an invoke inside a trace instead"
        )
    if tracer.stopped is not None:
        raise TraceError(
            f"tracer.stop() inside an edit (at {tracer.stopped}) would end every later trace "
            "before its own nodes; call it inside a trace"
        )
