"""Compiled generation: a generation whose forward passes run compiled, one function per kind
of step (see :class:`Generation`); :mod:`.compiled` keeps it with its other programs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..core.graph import Batch, Const, Graph, Ref
from . import calls, codegen
from .device import device_of, moved
from .hooks import submodule
from .moments import RESULT_KEY, TOKENS_KEY, describe
from .outcome import IF_CALLED
from .plan import POST, PRE, Plan


class Past(Exception):
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
                self.codes[key] = codegen.code(
                    f"step_{number}_{n}", ids, graph, layout, any_call=True
                )
        self.function: Callable | None = None
        self.eager: Callable | None = None  # the same function uncompiled: a CUDA-graph prompt


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
    step's moments as hooks. The first run (:class:`.codegen.Schedule`) showed which nodes each step
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

    def __init__(
        self, model: torch.nn.Module, graph: Graph, ex: codegen.Schedule, backend: Any
    ) -> None:
        if not getattr(model, "_can_compile_fullgraph", False):
            raise codegen.Unsupported(
                f"{type(model).__name__} has no static KV cache to compile with"
            )
        self.model, self.graph, self.plan = model, graph, Plan.of(graph)
        self.state = codegen.State()
        self.forward = model.forward
        while hasattr(self.forward, "_lazytensor_step"):  # another generation's, just now
            self.forward = self.forward.__wrapped__
        self.prologue = codegen.code("prologue", ex.log[0][1], graph, ex.layout, any_call=True)
        self.result: tuple[Callable, list[int]] | None = None
        steps: list[list[tuple]] = [[] for _ in range(ex.forwards)]  # per step, its moments
        for (key, ids), (forward, layout) in zip(ex.log[1:], ex.at[1:]):
            if key == RESULT_KEY:
                self.result = (codegen.code("result", ids, graph, layout, any_call=True), ids)
            elif key != TOKENS_KEY and key[1] not in (PRE, POST):
                raise codegen.Unsupported(f"the moment {key} of a generation cannot be compiled")
            elif any(m[0] == key for m in steps[forward - 1]):
                raise codegen.Unsupported(
                    f"{key[0] or 'the model'} runs several times in one forward"
                )
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
                    code = codegen.code(f"tokens_{number}", ids, self.graph, layout, any_call=True)
                    tokens = (code, list(ids))
            self.steps.append(_Step(kind, wiring, tokens))
        if len(firsts) > self.MAX_KINDS:
            raise codegen.Unsupported(
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
        cuda = codegen.on_cuda(self.model) and backend == "inductor"
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
            kind.eager = function
        keys = sorted({k for kind in self.kinds for k in kind.codes if k[0]})
        self.hooks = [(path, kind, _dispatch((path, kind), self.state)) for path, kind in keys]

    def __call__(self, graph: Graph, batch: Batch) -> dict[int, Any]:
        consts = list(graph.constants)
        if self.clone:  # on the model's GPU: a CPU tensor would keep a step off CUDA graphs
            consts = moved(consts, device_of(self.model))
        run = _Run(consts, {i: [] for i in self.collected})
        streams = TOKENS_KEY in self.plan.points  # as the executor: a stopping criterion
        with self.LOCK, torch.no_grad():
            try:
                self._eager(run, self.prologue, [], None)
                step, on_step = self._step(run), self._on_step(run) if streams else None
                out = self._generate(batch, step, on_step)
                if self.result is not None:
                    self._eager(run, *self.result, out)
            finally:  # hold nothing between runs
                self.state.values, self.state.consts, self.state.codes = {}, [], {}
        return self._saved(run)

    def _step(self, run: _Run) -> Callable:
        """The model's forward during the call: the compiled function of the step's kind."""

        @functools.wraps(self.forward)  # generate reads the forward's signature
        def forward(*args: Any, **kwargs: Any) -> Any:
            step = self._step_at(run.steps)
            run.steps += 1
            carried = tuple([run.latest[i] for i in step.carried])
            consts = tuple([run.consts[i] for i in step.consts])
            kind = self.kinds[step.kind]
            # With CUDA graphs the prompt step runs uncompiled, as transformers' own compiled
            # generation does: the static KV cache allocates its tensors on the first forward,
            # and inside a CUDA graph they would be the graph's memory, overwritten by the next
            # replay. Each later step is a new replay; the last one's values are copied out.
            if self.clone and run.steps == 1:
                out, values = kind.eager(consts, carried, args, kwargs)
            else:
                if self.clone:
                    torch.compiler.cudagraph_mark_step_begin()
                out, values = kind.function(consts, carried, args, kwargs)
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
        raise Past(f"a generation ran past step {len(self.steps) - 1}, its first run's last")

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
                module = submodule(model, path)
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
        raise codegen.Unsupported(f"node {i} never ran, and no moment it waits for is missing")


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
    state: codegen.State, codes: dict, wiring: tuple, forward: Callable, enter: Any, leave: Any
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
    exec(compile(source, f"<lazytensor compiled step {next(codegen.ENTRIES)}>", "exec"), names)  # noqa: S102
    return names["step"]


def _dispatch(key: tuple[str, str], state: codegen.State) -> Callable:
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
