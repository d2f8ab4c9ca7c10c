"""Code generation for compiled replay: from a schedule of nodes to straight-line Python.

:class:`Schedule` is an executor that notes which nodes ran at which moment of the forward
(and of which generation step), in order; :func:`code` turns one moment's nodes into a function
``(state, current) -> replacement or None`` that ``torch.compile`` traces into the model's
graph, doing what the eager replay did (the same allow-listed ops). No text of a graph becomes
code: values, names and targets are bound in the function's namespace under generated names,
keyword names must be identifiers, node ids are integers. :mod:`.compiled` builds a forward's
programs from these, :mod:`.generation` a generation's.
"""

from __future__ import annotations

import itertools
import keyword
from collections.abc import Callable
from typing import Any

import torch

from ..core import ops, tree
from ..core.graph import Const, Graph, Ref
from .executor import Executor
from .plan import PRE
from .rows import Layout, narrow, replace

#: The ops compiled code runs; a graph with any other runs eagerly.
OPS = frozenset(("input", "inputs", "output", "set_input", "set_output", "result", "tokens",
                  "function", "method", "getattr"))  # fmt: skip
PROLOGUE = ("", "prologue")
#: Operators written as Python syntax (what ``torch.compile`` traces best).
_SYNTAX = {
    **{f"operator.{name}": "({0} " + sign + " {1})" for name, sign in (
        ("add", "+"), ("sub", "-"), ("mul", "*"), ("truediv", "/"), ("floordiv", "//"),
        ("mod", "%"), ("pow", "**"), ("matmul", "@"), ("and_", "&"), ("or_", "|"),
        ("xor", "^"), ("lshift", "<<"), ("rshift", ">>"), ("lt", "<"), ("le", "<="),
        ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!="))},
    **{f"operator.{name}": sign + "({0})" for name, sign in (
        ("neg", "-"), ("pos", "+"), ("invert", "~"))},
    "operator.abs": "abs({0})",
    "operator.getitem": "{0}[{1}]",
    "operator.setitem": "",
}  # fmt: skip


class Unsupported(Exception):
    """Why a graph runs eagerly instead (logged)."""


class Schedule(Executor):
    """An executor that notes which nodes ran at which moment, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[Any, list[int]]] = [(PROLOGUE, [])]
        self.at: list[tuple[int, Layout]] = [(0, self.layout)]  # per moment: forward, layout

    def _fire(self, key: Any, call: int | None = None) -> None:
        self.log.append((key, []))
        self.at.append((self.forwards, self.layout))
        super()._fire(key, call)

    def _run_node(self, i: int) -> None:
        self.log[-1][1].append(i)
        super()._run_node(i)

    def _may_end(self) -> bool:
        return False  # a compiled forward runs to its end: note every moment


class State:
    """What the compiled function's hooks share during one call."""

    def __init__(self) -> None:
        self.values: dict[int, Any] = {}
        self.consts: list[Any] | dict[int, Any] = []  # a generation step's: by index
        self.codes: dict[tuple[str, str], Callable] = {}  # a generation step's: moment -> code


#: Numbers the generated entry functions' file names (each its own code object).
ENTRIES = itertools.count()


def hook(code: Callable, kind: str, state: State) -> Callable:
    """A module hook running ``code`` (a moment's function) on the hook's value."""
    if kind == PRE:

        def pre(module: Any, args: tuple, kwargs: dict) -> Any:
            return code(state, (args, kwargs))

        return pre

    def post(module: Any, args: tuple, output: Any) -> Any:
        return code(state, output)

    return post


def on_cuda(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are on a GPU (CUDA graphs: ``mode="reduce-overhead"``)."""
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cuda"


def code(
    name: str,
    ids: list[int],
    graph: Graph,
    layout: Layout,
    *,
    any_call: bool = False,
    written: dict[int, str] | None = None,
) -> Callable:
    """A function ``(state, current) -> replacement or None`` running nodes ``ids`` in order,
    as straight-line Python (what ``torch.compile`` traces into the model's graph).
    ``written`` maps the ids of assignments whose number is an input of the compiled function
    to ``"vector, k"``, the expressions of that input (:func:`_assign` writes it).

    No text of the graph becomes code: every value, name and target is bound in the
    function's namespace under a generated name, keyword names must be identifiers, and node
    ids are integers; what runs is what the executor would run (the same allow-listed ops)."""
    names: dict[str, Any] = {"NARROW": narrow, "REPLACE": replace, "LAYOUT": layout,
                             "FIRST": _first, "SET_FIRST": _set_first,
                             "ASSIGN": _assign}  # fmt: skip
    lines = [f"def {name}(state, current):", "    v, c = state.values, state.consts"]
    lines.append("    replaced = False")
    for i in map(int, ids):
        node = graph.nodes[i]
        if node.op not in OPS or not (any_call or node.call == 0):
            raise Unsupported(f"node {i} ({node.op} {node.target}) cannot be compiled")
        rows = _name(names, node.rows)
        args = [_expr(a, names) for a in node.args]
        if not all(k.isidentifier() and not keyword.iskeyword(k) for k in node.kwargs):
            raise Unsupported(f"node {i} has a keyword argument that is not a name")
        kwargs = [f"{k}={_expr(a, names)}" for k, a in node.kwargs.items()]
        call = ", ".join(args + kwargs)
        op = node.op
        if op in ("output", "inputs", "result", "tokens"):
            lines.append(f"    v[{i}] = NARROW(current, {rows}, LAYOUT)")
        elif op == "input":
            lines.append(f"    v[{i}] = NARROW(FIRST(current), {rows}, LAYOUT)")
        elif op == "set_output":
            lines.append(f"    current = REPLACE(current, {args[0]}, {rows}, LAYOUT)")
            lines.append("    replaced = True")
        elif op == "set_input":
            lines.append(f"    current = SET_FIRST(current, {args[0]}, {rows}, LAYOUT)")
            lines.append("    replaced = True")
        elif op == "function" and node.target in _SYNTAX and not kwargs:
            lines.append(f"    v[{i}] = " + _SYNTAX[node.target].format(*args))
            if node.target == "operator.setitem":
                if written and i in written:  # the number is an input of the function
                    lines[-1] = f"    ASSIGN({args[0]}, {args[1]}, {written[i]}); v[{i}] = None"
                else:
                    lines[-1] = f"    {args[0]}[{args[1]}] = {args[2]}; v[{i}] = None"
        elif op == "function":
            lines.append(f"    v[{i}] = {_name(names, ops.runnable_function(node.target))}({call})")
        elif op == "method":
            method = getattr(torch.Tensor, ops.runnable_method(node.target))
            lines.append(f"    v[{i}] = {_name(names, method)}({call})")
        else:  # getattr
            lines.append(f"    v[{i}] = getattr({args[0]}, {_name(names, node.target)})")
    lines.append("    return current if replaced else None")
    exec(compile("\n".join(lines), f"<lazytensor compiled {name}>", "exec"), names)  # noqa: S102
    return names[name]


def _name(names: dict[str, Any], value: Any) -> str:
    """A name in the generated code's namespace that holds ``value``."""
    key = f"K{len(names)}"
    names[key] = value
    return key


def _expr(value: Any, names: dict[str, Any]) -> str:
    """Python source for a graph argument: node values from ``v``, constants from ``c``."""
    kind = type(value)
    if kind is Ref:
        return f"v[{int(value.id)}]"  # integers only ever reach the source text
    if kind is Const:
        return f"c[{int(value.index)}]"
    if kind is tuple:
        return "(" + "".join(_expr(v, names) + ", " for v in value) + ")"
    if kind is list:
        return "[" + ", ".join(_expr(v, names) for v in value) + "]"
    if kind is dict:  # keys become names in the namespace too: no text from a graph is code
        return (
            "{" + ", ".join(f"{_name(names, k)}: {_expr(v, names)}" for k, v in value.items()) + "}"
        )
    if kind is slice:
        parts = (value.start, value.stop, value.step)
        return "slice(" + ", ".join(_expr(v, names) for v in parts) + ")"
    if tree.is_container(value):
        raise Unsupported(f"an argument of type {kind.__name__} cannot be compiled")
    return _name(names, value)


def _assign(target: Any, index: Any, numbers: torch.Tensor, k: int) -> None:
    """``target[index] = number`` for the ``k``-th of a program's assigned numbers (a float64
    vector): into a tensor in its dtype, as the Python number would be; into anything else as
    the Python number itself."""
    if isinstance(target, torch.Tensor):
        target[index] = numbers[k].to(target.dtype)
    else:
        target[index] = numbers[k].item()


def _first(inputs: tuple) -> Any:
    args, kwargs = inputs
    return args[0] if args else next(iter(kwargs.values()))


def _set_first(inputs: tuple, new: Any, rows: Any, layout: Layout) -> tuple:
    args, kwargs = inputs
    if args:
        return (replace(args[0], new, rows, layout), *args[1:]), kwargs
    name = next(iter(kwargs))
    return args, {**kwargs, name: replace(kwargs[name], new, rows, layout)}
