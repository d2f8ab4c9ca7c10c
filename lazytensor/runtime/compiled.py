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
* a generation (:class:`Generation`) compiles one function per kind of step (the prompt
  step, the decoding steps, a step with interventions of its own), steps of one kind passing
  it their own nodes' values and constants, and lets the model's ``generate`` drive the loop,
  with a static KV cache so that decoding steps share one graph;
* what compiled replay does not cover runs eagerly, with the reason logged once: several
  calls of one module, calls the trace makes (``lm.sae(h)``), gradients, sessions, user
  functions, skips, stops and materializations.

Programs are kept per model, graph structure and input signature (:data:`PROGRAMS`).
``compile=True`` compiles a structure from its second run on (its first run records the
schedule); :data:`AUTO_AFTER` compiles any structure run that many times.
"""

from __future__ import annotations

import functools
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
from . import calls
from .executor import Executor
from .moments import RESULT_KEY, TOKENS_KEY, describe
from .outcome import IF_CALLED
from .plan import POST, PRE, Plan
from .rows import Layout, narrow, replace

log = logging.getLogger("lazytensor")

#: Compile any graph structure run this many times (``None``: only with ``compile=``); from
#: ``$LAZYTENSOR_COMPILE_AFTER`` when set.
AUTO_AFTER: int | None = (
    int(os.environ["LAZYTENSOR_COMPILE_AFTER"])
    if os.environ.get("LAZYTENSOR_COMPILE_AFTER")
    else None
)

_OPS = frozenset(("input", "inputs", "output", "set_input", "set_output", "result", "tokens",
                  "function", "method", "getattr"))  # fmt: skip
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


class _State:
    """What the compiled function's hooks share during one call."""

    values: dict[int, Any]
    consts: list[Any] | dict[int, Any]  # a generation step's: by index
    codes: dict[tuple[str, str], Callable]  # a generation step's: moment -> its code


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


# -- generation --------------------------------------------------------------------------------
class _Past(Exception):
    """A generation ran past the steps whose code its first run showed."""


class _Step:
    """A generation step as the first run ran it: its kind, and the nodes and constants its
    kind's code is run with, in that code's order (steps of one kind differ only in these)."""

    def __init__(self, kind: int, wiring: tuple, tokens: tuple[Callable, list[int]] | None):
        self.kind, (self.made, self.carried, self.consts) = kind, wiring
        self.tokens = tokens  # the code that reads its streamed tokens, run eagerly
        self.produced: tuple[int, ...] = ()  # of ``made``, what later code and the user read
        self.ran = [*self.made, *(tokens[1] if tokens else ())]


class _Kind:
    """One kind of generation step: its moments' code (made from its first step's nodes), and
    the compiled function running the forward with it."""

    def __init__(self, number: int, moments: list, graph: Graph) -> None:
        self.codes: dict[tuple[str, str], Callable] = {}
        for n, (key, ids, layout) in enumerate(moments):
            if ids:
                self.codes[key] = _code(f"step_{number}_{n}", ids, graph, layout, any_call=True)
        self.function: Callable | None = None


def _wiring(moments: list, graph: Graph) -> tuple[tuple, tuple]:
    """What makes two steps one kind: their moments with node ids and constants numbered in
    order of use (values, names and shapes as they are); and the step's own ids and constants
    in that order: ``(made, carried, consts)``."""
    made: dict[int, int] = {}
    carried: dict[int, int] = {}
    consts: dict[int, int] = {}

    def local(value: Any) -> Any:
        kind = type(value)
        if kind is Ref:
            i = int(value.id)
            return ("v", made[i]) if i in made else ("in", carried.setdefault(i, len(carried)))
        if kind is Const:
            t = graph.constants[value.index]
            where = consts.setdefault(int(value.index), len(consts))
            return ("c", where, tuple(getattr(t, "shape", ())), str(getattr(t, "dtype", "")))
        if kind in (tuple, list):
            return (kind.__name__, *map(local, value))
        if kind is dict:
            return ("dict", *((k, local(v)) for k, v in value.items()))
        if kind is slice:
            return ("slice", local(value.start), local(value.stop), local(value.step))
        return (kind.__name__, repr(value))  # 1, 1.0 and True stay apart

    shape = []
    for key, ids, layout in moments:
        nodes = []
        for i in ids:
            node = graph.nodes[i]
            nodes.append((node.op, node.target, local(node.args), local(node.kwargs), node.rows))
            made[i] = len(made)
        shape.append((key, layout, tuple(nodes)))
    return tuple(shape), (tuple(made), tuple(carried), tuple(consts))


