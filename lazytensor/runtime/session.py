"""Session: several runs as one job, sharing values, trainable tensors and optimizers.

A session is a list of :class:`~lazytensor.core.graph.Segment`\\ s run in order: a trace's graph
runs inside the model on its batch; a segment without a batch is the session's own code
between traces (an optimizer step). A later segment reads an earlier one's value through a
``carry`` node, so values flow between traces without leaving the process that runs them; the
:class:`Workspace` holds them, and the trainable tensors (``parameter`` nodes) and optimizers.

Trainable tensors are the only tensors a run trains: an optimizer takes nothing else (never a
model weight), and backward passes write gradients only into them (see :mod:`.grads`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import GraphError, NodeFailure
from ..core.graph import Graph, Node, Segment
from . import grads

#: The optimizers a graph may build, and the options each takes (all numbers or flags).
OPTIMIZERS: dict[str, frozenset[str]] = {
    "SGD": frozenset(("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")),
    "Adam": frozenset(("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")),
    "AdamW": frozenset(("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")),
}
OPTIMIZER_CALLS = frozenset(("step", "zero_grad"))


@dataclass
class Workspace:
    """What the segments of one session share.

    Attributes:
        kept: ``(segment, node) -> value`` for the values later segments carry.
        trainables: the tensors ``parameter`` nodes made (leaves that require grad).
        segment: the index of the segment running now.
    """

    kept: dict[tuple[int, int], Any] = field(default_factory=dict)
    trainables: list[torch.Tensor] = field(default_factory=list)
    segment: int = 0

    def carry(self, node: Node) -> Any:
        segment, index = node.args
        if (segment, index) not in self.kept:
            raise GraphError(
                f"value {index} of run {segment} of this session was not kept for later runs"
            )
        return self.kept[(segment, index)]

    def parameter(self, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise GraphError("lt.parameter() takes a floating-point tensor")
        tensor = value.detach().clone().requires_grad_(True)
        self.trainables.append(tensor)
        return tensor

    def optimizer(self, node: Node, params: Any, options: dict) -> torch.optim.Optimizer:
        allowed = OPTIMIZERS.get(node.target)
        if allowed is None:
            raise GraphError(f"optimizer {node.target!r} is not one of {sorted(OPTIMIZERS)}")
        unknown = set(options) - allowed
        if unknown:
            raise GraphError(f"{node.target} takes {sorted(allowed)}, not {sorted(unknown)}")
        params = list(params) if isinstance(params, (list, tuple)) else [params]
        owned = {id(t) for t in self.trainables}
        if not params or not all(id(p) in owned for p in params):
            raise GraphError(
                "an optimizer trains only tensors made with lt.parameter() (or an adapter's); "
                "the model's weights stay frozen"
            )
        return getattr(torch.optim, node.target)(params, **options)

    def optimize(self, node: Node, optimizer: Any) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer) or node.target not in OPTIMIZER_CALLS:
            raise GraphError("only an optimizer's step() and zero_grad() can be called")
        getattr(optimizer, node.target)()


def carried(segments: list[Segment]) -> list[set[int]]:
    """Per segment, the ids of its nodes that later segments carry."""
    needed: list[set[int]] = [set() for _ in segments]
    for later, segment in enumerate(segments):
        for node in segment.graph.nodes:
            if node.op == "carry":
                source, index = node.args
                if not (type(source) is int and 0 <= source < later):
                    raise GraphError(f"run {later} carries a value of run {source!r}, not earlier")
                if not (type(index) is int and 0 <= index < len(segments[source].graph.nodes)):
                    raise GraphError(f"run {source} has no node {index!r}")
                needed[source].add(index)
    return needed


def run(
    segments: list[Segment], execute: Callable[[Graph, Any, Workspace], dict[int, Any]]
) -> list[dict[int, Any]]:
    """Run a session's segments in order; per segment, the values it saved.

    ``execute(graph, batch, workspace)`` runs one segment (``batch`` is ``None`` for session
    code) and returns its saved values; each graph is given with the carried nodes added to
    its saved ones.
    """
    needed = carried(segments)
    workspace = Workspace()
    results = []
    for index, segment in enumerate(segments):
        workspace.segment = index
        graph = segment.graph
        keep = [i for i in sorted(needed[index]) if i not in graph.saved]
        if keep:
            graph = Graph(graph.nodes, graph.constants, [*graph.saved, *keep], graph.sites)
        try:
            values = execute(graph, segment.batch, workspace)
        except NodeFailure as failure:
            failure.segment = index
            raise
        for i in needed[index]:
            workspace.kept[(index, i)] = values[i]
        # data, not a training graph: a trainable tensor saved by session code is one too
        results.append(grads.detached({i: values[i] for i in segment.graph.saved}))
    return results
