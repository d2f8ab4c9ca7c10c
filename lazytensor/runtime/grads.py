"""Grads: backward passes inside a replay, and the gradients a graph reads or replaces.

``with loss.backward():`` records a ``backward`` node; inside its block ``h.grad`` records a
``grad`` node and ``h.grad = g`` a ``set_grad`` node, each with ``call`` set to the backward
node's id. The replay works like a hand-written backward with tensor hooks:

* A run whose graph has a ``backward`` node runs its forward with grad mode on (any other run
  stays under ``no_grad``). Frozen weights give activations that need no gradient, so a
  module's value that a gradient is read from is made to require one where the model hands it
  over (:func:`track`), before anything is computed from it.
* When a node whose gradient the graph wants runs, a tensor hook is put on its value
  (:func:`watch`). The ``backward`` node then runs ``torch.autograd.backward``; as the
  gradient reaches each watched value its hook fires that value's *gradient moment*: the
  ``grad`` nodes of this backward pass run, and a ``set_grad`` replaces the gradient that goes
  on upstream.
* What a backward pass writes gradients into: the values it reads gradients of, the weights it
  reads gradients of, and the trainable tensors of the run (``lt.parameter``, adapters); never
  any other weight. Weights get back the ``.grad`` and ``requires_grad`` they had (wrapping a
  model changes nothing of it), and saved values come back detached from the run's autograd
  graph (:func:`detached`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..core import tree
from ..core.errors import GraphError
from ..core.graph import Node
from .plan import grad_key
from .rows import narrow, replace

if TYPE_CHECKING:
    from .executor import Executor

_BACKWARD_KWARGS = frozenset(("retain_graph", "gradient"))


def wanted(ex: Executor) -> frozenset[int]:
    """The nodes whose gradients some backward pass of the graph reads or replaces."""
    return frozenset(t for targets in ex.plan.backwards.values() for t in targets)


def sources(ex: Executor) -> frozenset[int]:
    """Point reads a wanted gradient is computed from: their values must require grad."""
    found: set[int] = set()
    stack = list(ex.grad_targets)
    while stack:
        i = stack.pop()
        if i in found:
            continue
        found.add(i)
        stack.extend(ex.deps[i])
    return frozenset(i for i in found if i in ex.key_of)


@contextlib.contextmanager
def weights_tracked(ex: Executor) -> Iterator[None]:
    """Let the weights whose gradients are read require grad for the run; afterwards give every
    weight back its ``requires_grad`` and, on a server, its ``.grad``."""
    params = [ex.model.get_parameter(ex.graph.nodes[i].target) for i in ex.grad_targets
              if i in ex.plan.weights and _is_parameter(ex, i)]  # fmt: skip
    before = [(p, p.requires_grad, p.grad) for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, requires, grad in before:
            p.requires_grad_(requires)
            p.grad = grad


def _is_parameter(ex: Executor, i: int) -> bool:
    target = ex.graph.nodes[i].target
    module, _, name = target.rpartition(".")
    return name in ex.model.get_submodule(module)._parameters


def track(ex: Executor, here: list[int]) -> None:
    """Make the tensors the point nodes ``here`` read from the moment now require grad (in
    place, where the model hands them over), so the forward records what a backward pass needs
    from here on."""
    for i in here:
        if i in ex.grad_sources:
            op, value = ex.graph.nodes[i].op, ex.current
            if op == "input":
                args, kwargs = value
                value = args[0] if args else next(iter(kwargs.values()), None)
            _require_grad(value)


def _require_grad(value: Any) -> None:
    """Floating-point leaves of ``value`` that need no gradient now need one."""
    for leaf in tree.leaves(value):
        if (
            isinstance(leaf, torch.Tensor)
            and leaf.is_floating_point()
            and not leaf.requires_grad
            and leaf.grad_fn is None
        ):
            leaf.requires_grad_(True)


def watch(ex: Executor, i: int, value: Any) -> None:
    """Put the hook that fires node ``i``'s gradient moment on its value.

    An invoke's read of a module's value is a view of its rows; the forward goes on with the
    whole value, so the hook goes there and hands node ``i`` the gradient of its rows."""
    node = ex.graph.nodes[i]
    rows, layout = None, ex.layout
    if node.rows is not None and node.op in ("output", "input") and ex.side is None:
        whole = ex.current if node.op == "output" else _first(ex.current)
        if isinstance(whole, torch.Tensor) and whole is not value:
            value, rows = whole, node.rows
    if isinstance(value, torch.Tensor) and value.requires_grad:
        value.register_hook(lambda grad: _reached(ex, i, grad, rows, layout))
        ex.watched.add(i)
        ex.watched_values[i] = value


def _first(inputs: Any) -> Any:
    args, kwargs = inputs
    return args[0] if args else next(iter(kwargs.values()), None)


def _reached(
    ex: Executor, i: int, grad: torch.Tensor, rows: Any = None, layout: Any = None
) -> torch.Tensor | None:
    """The gradient of node ``i`` (of its ``rows``) arrived: run its ``grad``/``set_grad``
    nodes."""
    backward = ex.backward_now
    if backward is None:  # a backward pass the graph did not record (the user's own)
        return None
    outer = (ex.current, ex.replaced, ex.active)
    ex.current, ex.replaced = narrow(grad, rows, layout) if rows else grad, False
    try:
        with torch.enable_grad():  # autograd runs hooks without: nodes that run now need it
            ex._fire(grad_key(i), call=backward)
        if not ex.replaced:
            return None
        return replace(grad, ex.current, rows, layout) if rows else ex.current
    finally:
        ex.current, ex.replaced, ex.active = outer


def backward(ex: Executor, node: Node) -> None:
    """Run backward pass ``node`` on its loss (see the module docstring)."""
    loss = ex._value(node.args[0])
    kwargs = ex._value(node.kwargs) if node.kwargs else {}
    unknown = set(kwargs) - _BACKWARD_KWARGS
    if unknown:
        raise GraphError(f"backward() takes retain_graph= and gradient= only, not {unknown}")
    if not isinstance(loss, torch.Tensor):
        raise GraphError(f"backward() needs a tensor, got a {type(loss).__name__}")
    targets = ex.plan.backwards.get(node.id, ())
    if ex.fake_mode is not None:  # a shape-only pass: gradients have their values' shapes
        for t in targets:
            if isinstance(ex.values[t], torch.Tensor):
                ex.backward_now = node.id
                _reached(ex, t, torch.zeros_like(ex.values[t]))
        ex.backward_now = None
        return None
    if not loss.requires_grad:
        raise GraphError(
            "the loss needs no gradient: nothing it is computed from requires one (read a "
            "module's value with a gradient inside `with loss.backward():`, or train an "
            "lt.parameter)"
        )
    inputs = [ex.watched_values[t] for t in targets if t in ex.watched]
    inputs += [p for p in ex.workspace.trainables if p.requires_grad]
    if not inputs:
        return None  # no gradient is read and nothing trains: nothing to compute
    ex.backward_now = node.id
    try:
        torch.autograd.backward(
            loss,
            kwargs.get("gradient"),
            retain_graph=kwargs.get("retain_graph"),
            inputs=inputs,
        )
    finally:
        ex.backward_now = None
        ex._schedule(ex.deferred)
        ex.deferred.clear()
    return None


def detached(values: dict[int, Any]) -> dict[int, Any]:
    """Saved values as data: tensors without the autograd graph of the run (which would keep
    its whole forward alive)."""
    return {i: tree.map(_detached, v) for i, v in values.items()}


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) and value.requires_grad else value
