"""Executor: replays an intervention graph inside one run of a model.

The executor hooks only the modules the graph touches. When a hook fires it makes that moment
of the forward pass (a module's input or output at its n-th call) *active*, then runs every
node that is ready, in recording order: point nodes of the active moment, and compute nodes
whose arguments all exist. Each node runs on real tensors at the moment its inputs exist,
with the aliasing and in-place behaviour of the same code written by hand in a hook. Values
are dropped as soon as no later node needs them. Hooks are removed when the run ends, also
on error.

A node that cannot run when its moment passes (it needs a value the forward computes later),
or whose moment never comes (a module never called, an iteration that never happened), is a
:class:`~lazytensor.errors.NodeFailure` naming that node; replay never skips work silently.

The op vocabulary of :mod:`lazytensor.core.graph` is this class's method names: replaying a
node is ``getattr(self, node.op)(node)``. What the executor knows of a graph's shape comes from
its :class:`~lazytensor.runtime.plan.Plan`, computed once per graph structure. Compute ops
outside a forward pass (shape propagation, values after a trace) use :func:`evaluate`, which
needs no plan. The executor never imports the recorder.
"""

from __future__ import annotations

import contextlib
import heapq
import time
from contextvars import ContextVar
from typing import Any

import torch

from ..core.errors import GraphError, NodeFailure
from ..core.graph import EVERY_CALL, Batch, Graph, Node, Ref
from . import fake, rows
from .evaluate import call_function, call_method, call_python, read_attribute, resolve
from .plan import PRE, RESULT, Plan

_RESULT_KEY = ("", RESULT)

#: The executor running in this thread/context. Hooks live on the shared module, so a hook
#: must ignore forward passes that another thread runs on the same model at the same time.
_running: ContextVar[Executor | None] = ContextVar("lazytensor_executor", default=None)


class _Stop(Exception):
    """Raised inside the forward once the value a materialization asked for exists."""


