"""Evaluate: running one compute node on real (or fake) values, with or without a forward pass.

The compute ops of the vocabulary (``function``, ``method``, ``getattr``, ``python``) do the same
thing wherever they run: inside a replay (:class:`~lazytensor.runtime.executor.Executor` calls
these functions), during shape propagation, and when a trace computes an invoke's inputs.
Functions and methods resolve by name through :mod:`lazytensor.core.ops`; attribute reads are
limited to a value's data fields.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import ops, tree
from ..core.errors import GraphError, OpNotAllowedError, TraceError
from ..core.graph import INDEX_ATOMS, SCALARS, Const, Node, Ref
from . import bounds


def resolve(arg: Any, values: Any, constants: list, fake_mode: Any = None) -> Any:
    """A graph argument's value: refs read from ``values``, constants from ``constants``.

    An index (``(..., slice(1, None))``) is resolved without the general walk of
    :mod:`~lazytensor.core.tree`: a slice of scalars and ``...`` are their own value, a plain
    tuple is rebuilt item by item (replaying ``h[..., 1:]`` took 52k instructions, 5.5x the op
    itself, through the walk; callgrind)."""
    kind = type(arg)
    if kind is Ref:
        return values[arg.id]
    if kind in INDEX_ATOMS:
        return arg
    if kind is tuple:
        return tuple([resolve(a, values, constants, fake_mode) for a in arg])
    if kind is slice:
        if type(arg.start) in SCALARS and type(arg.stop) in SCALARS and type(arg.step) in SCALARS:
            return arg
        items = (arg.start, arg.stop, arg.step)
        return slice(*[resolve(a, values, constants, fake_mode) for a in items])
    if kind is Const:
        value = constants[arg.index]
        if fake_mode is not None and isinstance(value, torch.Tensor):
            value = fake_mode.from_tensor(value)
        return value
    if tree.is_container(arg):
        items = [resolve(a, values, constants, fake_mode) for a in tree.children(arg)]
        return tree.rebuild(arg, items)
    return arg


def evaluate(
    node: Node, values: Any, constants: list, *, fake_mode: Any = None, trusted: bool = True
) -> Any:
    """Run one compute node (``function``, ``method``, ``getattr``, ``python``) outside a forward.

    ``values`` maps node ids to values (a dict or a list); used for shape propagation and for
    computing invoke inputs recorded inside a trace.
    """
    args = tuple(resolve(a, values, constants, fake_mode) for a in node.args)
    kwargs = resolve(node.kwargs, values, constants, fake_mode) if node.kwargs else {}
    if node.op == "function":
        return call_function(node, args, kwargs)
    if node.op == "method":
        return call_method(node, args, kwargs)
    if node.op == "getattr":
        return read_attribute(node, args[0])
    if node.op == "python":
        return call_python(node, args, kwargs, trusted=trusted)
    if node.op == "parameter":  # its shape and dtype (a trainable copy is made in a run)
        return args[0].detach().clone()
    raise GraphError(f"{node.op} nodes run only inside a forward pass")


def call_function(node: Node, args: tuple, kwargs: dict) -> Any:
    ops.check_call(node.target, args, kwargs)  # bounds on Python values and window sizes
    bounds.check(node.target, args, kwargs)  # a server's --max-memory, before allocating
    value = ops.runnable_function(node.target)(*args, **kwargs)
    bounds.check_result(node.target, value)
    return value


def call_method(node: Node, args: tuple, kwargs: dict) -> Any:
    obj, *rest = args
    if not isinstance(obj, torch.Tensor):
        raise TypeError(
            f".{node.target}() was called on a {type(obj).__name__}; in a trace, methods "
            "can be called on tensors only"
        )
    bounds.check(node.target, args, kwargs)
    value = getattr(obj, ops.runnable_method(node.target))(*rest, **kwargs)
    bounds.check_result(node.target, value)
    return value


def read_attribute(node: Node, obj: Any) -> Any:
    name = ops.check_attribute(node.target)
    if not _readable(obj, name):
        raise AttributeError(
            f"{type(obj).__name__} has no attribute {name!r} that a trace may read: "
            "tensors expose shape/dtype/T-like attributes, model outputs their fields, "
            "named tuples their names"
        )
    return getattr(obj, name)


def call_python(node: Node, args: tuple, kwargs: dict, *, trusted: bool) -> Any:
    """A user's own function (``lazytensor.apply``): the callable itself, or cloudpickle
    bytes that only a trusted run unpickles."""
    if not trusted:
        raise OpNotAllowedError(
            f"user-defined Python function {node.target!r} refused: this server runs only "
            "allow-listed ops; its operator must start it with --trusted-clients"
        )
    payload, *rest = args
    if isinstance(payload, bytes):
        import cloudpickle

        payload = cloudpickle.loads(payload)  # trusted-only by the check above
    try:
        return payload(*rest, **kwargs)
    except Exception as exc:
        if not any(_is_fake(leaf) for leaf in tree.leaves((rest, kwargs))):
            raise
        raise TraceError(
            f"the shape of what your function {node.target} returns cannot be known inside the "
            f"trace: it reads tensor values, which a shape-only pass does not have "
            f"({type(exc).__name__}); save its result and read the shape after the trace"
        ) from exc


def _is_fake(value: Any) -> bool:
    # By name: importing FakeTensor imports torch._dynamo, seconds a server need not spend.
    return type(value).__name__ == "FakeTensor"


def _readable(obj: Any, name: str) -> bool:
    """The attribute reads a graph may do: data fields, never an object's internals."""
    if isinstance(obj, torch.Tensor):
        return name in ops.TENSOR_ATTRIBUTES
    if isinstance(obj, dict):  # transformers' ModelOutput, lazytensor.wire.Record
        return name in obj or name in getattr(type(obj), "__dataclass_fields__", ())
    if isinstance(obj, tuple):  # namedtuples, torch.return_types
        return name in getattr(type(obj), "__match_args__", ())
    return False
