"""Compiled replay: a repeated trace run as one ``torch.compile``'d function with the model.

The executor interprets a graph node by node around the model's forward. For a graph that is
run again and again (the same experiment on new prompts, a sweep of constant values), that
interpretation and the model's own eager kernels dominate at small batch sizes. A
:class:`Program` instead turns the graph into plain Python code, one function per moment of the
forward (a module's hook, the run's result), and compiles the model's forward together with
those hooks with ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs, on a GPU):

* the *schedule* (which nodes run at which moment, in which order) is the one the executor
  followed on the first run of this structure (:class:`_Schedule` records it), so the code
  does exactly what the eager replay did;
* the graph's tensor constants are arguments of the compiled function, so a trace of the same
  structure with new constant values (another steering vector, other neuron values) reuses the
  compiled code; a new structure (or new input shapes) is a new program;
* what compiled replay does not cover runs eagerly, with the reason logged once: generation,
  several calls of one module, calls the trace makes (``lm.sae(h)``), gradients, sessions,
  user functions, skips, stops and materializations.

Programs are kept per model, graph structure and input signature (:data:`PROGRAMS`).
``compile=True`` compiles a structure from its second run on (its first run records the
schedule); :data:`AUTO_AFTER` compiles any structure run that many times.
"""

from __future__ import annotations

import itertools
import keyword
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..core import ops, tree
from ..core.graph import Batch, Const, Graph, Ref
from .executor import Executor
from .moments import RESULT_KEY
from .plan import POST, PRE
from .rows import Layout, narrow, replace

log = logging.getLogger("lazytensor")

#: Compile any graph structure run this many times (``None``: only with ``compile=``); from
#: ``$LAZYTENSOR_COMPILE_AFTER`` when set.
AUTO_AFTER: int | None = (
    int(os.environ["LAZYTENSOR_COMPILE_AFTER"])
    if os.environ.get("LAZYTENSOR_COMPILE_AFTER")
    else None
)

_OPS = frozenset(("input", "inputs", "output", "set_input", "set_output", "result", "function",
                  "method", "getattr"))  # fmt: skip
_PROLOGUE = ("", "prologue")
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


class _Schedule(Executor):
    """An executor that notes which nodes ran at which moment, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[Any, list[int]]] = [(_PROLOGUE, [])]

    def _fire(self, key: Any, call: int | None = None) -> None:
        self.log.append((key, []))
        super()._fire(key, call)

    def _run_node(self, i: int) -> None:
        self.log[-1][1].append(i)
        super()._run_node(i)

    def _may_end(self) -> bool:
        return False  # a compiled forward runs to its end: note every moment


class _State:
    """What the compiled function's hooks share during one call."""

    values: dict[int, Any]
    consts: list[Any]


class Program:
    """A graph structure compiled with its model; see the module docstring."""

    def __init__(
        self, model: torch.nn.Module, graph: Graph, layout: Layout, log_: list, backend: Any
    ) -> None:
        self.model, self.saved = model, list(graph.saved)
        self.state = _State()
        self.lock = threading.Lock()
        self.hooks: list[tuple[str, str, Callable]] = []
        prologue, result = _code("prologue", log_[0][1], graph, layout), None
        seen = set()
        for key, ids in log_[1:]:
            if key in seen:
                raise Unsupported(f"{key[0] or 'the model'} runs several times in one forward")
            seen.add(key)
            code = _code(f"moment_{len(seen)}", ids, graph, layout)
            if key == RESULT_KEY:
                result = code
            elif key[1] in (PRE, POST):
                self.hooks.append((key[0], key[1], _hook(code, key[1], self.state)))
            elif ids:
                raise Unsupported(f"moment {key} cannot be compiled")
        options = {"mode": "reduce-overhead"} if _on_cuda(model) and backend == "inductor" else {}
        run = _entry(model, self.state, prologue, result, self.saved)
        self.function = torch.compile(run, backend=backend, dynamic=False, **options)

    def __call__(self, graph: Graph, batch: Batch) -> dict[int, Any]:
        with self.lock, torch.no_grad():
            handles = []
            try:
                for path, kind, hook in self.hooks:
                    module = self.model.get_submodule(path)
                    if kind == PRE:
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                    else:
                        handles.append(module.register_forward_hook(hook))
                values = self.function(list(graph.constants), batch.args, batch.kwargs)
            finally:
                for handle in handles:
                    handle.remove()
        return dict(zip(self.saved, values, strict=True))


_entries = itertools.count()


def _entry(model: Any, state: _State, prologue: Callable, result: Any, saved: list) -> Callable:
    """The function compiled: set up the state, run the model, return the saved values. Each
    program gets its own code object, so ``torch.compile``'s per-code cache (and its limit on
    recompilations) holds one program each."""
    source = (
        "def run(consts, args, kwargs):\n"
        "    state.consts, state.values = consts, {}\n"
        "    prologue(state, None)\n"
        "    out = model(*args, **kwargs)\n"
        "    if result is not None:\n"
        "        result(state, out)\n"
        "    return tuple([state.values[i] for i in saved])\n"
    )
    names = {"state": state, "prologue": prologue, "result": result, "model": model,
             "saved": tuple(saved)}  # fmt: skip
    exec(compile(source, f"<lazytensor compiled run {next(_entries)}>", "exec"), names)  # noqa: S102
    return names["run"]