class Generation:
    """A generation whose forward passes run compiled: one function per kind of step.

    The model's own ``generate`` drives the loop (sampling, stopping, beams); for the call, the
    model's ``forward`` runs the compiled function of the step's kind: the forward with that
    step's moments as hooks. The first run (:class:`_Schedule`) showed which nodes each step
    runs; steps whose moments run the same code with rows laid out alike are one kind (every
    decoding step under ``tracer.all()`` or ``for step in tracer.iter[0:8]``), whichever
    nodes and constants the code reads and writes (:func:`_wiring`), and with a static KV cache
    their shapes are equal, so they share one compiled graph. A value one step computes and a
    later one reads (a vector read at the prompt, steering every step) leaves one compiled
    call as an output and enters the next as an input; per-step values are collected as the
    executor collects them.
    """

    #: More kinds of step than this (steps that each run other code): eager, each kind being
    #: one more compilation.
    MAX_KINDS = 4
    #: Held while a model's forward is a step function: one compiled generation at a time.
    LOCK = threading.Lock()

    def __init__(self, model: torch.nn.Module, graph: Graph, ex: _Schedule, backend: Any) -> None:
        if not getattr(model, "_can_compile_fullgraph", False):
            raise Unsupported(f"{type(model).__name__} has no static KV cache to compile with")
        self.model, self.graph, self.plan = model, graph, Plan.of(graph)
        self.state = _State()
        self.forward = model.forward
        while hasattr(self.forward, "_lazytensor_step"):  # another generation's, just now
            self.forward = self.forward.__wrapped__
        self.prologue = _code("prologue", ex.log[0][1], graph, ex.layout, any_call=True)
        self.result: tuple[Callable, list[int]] | None = None
        steps: list[list[tuple]] = [[] for _ in range(ex.forwards)]  # per step, its moments
        for (key, ids), (forward, layout) in zip(ex.log[1:], ex.at[1:]):
            if key == RESULT_KEY:
                self.result = (_code("result", ids, graph, layout, any_call=True), ids)
            elif key != TOKENS_KEY and key[1] not in (PRE, POST):
                raise Unsupported(f"the moment {key} of a generation cannot be compiled")
            elif any(m[0] == key for m in steps[forward - 1]):
                raise Unsupported(f"{key[0] or 'the model'} runs several times in one forward")
            else:
                steps[forward - 1].append((key, tuple(ids), layout))
        self._group(steps)
        self.open = self._open(len(steps))
        self._link(backend)
        self.collected = calls.per_call(graph, self.plan.repeating, graph.saved)

    def _group(self, steps: list[list[tuple]]) -> None:
        """Steps by kind (:func:`_wiring`); the code of each kind, from its first step."""
        shapes: dict[tuple, int] = {}
        firsts: list[list] = []  # per kind, the hooked moments of its first step
        self.steps: list[_Step] = []
        for number, moments in enumerate(steps):
            hooked = [m for m in moments if m[0] != TOKENS_KEY]
            shape, wiring = _wiring(hooked, self.graph)
            kind = shapes.setdefault(shape, len(shapes))
            if kind == len(firsts):
                firsts.append(hooked)
            tokens = None
            for key, ids, layout in moments:
                if key == TOKENS_KEY and ids:
                    code = _code(f"tokens_{number}", ids, self.graph, layout, any_call=True)
                    tokens = (code, list(ids))
            self.steps.append(_Step(kind, wiring, tokens))
        if len(firsts) > self.MAX_KINDS:
            raise Unsupported(
                f"{len(firsts)} kinds of generation step, more than {self.MAX_KINDS} (steps "
                "that each run other code)"
            )
        self.kinds = [_Kind(n, moments, self.graph) for n, moments in enumerate(firsts)]

    def _open(self, steps: int) -> bool:
        """Whether steps after the first run's last run its last step's code: they match the
        same point nodes (with a prompt step before them)."""
        nodes = self.graph.nodes
        points = [i for i, key in self.plan.key_of.items() if key[1] in (PRE, POST)]
        bounds = [abs(b) for i in points for b in _bounds(nodes[i].call)]
        horizon = steps + max(bounds, default=0) + 2

        def matching(step: int) -> frozenset[int]:
            return frozenset(i for i in points if calls.matches(nodes[i].call, step))

        last = matching(steps - 1)
        return steps >= 2 and all(matching(s) == last for s in range(steps, horizon))

    def _link(self, backend: Any) -> None:
        """What each kind hands on (what later kinds, the result and the user read), and its
        compiled function."""
        read = {d for step in self.steps for d in step.carried} | set(self.graph.saved)
        eager = [step.tokens[1] for step in self.steps if step.tokens]
        for ids in [*eager, *([self.result[1]] if self.result else [])]:
            read.update(d for i in ids for d in self.plan.deps[i])
        cuda = _on_cuda(self.model) and backend == "inductor"
        self.clone = cuda  # CUDA graphs reuse their outputs' memory at the next replay
        options = {"mode": "reduce-overhead"} if cuda else {}
        for n, kind in enumerate(self.kinds):
            members = [step for step in self.steps if step.kind == n]
            first = members[0]
            positions = [
                p for p in range(len(first.made)) if any(s.made[p] in read for s in members)
            ]
            for step in members:
                step.produced = tuple(step.made[p] for p in positions)
            codes = {k: c for k, c in kind.codes.items() if k[0]}
            enter, leave = kind.codes.get(("", PRE)), kind.codes.get(("", POST))
            wiring = (first.carried, first.consts, first.produced)
            function = _step_entry(self.state, codes, wiring, self.forward, enter, leave)
            kind.function = torch.compile(function, backend=backend, dynamic=False, **options)
        keys = sorted({k for kind in self.kinds for k in kind.codes if k[0]})
        self.hooks = [(path, kind, _dispatch((path, kind), self.state)) for path, kind in keys]

    def __call__(self, graph: Graph, batch: Batch) -> dict[int, Any]:
        run = _Run(list(graph.constants), {i: [] for i in self.collected})
        streams = TOKENS_KEY in self.plan.points  # as the executor: a stopping criterion
        with self.LOCK, torch.no_grad():
            self._eager(run, self.prologue, [], None)
            out = self._generate(batch, self._step(run), self._on_step(run) if streams else None)
            if self.result is not None:
                self._eager(run, *self.result, out)
        return self._saved(run)

    def _step(self, run: _Run) -> Callable:
        """The model's forward during the call: the compiled function of the step's kind."""

        @functools.wraps(self.forward)  # generate reads the forward's signature
        def forward(*args: Any, **kwargs: Any) -> Any:
            step = self._step_at(run.steps)
            run.steps += 1
            carried = tuple([run.latest[i] for i in step.carried])
            consts = tuple([run.consts[i] for i in step.consts])
            out, values = self.kinds[step.kind].function(consts, carried, args, kwargs)
            if self.clone:
                values = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
            run.keep(step.produced, values)
            return out

        forward._lazytensor_step = True  # type: ignore[attr-defined]
        return forward

    def _on_step(self, run: _Run) -> Callable:
        """A stopping criterion (never stopping) that hands each step's tokens to its code."""

        def on_step(input_ids: torch.Tensor, *_: Any, **__: Any) -> bool:
            tokens = self._step_at(run.steps - 1).tokens
            if tokens is not None:
                ids = input_ids[:, -1].clone(memory_format=torch.contiguous_format)  # (B*k,)
                self._eager(run, *tokens, ids)
            return False

        return on_step

    def _eager(self, run: _Run, code: Callable, ids: list[int], current: Any) -> None:
        """Run a moment's code as it is, outside the compiled steps, on the run's values."""
        self.state.consts, self.state.values = run.consts, run.latest
        code(self.state, current)
        run.keep(ids, [run.latest[i] for i in ids])

    def _step_at(self, step: int) -> _Step:
        if step < len(self.steps):
            return self.steps[step]
        if self.open:
            return self.steps[-1]
        raise _Past(f"a generation ran past step {len(self.steps) - 1}, its first run's last")

    def _generate(self, batch: Batch, forward: Callable, on_step: Callable | None) -> Any:
        """``generate`` with the step hooks on and ``forward`` as the model's forward."""
        kwargs = dict(batch.kwargs)
        if on_step is not None:
            kwargs["stopping_criteria"] = [*(kwargs.get("stopping_criteria") or ()), on_step]
        if "cache_implementation" not in kwargs and "past_key_values" not in kwargs:
            kwargs["cache_implementation"] = "static"  # every decoding step: the same shapes
        kwargs["disable_compile"] = True  # Hugging Face's own: we compile the steps
        model, own = self.model, vars(self.model).get("forward")
        handles = []
        try:
            for path, kind, hook in self.hooks:
                module = model.get_submodule(path)
                if kind == PRE:
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(hook))
            vars(model)["forward"] = forward
            return model.generate(*batch.args, **kwargs)
        finally:
            if own is None:
                vars(model).pop("forward", None)
            else:
                vars(model)["forward"] = own
            for handle in handles:
                handle.remove()

    def _saved(self, run: _Run) -> dict[int, Any]:
        """The saved values, as :func:`.outcome.saved` gives them."""
        values = {}
        for i in self.graph.saved:
            if i in run.collected:
                values[i] = run.collected[i]
            elif i in run.latest:
                values[i] = run.latest[i]
            elif self.graph.nodes[i].kwargs.get(IF_CALLED) is not True:
                values[i] = self._not_run(i, run.steps)
        return values

    def _not_run(self, i: int, ran: int) -> calls.NotRun:
        """What a saved node that never ran (generation stopped early) returns."""
        done = set(self.plan.roots)
        for step in range(ran):
            done.update(self._step_at(step).ran)
        todo, seen = [i], set()
        while todo:
            j = todo.pop()
            if j in self.plan.key_of and j not in done:
                node = self.graph.nodes[j]
                return calls.NotRun(node.call, ran, describe(node))
            seen.add(j)
            todo.extend(d for d in self.plan.deps[j] if d not in done and d not in seen)
        raise Unsupported(f"node {i} never ran, and no moment it waits for is missing")


