"""Gradients: recording ``loss.backward()``, ``h.grad`` and ``h.grad = g`` inside a trace.

::

    with lm.trace(prompt):
        h = lm.model.layers[3].output
        loss = lm.output.logits[0, -1].log_softmax(-1)[target]
        with loss.backward():          # a ``backward`` node
            g = h.grad.save()          # a ``grad`` node of that backward pass
            h.grad = h.grad * 0        # a ``set_grad`` node: upstream sees the new gradient

A ``.grad`` inside the block of a backward pass belongs to that pass (the node's ``call`` is
the ``backward`` node's id), so several backward passes in one trace each read their own. How
the replay runs them: :mod:`lazytensor.runtime.grads`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.errors import TraceError
from ..core.site import here
from .args import to_graph
from .proxy import Proxy

if TYPE_CHECKING:
    from .trace import Trace


class Backward:
    """What ``loss.backward()`` returns: its block is where ``.grad`` reads this pass.

    Without a ``with`` block the backward pass still runs (training a parameter needs no
    gradient read).
    """

    def __init__(self, trace: Trace, node: int) -> None:
        self.trace, self.node = trace, node
        self._outer: int | None = None

    def __enter__(self) -> Backward:
        self._outer, self.trace.backward_id = self.trace.backward_id, self.node
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.trace.backward_id = self._outer
        return False


def backward(
    trace: Trace, loss: Proxy, gradient: Any = None, retain_graph: bool | None = None, **kw: Any
) -> Backward:
    """Record a backward pass from ``loss`` (``retain_graph`` to run another one later)."""
    if kw:
        raise TraceError(
            f"backward() at {here()} takes gradient= and retain_graph= only, not {sorted(kw)}"
        )
    kwargs: dict[str, Any] = {}
    if gradient is not None:
        kwargs["gradient"] = gradient
    if retain_graph is not None:
        kwargs["retain_graph"] = bool(retain_graph)
    node = trace.apply("backward", "", (loss,), kwargs)
    return Backward(trace, node._node)


def _pass(trace: Trace, what: str) -> int:
    if trace.backward_id is None:
        raise TraceError(
            f"{what} at {here()} is only known during a backward pass: use it inside "
            "`with loss.backward():`"
        )
    return trace.backward_id


def read(trace: Trace, proxy: Proxy) -> Proxy:
    """``proxy.grad``: the gradient reaching ``proxy``'s value in the current backward pass."""
    call = _pass(trace, ".grad")
    refs: list[int] = []
    value = to_graph(proxy, trace, refs)
    node = trace.graph.add("grad", "", (value,), call=call, site=here())
    return Proxy.of(trace, node.id)


def write(trace: Trace, proxy: Proxy, new: Any) -> None:
    """``proxy.grad = new``: what goes on upstream of ``proxy`` in the current backward pass."""
    call = _pass(trace, "setting .grad")
    refs: list[int] = []
    args = (to_graph(proxy, trace, refs), to_graph(new, trace, refs))
    trace.graph.add("set_grad", "", args, call=call, site=here())
