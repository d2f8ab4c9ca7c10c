"""Args: turning what a user passes to a recorded op into graph data, and proxies into values.

Inside a trace, every argument of a recorded op becomes plain data (:func:`to_graph`): a proxy
of this trace becomes a :class:`~lazytensor.core.graph.Ref`, a tensor a
:class:`~lazytensor.core.graph.Const` in the graph's constants, a ``torch.Size`` or named tuple a
plain tuple, a ``range`` a list. After the block, :func:`to_values` does the reverse for ops run
eagerly on saved values. Anything a graph cannot hold is a :class:`TraceError` naming the line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..core import tree
from ..core.errors import TraceError
from ..core.graph import SCALARS, ref
from ..core.site import here
from ..runtime.evaluate import evaluate
from .proxy import Proxy

if TYPE_CHECKING:
    from .trace import Trace

_SCALARS = SCALARS
_PLAIN = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis), torch.dtype,
          torch.device)  # fmt: skip


def to_graph(value: Any, trace: Trace, refs: list[int]) -> Any:
    """``value`` as graph data for ``trace``; appends the ids of the nodes it reads to ``refs``."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is tuple:  # an index such as (slice(None), 0): its scalars need no call
        return tuple([v if type(v) in _SCALARS else to_graph(v, trace, refs) for v in value])
    if kind is dict:  # keyword arguments
        return {k: v if type(v) in _SCALARS else to_graph(v, trace, refs) for k, v in value.items()}
    if kind is slice and (
        type(value.start) in _SCALARS
        and type(value.stop) in _SCALARS
        and type(value.step) in _SCALARS
    ):
        return value  # what rebuilding it would make
    if isinstance(value, Proxy):
        if value._trace is trace:
            refs.append(value._node)
            return ref(value._node)
        session = trace.session
        if session is not None and session.holds(value):  # an earlier trace's, or session code
            carried = session.carry(value, trace)
            refs.append(carried.id)
            return carried
        return to_graph(value._trace.value_of(value), trace, refs)  # another trace's result
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return trace.graph.constant(value)
    if isinstance(value, tuple):  # torch.Size and named tuples travel as plain tuples
        return tuple([to_graph(v, trace, refs) for v in value])
    if isinstance(value, range):
        return list(value)
    if tree.is_container(value):
        return tree.rebuild(value, [to_graph(v, trace, refs) for v in tree.children(value)])
    raise TraceError(
        f"a {type(value).__name__} cannot be used inside a trace at {here()}: a graph "
        "holds only tensors, numbers, strings, slices, dtypes, devices and containers of "
        "them; compute with it outside the trace or pass a tensor instead"
    )


def to_values(value: Any) -> Any:
    """``value`` with every proxy replaced by its real value (after its trace has run)."""
    return tree.map(_real, value)


def _real(value: Any) -> Any:
    return value.value if isinstance(value, Proxy) else value


def has_proxy(items: Any) -> bool:
    """Whether ``items`` (an argument list) holds a proxy, at the top or one level down."""
    for item in items:
        if isinstance(item, Proxy):
            return True
        if isinstance(item, (tuple, list)) and any(isinstance(i, Proxy) for i in item):
            return True
    return False


def computed_inputs(trace: Trace, value: Any) -> Any:
    """Invoke inputs built inside the block (``torch.ones(...)`` was recorded): compute them.

    An input may use factories and ops on constants, not values from the model.
    """
    if not trace.graph.nodes:  # nothing recorded yet (the trace's own inputs): no proxy of it
        return value
    proxies = [v for v in tree.leaves(value) if isinstance(v, Proxy) and v._trace is trace]
    if not proxies:
        return value
    wanted, stack = set(), [p._node for p in proxies]
    while stack:
        i = stack.pop()
        if i not in wanted:
            wanted.add(i)
            stack.extend(trace.graph.nodes[i].refs())
    nodes = trace.graph.nodes
    if any(nodes[i].is_point or nodes[i].op == "module" for i in wanted):
        raise TraceError(
            f"an invoke's input at {here()} uses a value from the model; "
            "inputs must be known before the forward pass"
        )
    values: dict[int, Any] = {}
    with trace._paused():
        for i in sorted(wanted):
            values[i] = evaluate(nodes[i], values, trace.graph.constants)

    def computed(v: Any) -> Any:
        return values[v._node] if isinstance(v, Proxy) and v._trace is trace else v

    return tree.map(computed, value)