def _hook(code: Callable, kind: str, state: _State) -> Callable:
    if kind == PRE:

        def pre(module: Any, args: tuple, kwargs: dict) -> Any:
            return code(state, (args, kwargs))

        return pre

    def post(module: Any, args: tuple, output: Any) -> Any:
        return code(state, output)

    return post


def _on_cuda(model: torch.nn.Module) -> bool:
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cuda"


# -- code generation ---------------------------------------------------------------------------
def _code(name: str, ids: list[int], graph: Graph, layout: Layout) -> Callable:
    """A function ``(state, current) -> replacement or None`` running nodes ``ids`` in order,
    as straight-line Python (what ``torch.compile`` traces into the model's graph).

    No text of the graph becomes code: every value, name and target is bound in the
    function's namespace under a generated name, keyword names must be identifiers, and node
    ids are integers; what runs is what the executor would run (the same allow-listed ops)."""
    names: dict[str, Any] = {"NARROW": narrow, "REPLACE": replace, "LAYOUT": layout,
                             "FIRST": _first, "SET_FIRST": _set_first}  # fmt: skip
    lines = [f"def {name}(state, current):", "    v, c = state.values, state.consts"]
    lines.append("    replaced = False")
    for i in map(int, ids):
        node = graph.nodes[i]
        if node.op not in _OPS or node.call not in (0,):
            raise Unsupported(f"node {i} ({node.op} {node.target}) cannot be compiled")
        rows = _name(names, node.rows)
        args = [_expr(a, names) for a in node.args]
        if not all(k.isidentifier() and not keyword.iskeyword(k) for k in node.kwargs):
            raise Unsupported(f"node {i} has a keyword argument that is not a name")
        kwargs = [f"{k}={_expr(a, names)}" for k, a in node.kwargs.items()]
        call = ", ".join(args + kwargs)
        op = node.op
        if op in ("output", "inputs", "result"):
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


def _first(inputs: tuple) -> Any:
    args, kwargs = inputs
    return args[0] if args else next(iter(kwargs.values()))


def _set_first(inputs: tuple, new: Any, rows: Any, layout: Layout) -> tuple:
    args, kwargs = inputs
    if args:
        return (replace(args[0], new, rows, layout), *args[1:]), kwargs
    name = next(iter(kwargs))
    return args, {**kwargs, name: replace(kwargs[name], new, rows, layout)}


# -- the cache ---------------------------------------------------------------------------------
class Programs:
    """Compiled programs by model, graph structure and input signature; runs counted."""

    SIZE = 64

    def __init__(self) -> None:
        self.programs: OrderedDict[tuple, Program | None] = OrderedDict()
        self.runs: dict[tuple, int] = {}
        self.lock = threading.Lock()

    def run(
        self, model: torch.nn.Module, graph: Graph, batch: Batch, compile: Any
    ) -> dict[int, Any] | None:
        """The saved values from the compiled program, or ``None``: run it eagerly (after a
        first run of the structure, recording its schedule, or when it cannot compile)."""
        if batch.generate:
            _explain("generation runs eagerly")
            return None
        try:
            key = (id(model), graph.structure_key(), _signature(batch), _backend(compile))
        except Exception:  # an argument that has no structure key
            return None
        with self.lock:
            runs = self.runs[key] = self.runs.get(key, 0) + 1
            program = self.programs.get(key, False)
        wanted = compile or (AUTO_AFTER is not None and runs >= AUTO_AFTER)
        if program is None or not wanted:
            return None
        if program is False:
            return self._first(model, graph, batch, key, compile)
        return program(graph, batch)

    def _first(self, model, graph, batch, key, compile) -> dict[int, Any]:
        """Run eagerly, noting the schedule, and build the program for the next runs."""
        executor = _Schedule(model, graph, batch)
        values = executor.run()
        backend = _backend(compile)
        try:
            program: Program | None = Program(model, graph, executor.layout, executor.log, backend)
        except Unsupported as why:
            _explain(str(why))
            program = None
        with self.lock:
            self.programs[key] = program
            if len(self.programs) > self.SIZE:
                self.programs.popitem(last=False)
        return values


def _backend(compile: Any) -> Any:
    """The ``torch.compile`` backend ``compile=`` names (``True``: inductor)."""
    return "inductor" if compile is True or not compile else compile


def _signature(batch: Batch) -> tuple:
    """What a compiled program is specialized to: input names, shapes, dtypes, plain values."""

    def leaf(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), str(v.dtype), str(v.device))
        return repr(v)

    return tuple(leaf(v) for v in tree.leaves((batch.args, batch.kwargs))), tuple(batch.kwargs)


_explained: set[str] = set()


def _explain(why: str) -> None:
    if why not in _explained:
        _explained.add(why)
        log.info("compiled replay not used, the run is eager: %s", why)


PROGRAMS = Programs()