class _Run:
    """One compiled generation's values: each node's latest, per-step lists, steps begun."""

    def __init__(self, consts: list, collected: dict[int, list]) -> None:
        self.consts, self.collected = consts, collected
        self.latest: dict[int, Any] = {}
        self.steps = 0

    def keep(self, ids: Any, values: Any) -> None:
        for i, value in zip(ids, values):
            self.latest[i] = value
            if i in self.collected:
                self.collected[i].append(value)


def _bounds(call: Any) -> tuple[int, ...]:
    if type(call) is tuple:
        return tuple(b for b in call if b is not None)
    return (call,)


def _step_entry(
    state: _State, codes: dict, wiring: tuple, forward: Callable, enter: Any, leave: Any
) -> Callable:
    """The function compiled for a kind of step: the forward with the step's moments, taking
    the constants and the values of earlier steps its code reads (in the order of ``wiring``,
    its first step's ``carried, consts, produced``) and returning what later code reads."""
    source = (
        "def step(consts, carried, args, kwargs):\n"
        "    state.consts, state.codes = dict(zip(const_ids, consts)), codes\n"
        "    state.values = dict(zip(carried_ids, carried))\n"
        "    if enter is not None:\n"
        "        new = enter(state, (args, kwargs))\n"
        "        if new is not None:\n"
        "            args, kwargs = new\n"
        "    out = forward(*args, **kwargs)\n"
        "    if leave is not None:\n"
        "        new = leave(state, out)\n"
        "        if new is not None:\n"
        "            out = new\n"
        "    return out, tuple([state.values[i] for i in produced])\n"
    )
    names = {"state": state, "codes": codes, "forward": forward, "enter": enter, "leave": leave}
    names["carried_ids"], names["const_ids"], names["produced"] = wiring
    exec(compile(source, f"<lazytensor compiled step {next(_entries)}>", "exec"), names)  # noqa: S102
    return names["step"]


