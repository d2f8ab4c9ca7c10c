"""Recorder: the torch-function mode that is active while a trace block runs.

Torch calls on proxies reach :meth:`Proxy.__torch_function__`; this mode also catches tensor
*factories* with no proxy among their arguments (``torch.zeros(3)`` inside a block), so they
run where the graph runs. It is entered in ``Trace.__enter__`` and left in ``__exit__``: importing
lazytensor patches nothing. :func:`record_torch` maps a torch callable to the node it records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

from ..core import ops
from ..core.site import here
from .args import has_proxy, to_graph
from .proxy import PROXIES, OpenProxy, Proxy
from .state import current

if TYPE_CHECKING:
    from .trace import Trace


class Recorder(TorchFunctionMode):
    """Routes torch calls on proxies, and factory calls, to ``trace`` while not paused."""

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        trace = self.trace
        if not self.paused and current() is trace:  # not an enclosing trace's run
            if (args and type(args[0]) in PROXIES) or has_proxy(args) or has_proxy(kwargs.values()):
                return record_torch(trace, func, args, kwargs)
            if ops.factory_name(func) is not None:
                return record_torch(trace, func, args, kwargs)
        return func(*args, **kwargs)


def record_torch(trace: Trace, func: Any, args: tuple, kwargs: dict) -> Any:
    """Record a call that reached ``__torch_function__``: as its operator, method or function."""
    known = _RECORDED_AS.get(func)
    if known is None:
        known = _RECORDED_AS[func] = _recorded_as(func)
    op, target, reflected = known
    # the user's line: record_torch <- Recorder.__torch_function__ (or apply_torch) <- user
    return trace.apply(op, target, args[::-1] if reflected else args, kwargs, depth=3)


#: Torch callable -> what :func:`record_torch` records it as (worked out once per callable).
_RECORDED_AS: dict[Any, tuple[str, str, bool]] = {}


def _recorded_as(func: Any) -> tuple[str, str, bool]:
    """``(op, target, reflected)``: ``reflected`` for ``Tensor.__rsub__`` and its kin, whose
    arguments are recorded in the operator's order. Raises for a function not allowed."""
    name = getattr(func, "__name__", "")
    on_tensor = getattr(torch.Tensor, name, None) is func
    if on_tensor and name in ops.DUNDERS:
        return ("function", ops.DUNDERS[name], False)
    if on_tensor and name in ops.REFLECTED:
        return ("function", ops.REFLECTED[name], True)
    if on_tensor and name in ops.INPLACE:
        return ("method", ops.INPLACE[name], False)
    if on_tensor and ops.is_method(name):
        return ("method", name, False)
    return ("function", ops.function_name(func), False)


def record_python(trace: Trace, fn: Any, args: tuple, kwargs: dict) -> Proxy:
    """Record a call of the user's own function: the function itself stays in the graph, so a
    local run calls it (its side effects and closure are the user's own); only a remote run
    ships it, as cloudpickle bytes (see :func:`lazytensor.protocol.messages.encode_graph`)."""
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    refs: list[int] = []
    graph_args = (fn, *to_graph(args, trace, refs))
    graph_kwargs = to_graph(kwargs, trace, refs) if kwargs else {}
    node = trace.graph.add("python", name, graph_args, graph_kwargs, site=here())
    node._deps = tuple(sorted(set(refs)))
    return OpenProxy.of(trace, node.id)