class Executor:
    """Runs ``graph`` inside one run of ``model`` on ``batch``.

    Args:
        model: the module the graph's paths are relative to.
        graph: the recorded program.
        batch: the inputs of the run.
        stop_at: stop the forward as soon as this node has run (a materialization).
        fake_mode: a ``FakeTensorMode`` to run in for shape propagation: one forward (for
            ``generate``, the prompt step and one decoding step, whose shapes stand for every
            later step); nothing is required to run, and all values are returned.
        trusted: run ``python`` nodes (user code). Local runs trust their own user; a server
            only when started with ``--trusted-clients``.
        deadline: a ``time.monotonic()`` after which the run stops with ``TimeoutError``,
            checked whenever a hooked module runs and at every generation step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        graph: Graph,
        batch: Batch,
        *,
        stop_at: int | None = None,
        fake_mode: Any = None,
        trusted: bool = True,
        deadline: float | None = None,
    ) -> None:
        self.model, self.graph, self.batch = model, graph, batch
        self.deadline = deadline
        self.stop_at, self.fake_mode, self.trusted = stop_at, fake_mode, trusted
        plan = self.plan = Plan.of(graph)
        n = len(graph.nodes)
        self.deps, self.users, self.points = plan.deps, plan.users, plan.points
        self.key_of, self.home = plan.key_of, plan.home
        self.repeating, self.mutating = plan.repeating, plan.mutating
        self.keep = set(graph.saved) | ({stop_at} if stop_at is not None else set())
        self.values: list[Any] = [None] * n
        self.done = [False] * n
        self.waiting = [len(d) for d in self.deps]
        self.pending_users = [len(u) for u in self.users]
        self.ran_at: dict[int, tuple] = {}
        self.heap: list[int] = []
        self.calls: dict[tuple[str, str], int] = dict.fromkeys(self.points, 0)
        self.active: tuple | None = None
        self.current: Any = None
        self.replaced = False
        self.suspended = 0
        self.modules: dict[str, torch.nn.Module] = {}

    def _module(self, path: str, node: int) -> torch.nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError as exc:
            raise NodeFailure(node, AttributeError(f"the model has no module {path!r}")) from exc

    # -- running --------------------------------------------------------------------------
    def run(self) -> dict[int, Any]:
        """Run the model with the graph inside it; return the saved (or, fake: all) values."""
        handles = self._install()
        mode = self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()
        token = _running.set(self)
        try:
            with torch.no_grad(), mode:
                runs = fake.runs(self.batch, self.fake_mode) if self.fake_mode else [self.batch]
                try:
                    self._schedule(
                        i for i, w in enumerate(self.waiting) if w == 0 and i not in self.key_of
                    )
                    self._drain()
                    for batch in runs:
                        self.current = self._call_model(batch)
                    if self.fake_mode is not None and self.batch.generate:
                        self.current = fake.tokens(runs[0], self.batch)
                    self._fire(_RESULT_KEY)
                except _Stop:
                    return {self.stop_at: self.values[self.stop_at]}
                except Exception as exc:
                    # A shape-only pass cannot go past the model's own data-dependent op
                    # (``x[mask]``, ``if x.sum() > 0``): it returns what ran before it.
                    if self.fake_mode is None or not fake.is_data_dependent(exc):
                        raise
        finally:
            _running.reset(token)
            for handle in handles:
                handle.remove()
        if self.fake_mode is not None:
            return {i: v for i, v in enumerate(self.values) if self.done[i]}
        self._check_all_ran()
        return {i: self.values[i] for i in self.graph.saved}

    def _install(self) -> list[Any]:
        handles = []
        try:
            for key, ids in self.points.items():
                path, kind = key
                if kind == RESULT:
                    continue
                module = self._module(path, ids[0])
                if kind == PRE:
                    hook = module.register_forward_pre_hook(self._pre_hook(key), with_kwargs=True)
                else:
                    hook = module.register_forward_hook(self._post_hook(key))
                handles.append(hook)
            first = {n.target: n.id for n in reversed(self.graph.nodes) if n.op == "module"}
            self.modules = {path: self._module(path, first[path]) for path in self.plan.modules}
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _check_time(self, *_: Any) -> bool:
        if time.monotonic() > self.deadline:
            raise TimeoutError("the run was stopped at its time limit")
        return False  # as a stopping criterion: never stop generation early

    def _call_model(self, batch: Batch) -> Any:
        if batch.generate:
            kwargs = batch.kwargs
            if self.deadline is not None:
                kwargs = {**kwargs, "stopping_criteria": [self._check_time]}
            return self.model.generate(*batch.args, **kwargs)
        return self.model(*batch.args, **batch.kwargs)

    def _pre_hook(self, key: tuple[str, str]):
        def hook(module, args, kwargs):
            if self.suspended or _running.get() is not self:
                return None
            self.current, self.replaced = (args, kwargs), False
            self._fire(key)
            new, self.current = self.current, None
            return new if self.replaced else None

        return hook

    def _post_hook(self, key: tuple[str, str]):
        def hook(module, args, output):
            if self.suspended or _running.get() is not self:
                return None
            self.current, self.replaced = output, False
            self._fire(key)
            new, self.current = self.current, None
            return new if self.replaced else None

        return hook

    def _fire(self, key: tuple[str, str]) -> None:
        """Make ``key`` at its next call the active moment and run everything now ready."""
        if self.deadline is not None:
            self._check_time()
        call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        here = [i for i in self.points.get(key, ()) if self._matches(i, call)]
        if not here:
            return
        self.active = (key, call)
        for i in here:
            if self.done[i]:
                self._reset(i)
        self._schedule(i for i in here if self.waiting[i] == 0)
        self._drain()
        for i in here:
            if not self.done[i] and self.fake_mode is None:
                raise NodeFailure(
                    i,
                    GraphError(
                        f"this needs a value that is computed later in the forward pass, after "
                        f"{_describe(self.graph.nodes[i])} has already run"
                    ),
                    "read values in the order the model computes them",
                )
        self.active = None

    def _matches(self, i: int, call: int) -> bool:
        wanted = self.graph.nodes[i].call
        if self.fake_mode is not None and self.batch.generate and wanted > 1:
            wanted = 1  # every decoding step has the shapes of the first one
        return wanted == call or wanted == EVERY_CALL

    def _is_active(self, i: int) -> bool:
        return (
            self.active is not None
            and self.key_of[i] == self.active[0]
            and self._matches(i, self.active[1])
        )

    def _schedule(self, ids) -> None:
        for i in ids:
            heapq.heappush(self.heap, i)

    def _drain(self) -> None:
        heap, done = self.heap, self.done
        while heap:
            i = heapq.heappop(heap)
            if not done[i]:
                self._run_node(i)

    def _run_node(self, i: int) -> None:
        node = self.graph.nodes[i]
        try:
            value = getattr(self, node.op)(node)
        except (_Stop, NodeFailure):
            raise
        except Exception as exc:
            if self.fake_mode is not None and fake.is_data_dependent(exc):
                raise NodeFailure(
                    i,
                    exc,
                    "this op's output shape depends on tensor values, "
                    "so it is unknown inside the trace; use it after the trace",
                ) from exc
            raise NodeFailure(i, exc) from exc
        self.values[i], self.done[i] = value, True
        if i in self.key_of:
            self.ran_at[i] = self.active
        for d in self.deps[i]:
            self.pending_users[d] -= 1
            if self.pending_users[d] == 0 and d not in self.keep and d not in self.repeating:
                self.values[d] = None
        for u in self.users[i]:
            self.waiting[u] -= 1
            if self.waiting[u] == 0 and (u not in self.key_of or self._is_active(u)):
                heapq.heappush(self.heap, u)
        if i == self.stop_at:
            raise _Stop

    def _reset(self, start: int) -> None:
        """Forget a repeating point node and everything computed from it, to run again."""
        stale = {start}
        for node in self.graph.nodes[start + 1 :]:
            if node.id in self.repeating and any(d in stale for d in self.deps[node.id]):
                stale.add(node.id)
        for i in stale:
            self.done[i], self.values[i] = False, self.values[i] if i in self.keep else None
        for i in stale:
            self.waiting[i] = sum(1 for d in self.deps[i] if not self.done[d])
            self.pending_users[i] = len(self.users[i])

    def _check_all_ran(self) -> None:
        for node in self.graph.nodes:
            if not self.done[node.id] and node.id in self.key_of:
                key = self.key_of[node.id]
                calls = self.calls.get(key, 0)
                if calls == 0:
                    what = f"{_describe(node)} never happened: the module was never called"
                else:
                    what = (
                        f"{_describe(node)} at call {node.call} never happened: the "
                        f"module ran {calls} time(s)"
                    )
                raise NodeFailure(
                    node.id, GraphError(what), "check the module path and the iteration range"
                )

    # -- argument resolution ---------------------------------------------------------------
    def _value(self, arg: Any) -> Any:
        return resolve(arg, self.values, self.graph.constants, self.fake_mode)

    def _args(self, node: Node) -> tuple[tuple, dict]:
        values, value = self.values, self._value
        args = tuple([values[a.id] if type(a) is Ref else value(a) for a in node.args])
        return args, (value(node.kwargs) if node.kwargs else {})

    def _check_write(self, node: Node) -> None:
        first = node.args[0] if node.args else None
        home = self.home[first.id] if isinstance(first, Ref) else None
        if home is not None and self.ran_at.get(home) != self.active:
            raise GraphError(
                f"this writes into {_describe(self.graph.nodes[home])}, which the forward pass "
                "has already used, and it can only run later because it needs a value "
                "computed after that"
            )

    # -- the op vocabulary (one method per member of graph.OPS) ---------------------------
    def output(self, node: Node) -> Any:
        return rows.narrow(self.current, node.rows, self.batch.size)

    def result(self, node: Node) -> Any:
        return rows.narrow(self.current, node.rows, self.batch.size)

    def input(self, node: Node) -> Any:
        args, kwargs = self.current
        first = args[0] if args else next(iter(kwargs.values()))
        return rows.narrow(first, node.rows, self.batch.size)

    def inputs(self, node: Node) -> Any:
        return rows.narrow(self.current, node.rows, self.batch.size)

    def set_output(self, node: Node) -> None:
        new = self._value(node.args[0])
        self.current = rows.replace(self.current, new, node.rows, self.batch.size)
        self.replaced = True

    def set_input(self, node: Node) -> None:
        args, kwargs = self.current
        new = self._value(node.args[0])
        if args:
            first = rows.replace(args[0], new, node.rows, self.batch.size)
            self.current = ((first, *args[1:]), kwargs)
        else:
            name = next(iter(kwargs))
            first = rows.replace(kwargs[name], new, node.rows, self.batch.size)
            self.current = (args, {**kwargs, name: first})
        self.replaced = True

    def set_inputs(self, node: Node) -> None:
        new_args, new_kwargs = self._value(node.args[0])
        args, kwargs = rows.replace(
            self.current, (tuple(new_args), dict(new_kwargs)), node.rows, self.batch.size
        )
        self.current, self.replaced = (tuple(args), dict(kwargs)), True

    def function(self, node: Node) -> Any:
        if node.id in self.mutating:
            self._check_write(node)
        return call_function(node, *self._args(node))

    def method(self, node: Node) -> Any:
        if node.id in self.mutating:
            self._check_write(node)
        return call_method(node, *self._args(node))

    def getattr(self, node: Node) -> Any:
        return read_attribute(node, self._value(node.args[0]))

    def python(self, node: Node) -> Any:
        """A user's function, shipped as cloudpickle bytes: trusted runs only."""
        return call_python(node, *self._args(node), trusted=self.trusted)

    def module(self, node: Node) -> Any:
        args, kwargs = self._args(node)
        self.suspended += 1
        try:
            return self.modules[node.target](*args, **kwargs)
        finally:
            self.suspended -= 1


def _describe(node: Node) -> str:
    where = node.target or "the model"
    kind = {"set_input": "input", "set_inputs": "inputs", "set_output": "output"}.get(
        node.op, node.op
    )
    return f"{where}.{kind}" if node.op != "result" else "the run's result"