def _dispatch(key: tuple[str, str], state: _State) -> Callable:
    """A hook that runs the current step's code for ``key``, if it has any."""
    if key[1] == PRE:

        def pre(module: Any, args: tuple, kwargs: dict) -> Any:
            code = state.codes.get(key)
            return None if code is None else code(state, (args, kwargs))

        return pre

    def post(module: Any, args: tuple, output: Any) -> Any:
        code = state.codes.get(key)
        return None if code is None else code(state, output)

    return post


# -- code generation ---------------------------------------------------------------------------
def _code(
    name: str, ids: list[int], graph: Graph, layout: Layout, *, any_call: bool = False
) -> Callable:
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
        if node.op not in _OPS or not (any_call or node.call == 0):
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
        self.programs: OrderedDict[tuple, Program | Generation | None] = OrderedDict()
        self.runs: dict[tuple, int] = {}
        self.lock = threading.Lock()

    def run(
        self, model: torch.nn.Module, graph: Graph, batch: Batch, compile: Any
    ) -> dict[int, Any] | None:
        """The saved values from the compiled program, or ``None``: run it eagerly (after a
        first run of the structure, recording its schedule, or when it cannot compile)."""
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
        try:
            return program(graph, batch)
        except _Past as why:
            _explain(str(why))
        except torch._dynamo.exc.TorchDynamoException as why:  # it could not compile
            _explain(f"torch.compile failed ({type(why).__name__}); runs of it are eager")
            with self.lock:
                self.programs[key] = None
        return None

    def _first(self, model, graph, batch, key, compile) -> dict[int, Any]:
        """Run eagerly, noting the schedule, and build the program for the next runs."""
        executor = _Schedule(model, graph, batch)
        values = executor.run()
        backend = _backend(compile)
        try:
            program: Program | Generation | None = (
                Generation(model, graph, executor, backend)
                if batch.generate
                else Program(model, graph, executor.layout, executor.log, backend)
            )
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
