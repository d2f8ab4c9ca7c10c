"""lazytensor: read and edit the insides of a PyTorch model, locally or on a shared server.

Example:
    >>> import torch, lazytensor as lt
    >>> net = lt.Model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> with net.trace(torch.ones(1, 4)):
    ...     hidden = net[0].output.save()
    >>> hidden.shape
    torch.Size([1, 4])
"""

from __future__ import annotations

from typing import Any

from . import optim
from .backends.base import JobState
from .core import tree as _tree
from .core.errors import (
    GraphError,
    LazytensorError,
    LimitExceeded,
    NodeFailure,
    OpNotAllowedError,
    ProtocolError,
    RemoteError,
    RemoteOutOfMemory,
    RemoteTimeout,
    StrictModeError,
    TraceError,
)
from .frontend.envoy import Envoy
from .frontend.model import LanguageModel, Model
from .frontend.served import Client, connect
from .tracing.proxy import Proxy
from .tracing.trace import Trace, current
from .tracing.training import lora, parameter

__version__ = "0.1.0"


def apply(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Record a call of your own Python function ``fn`` on proxies (runs where the graph runs).

    Ops outside the allow-list can be wrapped this way. Locally it just runs; a server runs it
    only if started with ``--trusted-clients``, since the function travels as code.

    Example:
        >>> with net.trace(x):                                   # doctest: +SKIP
        ...     y = lt.apply(lambda t: t.numpy().std(), net.layer1.output).save()
    """
    for value in (*args, *kwargs.values()):
        if isinstance(value, Proxy):
            return value._trace.apply_python(fn, args, kwargs)
    trace = current()
    return trace.apply_python(fn, args, kwargs) if trace is not None else fn(*args, **kwargs)


def save(value: Any) -> Any:
    """Keep ``value`` after the trace and return it: a proxy (as ``proxy.save()``), or a list,
    dict or tuple of proxies, which after the trace holds their real values.

    A container may be saved empty and filled later in the block::

        with lm.trace("Hello"):
            steps = lt.save([])
            steps.append(lm.model.layers[0].output)
        steps[0]  # a tensor
    """
    if isinstance(value, Proxy):
        return value.save()
    if isinstance(value, (list, dict, tuple)):
        proxies = [v for v in _tree.leaves(value) if isinstance(v, Proxy)]
        trace = proxies[0]._trace if proxies else current()
        if trace is None:
            raise TypeError("lazytensor.save of a container works inside a trace only")
        trace.save_container(value)
        return value
    raise TypeError(
        f"lazytensor.save takes a proxy from a trace, or a list, dict or tuple of them, "
        f"not a {type(value).__name__}"
    )


__all__ = [
    "Client",
    "Envoy",
    "GraphError",
    "JobState",
    "LanguageModel",
    "LazytensorError",
    "LimitExceeded",
    "Model",
    "NodeFailure",
    "OpNotAllowedError",
    "ProtocolError",
    "Proxy",
    "RemoteError",
    "RemoteOutOfMemory",
    "RemoteTimeout",
    "StrictModeError",
    "Trace",
    "TraceError",
    "__version__",
    "apply",
    "connect",
    "current",
    "lora",
    "optim",
    "parameter",
    "save",
]
