"""Compiled replay: a repeated trace run as one ``torch.compile``'d function with the model.

The executor interprets a graph node by node around the model's forward. For a graph that is
run again and again (the same experiment on new prompts, a sweep of constant values), that
interpretation and the model's own eager kernels dominate at small batch sizes. A
:class:`Program` instead turns the graph into plain Python code, one function per moment of the
forward (a module's hook, the run's result), and compiles the model's forward together with
those hooks with ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs, on a GPU):

* the *schedule* (which nodes run at which moment, in which order) is the one the executor
  followed on the first run of this structure (:class:`.codegen.Schedule` records it), so the code
  does exactly what the eager replay did;
* the graph's tensor constants are arguments of the compiled function, so a trace of the same
  structure with new constant values (another steering vector, other neuron values) reuses the
  compiled code; a new structure (or new input shapes) is a new program;
* a generation (:class:`.generation.Generation`) compiles one function per kind of step (the prompt
  step, the decoding steps, a step with interventions of its own), steps of one kind passing
  it their own nodes' values and constants, and lets the model's ``generate`` drive the loop,
  with a static KV cache so that decoding steps share one graph;
* what compiled replay does not cover runs eagerly, with the reason logged once: several
  calls of one module, calls the trace makes (``lm.sae(h)``), gradients, sessions, user
  functions, skips, stops and materializations.

Programs are kept per model, graph structure and input signature (:data:`PROGRAMS`).
``compile=True`` compiles a structure from its second run on (its first run records the
schedule); :data:`AUTO_AFTER` compiles any structure run that many times.

The code itself comes from :mod:`.codegen`; a generation's programs from :mod:`.generation`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..core import tree
from ..core.graph import Batch, Graph, _freeze
from . import codegen
from .codegen import Unsupported
from .device import device_of, moved
from .generation import Generation, Past
from .hooks import submodule
from .moments import RESULT_KEY
from .plan import POST, PRE
from .rows import Layout

log = logging.getLogger("lazytensor")

#: Compile any graph structure run this many times (``None``: only with ``compile=``); from
#: ``$LAZYTENSOR_COMPILE_AFTER`` when set.
AUTO_AFTER: int | None = (
    int(os.environ["LAZYTENSOR_COMPILE_AFTER"])
    if os.environ.get("LAZYTENSOR_COMPILE_AFTER")
    else None
)


class Program:
    """A graph structure compiled with its model; see the module docstring."""

    def __init__(
        self, model: torch.nn.Module, graph: Graph, layout: Layout, log_: list, backend: Any
    ) -> None:
        self.model, self.saved = model, list(graph.saved)
        self.state = codegen.State()
        self.lock = threading.Lock()
        self.hooks: list[tuple[str, str, Callable]] = []
        # Numbers assigned into tensors (``x[:, -1, ids] = 5.0``) are inputs, like the tensor
        # constants: one vector after them, so a sweep of values reuses the compiled code.
        self.floats = written_floats(graph)
        written = {i: f"c[{len(graph.constants)}], {k}" for k, i in enumerate(self.floats)}
        prologue = codegen.code("prologue", log_[0][1], graph, layout, written=written)
        result, seen = None, set()
        for key, ids in log_[1:]:
            if key in seen:
                raise Unsupported(f"{key[0] or 'the model'} runs several times in one forward")
            seen.add(key)
            code = codegen.code(f"moment_{len(seen)}", ids, graph, layout, written=written)
            if key == RESULT_KEY:
                result = code
            elif key[1] in (PRE, POST):
                self.hooks.append((key[0], key[1], codegen.hook(code, key[1], self.state)))
            elif ids:
                raise Unsupported(f"moment {key} cannot be compiled")
        # CUDA graphs replay into the same output memory each time: the values a run returns
        # are copied out before the next run can overwrite them.
        cuda = codegen.on_cuda(model)
        self.graphs = cuda and backend == "inductor"
        self.device = device_of(model) if cuda else None
        options = {"mode": "reduce-overhead"} if self.graphs else {}
        run = _entry(model, self.state, prologue, result, self.saved)
        self.function = torch.compile(run, backend=backend, dynamic=False, **options)

    def __call__(self, graph: Graph, batch: Batch) -> dict[int, Any]:
        with self.lock, torch.no_grad():
            handles = []
            try:
                for path, kind, hook in self.hooks:
                    module = submodule(self.model, path)
                    if kind == PRE:
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                    else:
                        handles.append(module.register_forward_hook(hook))
                if self.graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                values = self.function(self._inputs(graph), batch.args, batch.kwargs)
                if self.graphs:
                    values = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
            finally:
                for handle in handles:
                    handle.remove()
                self.state.values, self.state.consts = {}, []  # hold nothing between runs
        return dict(zip(self.saved, values, strict=True))

    def _inputs(self, graph: Graph) -> list[Any]:
        """The compiled function's constants: the graph's, then the assigned numbers, on the
        model's GPU when it has one (a CPU tensor would keep the function off CUDA graphs)."""
        consts = list(graph.constants)
        if self.floats:
            numbers = [graph.nodes[i].args[2] for i in self.floats]
            consts.append(torch.tensor(numbers, dtype=torch.float64))
        return consts if self.device is None else moved(consts, self.device)


def written_floats(graph: Graph) -> list[int]:
    """Ids of the assignments of a Python ``float`` into a tensor (``x[...] = 5.0``)."""
    return [
        i
        for i, node in enumerate(graph.nodes)
        if node.target == "operator.setitem"
        and node.op == "function"
        and len(node.args) == 3
        and type(node.args[2]) is float
    ]


def structure(graph: Graph, batch: Batch) -> tuple:
    """What of ``graph`` a compiled program is specialized to: its structure key, blind to the
    numbers it assigns into tensors (the program's inputs), except in a generation, whose
    steps are matched on their numbers (:mod:`.generation`)."""
    return _structure(graph, [] if batch.generate else written_floats(graph))


def _structure(graph: Graph, floats: list[int]) -> tuple:
    """:meth:`Graph.structure_key`, blind to the values of the assignments ``floats``."""
    key = graph.structure_key()
    if not floats:
        return key
    nodes = list(key[0])
    for i in floats:
        own = nodes[i]
        nodes[i] = ("assigned float", *own[:2], _freeze(graph.nodes[i].args[:2]), *own[3:])
    return (tuple(nodes), *key[1:])


def _entry(
    model: Any, state: codegen.State, prologue: Callable, result: Any, saved: list
) -> Callable:
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
    exec(compile(source, f"<lazytensor compiled run {next(codegen.ENTRIES)}>", "exec"), names)  # noqa: S102
    return names["run"]


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
            key = (id(model), structure(graph, batch), _signature(batch), _backend(compile))
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
        except Past as why:
            _explain(str(why))
        except torch._dynamo.exc.TorchDynamoException as why:  # it could not compile
            _explain(f"torch.compile failed ({type(why).__name__}); runs of it are eager")
            with self.lock:
                self.programs[key] = None
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # the run is too big, not the program wrong: the caller decides
        except Exception as why:  # compiled code failed where its eager first run did not
            _explain(
                f"the compiled program failed ({type(why).__name__}: {why}); this run and "
                "later runs of its structure are eager"
            )
            with self.lock:
                self.programs[key] = None
        return None

    def _first(self, model, graph, batch, key, compile) -> dict[int, Any]:
        """Run eagerly, noting the schedule, and build the program for the next runs."""
        executor = codegen.Schedule(model, graph, batch)
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
