"""Training as data: trainable tensors, optimizers and low-rank adapters recorded as graph ops.

::

    with lm.session(remote=True):
        vec = lt.parameter(torch.zeros(hidden))       # a ``parameter`` node
        opt = lt.optim.AdamW([vec], lr=1e-2)          # an ``optimizer`` node
        for step in range(50):
            with lm.trace(batch):
                lm.model.layers[4].output[:] += vec
                loss = ...
                with loss.backward(): pass
            opt.step(); opt.zero_grad()               # ``optimize`` nodes, in session code
        trained = vec.save()

No user code runs where the graph runs: a trainable tensor is made from a tensor the client
sends, an optimizer is one of an allow-listed few (SGD, Adam, AdamW) with numeric options,
and its steps are ops. The model's weights are never trained: an optimizer takes only
trainable tensors. A low-rank adapter (:func:`lora`) is two trainable tensors and the ops that
add ``x @ A.T @ B.T * scale`` to a linear module's output in every later trace of the session.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import TraceError
from ..core.graph import EVERY_CALL
from ..core.site import here
from . import session as sessions
from .args import to_graph
from .proxy import OpenProxy, Proxy
from .state import State, current

if TYPE_CHECKING:
    from .trace import Trace


def _recording(what: str) -> Trace:
    """Where a training op records: the trace being recorded, or the session's own code."""
    trace = current()
    if trace is not None and trace.state is State.RECORDING:
        return trace
    session = sessions.active()
    if session is not None and session.open:
        return session.recording()
    raise TraceError(f"{what} at {here()} records into a trace or a session: open one first")


def parameter(value: Any) -> Proxy:
    """A trainable tensor, initialized from ``value`` (a tensor; a copy is trained).

    Example:
        >>> with lm.session():                                  # doctest: +SKIP
        ...     vec = lt.parameter(torch.zeros(64))
    """
    return _recording("lt.parameter()").apply("parameter", "", (value,))


class Optimizer:
    """An optimizer recorded in a trace or session; ``step()`` and ``zero_grad()`` record."""

    def __init__(self, name: str, params: Any, options: dict) -> None:
        params = list(params)
        if not params or not all(isinstance(p, Proxy) for p in params):
            raise TraceError(
                f"lt.optim.{name} at {here()} takes trainable tensors made with lt.parameter()"
            )
        self.proxy = _recording(f"lt.optim.{name}").apply("optimizer", name, (params,), options)

    def step(self) -> None:
        self.proxy._trace.apply("optimize", "step", (self.proxy,))

    def zero_grad(self) -> None:
        self.proxy._trace.apply("optimize", "zero_grad", (self.proxy,))


def SGD(params: Any, lr: float = 1e-3, **options: Any) -> Optimizer:  # noqa: N802
    """``torch.optim.SGD`` on trainable tensors, as graph ops."""
    return Optimizer("SGD", params, {"lr": lr, **options})


def Adam(params: Any, lr: float = 1e-3, **options: Any) -> Optimizer:  # noqa: N802
    """``torch.optim.Adam`` on trainable tensors, as graph ops."""
    return Optimizer("Adam", params, {"lr": lr, **options})


def AdamW(params: Any, lr: float = 1e-3, **options: Any) -> Optimizer:  # noqa: N802
    """``torch.optim.AdamW`` on trainable tensors, as graph ops."""
    return Optimizer("AdamW", params, {"lr": lr, **options})


class LoRA:
    """A low-rank adapter on a linear module: ``out + (x @ A.T) @ B.T * alpha / rank``.

    ``A`` starts random (as ``nn.Linear`` initializes a weight), ``B`` at zero, so the adapted
    model starts equal to the model. Created by :func:`lora`.
    """

    def __init__(self, envoy: Any, rank: int, alpha: float | None, generator: Any) -> None:
        module = envoy._module
        features = _features(module)
        if features is None:
            raise TraceError(
                f"lt.lora at {here()}: {envoy.path!r} is not a linear module "
                "(it needs in_features and out_features)"
            )
        fan_in, fan_out = features
        a = torch.empty(rank, fan_in)  # (r, in)
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's initialization of a (r, in) weight
        a.uniform_(-bound, bound, generator=generator)
        self.path, self.scale = envoy.path, (alpha if alpha is not None else rank) / rank
        self.A = parameter(a)
        self.B = parameter(torch.zeros(fan_out, rank))  # (out, r)

    def parameters(self) -> list[Proxy]:
        return [self.A, self.B]

    def apply(self, trace: Trace) -> None:
        """Record the adapter's ops at the start of ``trace`` (every call of the module)."""
        graph, site = trace.graph, here()
        x = OpenProxy.of(trace, graph.add("input", self.path, call=EVERY_CALL, site=site).id)
        out = OpenProxy.of(trace, graph.add("output", self.path, call=EVERY_CALL, site=site).id)
        a, b = self.A, self.B
        low = trace.apply("function", "torch.matmul", (x, trace.apply("method", "t", (a,))))
        delta = trace.apply("function", "torch.matmul", (low, trace.apply("method", "t", (b,))))
        new = trace.apply("function", "operator.add", (out, delta * self.scale))
        refs: list[int] = []
        graph.add("set_output", self.path, (to_graph(new, trace, refs),), call=EVERY_CALL,
                  site=site)  # fmt: skip


def _features(module: Any) -> tuple[int, int] | None:
    fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fan_in, int) and isinstance(fan_out, int):
        return fan_in, fan_out
    return None


def lora(envoy: Any, rank: int = 8, alpha: float | None = None, *, seed: int | None = None) -> LoRA:
    """Declare a low-rank adapter on linear module ``envoy`` for the rest of the session.

    Args:
        envoy: the module, e.g. ``lm.model.layers[4].mlp.down_proj``.
        rank: the adapter's rank.
        alpha: the scale numerator (``alpha / rank``); ``rank`` by default (scale 1).
        seed: seeds ``A``'s initialization (else the global RNG).

    Returns:
        The adapter: ``.parameters()`` are ``[A, B]`` for an optimizer.
    """
    session = sessions.active()
    if session is None or not session.open:
        raise TraceError(f"lt.lora at {here()} declares an adapter for a session: open one first")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    adapter = LoRA(envoy, rank, alpha, generator)
    session.adapters.append(adapter)
    return adapter
