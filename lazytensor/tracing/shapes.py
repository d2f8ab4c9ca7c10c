"""Shapes: answering ``.shape``/``.dtype``/``len()`` inside a trace without running the model.

Every proxy can get a *fake* value: a tensor with shape, dtype and device but no data
(``FakeTensorMode``). A node whose inputs already have fake values is propagated alone, by the
executor's own method for its op; any other node (a module's output, say) needs a shape-only
pass of the graph so far through the model, which fills in fake values for everything it
reaches. The pass runs where the graph would run: locally, or on the server for a served model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import TraceError, at_site
from ..core.graph import Const, Graph, Node
from ..runtime import fake
from ..runtime.evaluate import evaluate
from .proxy import Proxy

#: Ops whose values need the model (or a backward pass): a shape-only pass computes them.
_NEEDS_A_RUN = frozenset(("module", "weight", "backward", "grad", "set_grad", "optimizer",
                          "optimize"))  # fmt: skip

if TYPE_CHECKING:
    from .trace import Trace


class Shapes:
    """The fake values of one trace's nodes, computed on demand and kept until it ends."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.fake: dict[int, Any] = {}
        self._mode: Any = None

    def of(self, i: int) -> Any:
        """The fake value of node ``i``."""
        if i not in self.fake:
            node = self.trace.graph.nodes[i]
            if node.op == "carry":  # a value of an earlier segment of the session
                self.fake[i] = self._carried(node)
            elif self._alone(i):
                self.fake[i] = self._propagate(i)
            else:
                trace = self.trace
                prefix = self._without_carries(trace.graph.prefix(i))
                found = trace._run(prefix, fake_mode=self.mode())
                for node, value in found.items():  # a pass frees values it no longer needs
                    if value is not None:
                        self.fake.setdefault(node, value)
        if i not in self.fake:
            raise TraceError(
                f"the shape of the value at {self.trace.graph.sites[i]} cannot be known inside "
                "the trace: the shape-only pass never reached it (the model never computes it, "
                "or first computes a shape from tensor values); save it and read it after the "
                "trace"
            )
        return self.fake[i]

    def mode(self) -> Any:
        if self._mode is None:
            self._mode = fake.mode()
        return self._mode

    def _alone(self, i: int) -> bool:
        """Whether node ``i`` can be propagated without a pass through the model."""
        node = self.trace.graph.nodes[i]
        return (
            not node.is_point
            and node.op not in _NEEDS_A_RUN
            and all(d in self.fake for d in node.deps())
        )

    def _carried(self, node: Node) -> Any:
        segment, index = node.args
        source = self.trace.session.segments[segment]
        return source.meta(Proxy.of(source, index))

    def _without_carries(self, graph: Graph) -> Graph:
        """``graph`` with each carried tensor a constant of its shape: a shape-only pass runs
        one trace, without the values of the session's other traces."""
        carries = [n for n in graph.nodes if n.op == "carry"]
        if not carries:
            return graph
        nodes, constants = list(graph.nodes), list(graph.constants)
        for node in carries:
            value = self._carried(node)
            if isinstance(value, torch.Tensor):
                with self.trace._paused():  # a real tensor, not a recorded factory call
                    constants.append(torch.zeros(value.shape, dtype=value.dtype))
                nodes[node.id] = Node(node.id, "method", "clone", (Const(len(constants) - 1),))
        return Graph(nodes, constants, graph.saved, graph.sites)

    def _propagate(self, i: int) -> Any:
        """Node ``i``'s fake value from its inputs' (no plan, no pass through the model)."""
        trace = self.trace
        node, mode = trace.graph.nodes[i], self.mode()
        try:
            with trace._paused(), mode:
                return evaluate(node, self.fake, trace.graph.constants, fake_mode=mode)
        except Exception as exc:
            hint = ""
            if fake.is_data_dependent(exc):
                hint = (
                    "this op's output shape depends on tensor values, so it is unknown inside "
                    "the trace; use it after the trace"
                )
            raise at_site(exc, trace.graph.sites[i], hint) from exc
