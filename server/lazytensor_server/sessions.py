"""Checks for backward passes, model weights, trainable tensors and sessions.

Like every other node, these are data the service checks before anything runs: a ``grad`` node
belongs to a ``backward`` node recorded before it, a ``weight`` names one of the served model's
parameters or buffers, an optimizer is one of the allow-listed few with numeric options, a
``carry`` reads an earlier segment of the same session. What is checked only while running
(an optimizer is given trainable tensors, never weights; writes never reach a weight) is in
:mod:`lazytensor.runtime.session` and the executor.
"""

from __future__ import annotations

from typing import Any

from lazytensor.core.errors import OpNotAllowedError, ProtocolError
from lazytensor.core.graph import GRADIENTS, STATE, Graph, Node, Ref, Segment
from lazytensor.runtime.session import OPTIMIZER_CALLS, OPTIMIZERS, carried

from .registry import ServedModel

OPS = frozenset(GRADIENTS + STATE)


def check_node(node: Node, graph: Graph, served: ServedModel) -> None:
    """Refuse a gradient or state node that could not have been recorded."""
    op, args = node.op, node.args
    if op == "backward":
        _shape(node, 1, ref=True)
        if set(node.kwargs) - {"retain_graph", "gradient"}:
            raise OpNotAllowedError("backward takes retain_graph= and gradient= only")
    elif op in ("grad", "set_grad"):
        _shape(node, 1 if op == "grad" else 2, ref=True)
        call = node.call
        if not (type(call) is int and 0 <= call < node.id and graph.nodes[call].op == "backward"):
            raise ProtocolError(f"{op} node {node.id} names no earlier backward pass")
    elif op == "weight":
        if node.target not in served.weights:
            raise AttributeError(f"the model {served.name!r} has no weight {node.target!r}")
    elif op == "parameter":
        _shape(node, 1)
    elif op == "carry":
        if len(args) != 2 or not all(type(a) is int for a in args):
            raise ProtocolError(f"carry node {node.id} needs (segment, node) integers")
    elif op == "optimizer":
        allowed = OPTIMIZERS.get(node.target)
        if allowed is None:
            raise OpNotAllowedError(f"optimizer {node.target!r} is not one of {sorted(OPTIMIZERS)}")
        for name, value in node.kwargs.items():
            if name not in allowed or not _number(value):
                raise OpNotAllowedError(f"{node.target} option {name}={value!r} is refused")
        _shape(node, 1)
    elif op == "optimize":
        if node.target not in OPTIMIZER_CALLS:
            raise OpNotAllowedError(f"an optimizer's {node.target!r} cannot be called")
        _shape(node, 1, ref=True)


def _shape(node: Node, count: int, *, ref: bool = False) -> None:
    if len(node.args) != count or (ref and type(node.args[0]) is not Ref):
        raise ProtocolError(f"{node.op} node {node.id} has malformed arguments")


def _number(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return len(value) <= 4 and all(_number(v) for v in value)
    return type(value) in (int, float, bool)


def check_segments(segments: tuple[Segment, ...]) -> None:
    """A session's structure: session code holds no module moments; carries go backwards."""
    for segment in segments:
        if segment.batch is None:
            for node in segment.graph.nodes:
                if node.is_point or node.op == "module":
                    raise OpNotAllowedError(
                        "module values exist only inside a trace, not in a session's own code"
                    )
    try:
        carried(list(segments))
    except Exception as exc:
        raise ProtocolError(f"a session's carried values are malformed: {exc}") from None
