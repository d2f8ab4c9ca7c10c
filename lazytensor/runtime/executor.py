"""Executor: replays an intervention graph inside one run of a model.

The executor hooks only the modules the graph touches. When a hook fires it makes that moment
of the forward pass (a module's input or output at its n-th call) *active*, then runs every
node that is ready, in recording order: point nodes of the active moment, and compute nodes
whose arguments all exist. Each node runs on real tensors at the moment its inputs exist,
with the aliasing and in-place behaviour of the same code written by hand in a hook. Values
are dropped as soon as no later node needs them. Hooks are removed when the run ends, also
on error.

A node that cannot run when its moment passes (it needs a value the forward computes later),
or whose moment never comes (a module never called), is a
:class:`~lazytensor.errors.NodeFailure` naming that node; replay never skips work silently
(what counts as the run's outcome instead: :mod:`.outcome`). Rules the replay follows:

* **Calls** (:mod:`.calls`): a node of several calls runs again at each, once per generation
  step (each forward pass is one) on that step's values; a saved one of a call range returns
  one value per call that ran.
* **Rows** (:mod:`.rows`): every forward's :class:`~lazytensor.runtime.rows.Layout` comes from
  the inputs the model gets (rows per batch row after ``generate`` expands them, tokens per
  row), so an invoke sees its own rows under beams, returned sequences and token-major values.
* **Calls the trace makes** (``module`` nodes, ``lm.sae(h)``): while one runs, the model's own
  moments are not counted (the logit lens's ``lm.lm_head(h)`` does not move
  ``lm.lm_head.output``). A point node *below* the called module ``P`` and recorded after the
  call (``lm.sae.encoder.output``) belongs to that call: it fires at the first matching call
  inside it and sees its values whole. Every other point node belongs to the model's forward.
* **Shape-only passes** (``fake_mode``) run without the user's own forward hooks
  (:func:`.hooks.quiet`): they would see fake tensors.

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
from typing import Any

import torch

from ..core.errors import GraphError, NodeFailure
from ..core.graph import Batch, Graph, Node, Ref
from ..core.ops import runnable_function
from . import bounds, calls, chains, fake, grads, hooks, outcome, rows
from .evaluate import SCALARS, call_function, call_method, call_python, read_attribute, resolve
from .moments import RESULT_KEY, TOKENS_KEY, Sides, describe, rows_layout
from .plan import GRAD, Plan
from .session import Workspace

#: Allow-listed function name -> what a replay calls (:func:`runnable_function`), filled as
#: names are first run; a name outside the allow-list raises and is never added.
_RUNNABLE: dict[str, Any] = {}


def _runnable(name: str) -> Any:
    fn = _RUNNABLE[name] = runnable_function(name)
    return fn


class _Stop(BaseException):
    """Raised inside the forward once the value a materialization asked for exists.

    Not an ``Exception``: PyTorch's module call handles an ``Exception`` by looping, in
    Python, over the module's forward hooks, which another thread running a trace on the same
    model may be registering or removing right then ("OrderedDict mutated during iteration");
    a ``BaseException`` passes straight through, as does ``Escaped`` (:mod:`.hooks`)."""


class _Ended(_Stop):
    """Raised inside the forward once nothing is left to run: every node has run and none
    waits for a later call (see :meth:`Executor._fire`), or ``tracer.stop()`` ran."""


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
            checked before every node, whenever a hooked module runs and at every
            generation step.
        workspace: what the runs of a session share (:mod:`.session`); a fresh one by default.
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
        workspace: Workspace | None = None,
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
        self.kept = self.keep | self.repeating | plan.held  # never freed while the run lasts
        self.values: list[Any] = [None] * n
        self.done = [False] * n
        self.waiting = list(plan.counts[0])  # per node, its inputs not computed yet
        self.pending_users = list(plan.counts[1])  # per node, its readers still to run
        self.ran_at: dict[int, tuple] = {}
        self.heap: list[int] = []
        self.calls: dict[tuple[str, str], int] = dict.fromkeys(self.points, 0)
        self.active: tuple | None = None  # (key, call, side) of the moment running now
        self.current: Any = None
        self.replaced = False
        self.modules: dict[str, torch.nn.Module] = {}
        self.sides = Sides.of(graph, plan)
        self.side: int | None = None  # the ``module`` node running now, if any
        self.side_calls: dict[tuple[str, str], int] = {}
        self.layout = rows.Layout(batch.size)  # of the forward running now
        self.forwards = 0  # forward passes of the model begun: generation steps
        self.epoch: dict[int, int] = {}  # repeating node -> the forward it last ran in
        self.left = n  # nodes not run yet: at 0, with none repeating, the forward can end
        self.skipped: dict[str, Any] = {}  # module path -> the output its skipped call returns
        self.workspace = workspace if workspace is not None else Workspace()
        self.bounded = bounds.MAX_BYTES.get() is not None  # a server's --max-memory is on
        self.grad_targets = grads.wanted(self) if plan.backwards else frozenset()
        self.grad_sources = grads.sources(self) if self.grad_targets else frozenset()
        self.special = frozenset((*self.key_of, *self.repeating, *self.grad_targets))
        self.watched: set[int] = set()  # nodes whose values carry a gradient hook
        self.watched_values: dict[int, Any] = {}  # ...and the tensor each hook is on
        self.backward_now: int | None = None  # the backward node running now
        self.deferred: list[int] = []  # backward nodes ready while another one ran
        # A subclass that watches each node (a shape-only ledger, a schedule) gets every one
        # through _run_node; the drain's direct path for function nodes is this class's own.
        self._quick = type(self)._run_node is Executor._run_node
        # Chains (:mod:`.chains`) skip the per-node checks of a deadline or a memory bound,
        # the values of a shape-only pass and a materialization's stop.
        plain = self._quick and deadline is None and fake_mode is None and stop_at is None
        self.chains = plan.chains if plain and not self.bounded and not plan.backwards else None
        collect = fake_mode is None and stop_at is None
        ranged = calls.per_call(graph, self.repeating, graph.saved) if collect else ()
        self.collected: dict[int, list] = {i: [] for i in ranged}

    # -- running --------------------------------------------------------------------------
    def run(self) -> dict[int, Any]:
        """Run the model with the graph inside it; return the saved (or, fake: all) values.

        A saved node of a call range has a list, one value per call that ran; one of a
        generation step that never ran a :class:`~lazytensor.runtime.calls.NotRun`.
        """
        quiet = hooks.quiet(self.model) if self.fake_mode is not None else contextlib.nullcontext()
        token = hooks.running.set(self)
        try:
            with quiet:
                values = self._run()
        finally:
            hooks.running.reset(token)
        return values

    def _run(self) -> dict[int, Any]:
        with hooks.LOCK:
            handles = hooks.install(self)
        mode = self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()
        grad_mode = torch.enable_grad() if self.plan.backwards else torch.no_grad()
        weights = grads.weights_tracked(self) if self.grad_targets else contextlib.nullcontext()
        try:
            with grad_mode, weights, mode:
                runs = fake.runs(self.batch, self.fake_mode) if self.fake_mode else [self.batch]
                failed: Exception | None = None
                try:
                    self._schedule(self.plan.roots)
                    self._drain()
                    for batch in runs:
                        self.current = self._call_model(batch)
                        ids = batch.kwargs.get("input_ids")  # (B, T): fake, the step's shape
                        if self.fake_mode is not None and ids is not None:
                            self._fire_value(TOKENS_KEY, ids[:, -1])
                    if self.fake_mode is not None and self.batch.generate:
                        self.current = fake.tokens(runs[0], self.batch)
                    self._fire_value(RESULT_KEY, self.current)
                except _Ended:
                    pass  # the rest of the forward could change nothing the graph holds
                except _Stop:
                    return {self.stop_at: self.values[self.stop_at]}
                except hooks.Escaped as escaped:  # a node's failure, out of the forward
                    failed, escaped.error = escaped.error, None
                except Exception as exc:
                    # A shape-only pass cannot go past the model's own data-dependent op
                    # (``x[mask]``, ``if x.sum() > 0``): it returns what ran before it.
                    if self.fake_mode is None or not fake.is_data_dependent(exc):
                        raise
                if failed is not None:  # raised outside the handler: no cycle through Escaped
                    try:
                        raise failed
                    finally:
                        failed = None  # nor through this frame, which its traceback holds
        finally:
            with hooks.LOCK:
                for handle in handles:
                    handle.remove()
        if self.fake_mode is not None:
            return {i: v for i, v in enumerate(self.values) if self.done[i]}
        outcome.check_all_ran(self)
        saved = outcome.saved(self)
        return grads.detached(saved) if self.plan.backwards else saved

    def run_plain(self) -> dict[int, Any]:
        """Run a graph that needs no forward pass (a session's code between its traces)."""
        moment = next((i for i, key in self.key_of.items() if key[1] != GRAD), None)
        if moment is not None:
            raise NodeFailure(moment, GraphError("module values exist only inside a trace"))
        with torch.enable_grad() if self.plan.backwards else torch.no_grad():
            try:
                for i in range(len(self.graph.nodes)):  # recording order is a valid order
                    if not self.done[i] and i not in self.key_of:
                        if self.deadline is not None:
                            self._check_time()
                        self._run_node(i)
            except _Stop:  # a stop node: what it reads has run, and nothing after it runs
                pass  # (a BaseException: it must never leave the executor)
        saved = outcome.saved(self)
        return grads.detached(saved) if self.plan.backwards else saved

    def _check_time(self, *_: Any) -> bool:
        if time.monotonic() > self.deadline:
            raise TimeoutError("the run was stopped at its time limit")
        return False  # as a stopping criterion: never stop generation early

    def _call_model(self, batch: Batch) -> Any:
        if batch.generate:
            kwargs = batch.kwargs
            if self.deadline is not None or TOKENS_KEY in self.points:
                criteria = [*(kwargs.get("stopping_criteria") or ()), self._on_step]
                kwargs = {**kwargs, "stopping_criteria": criteria}
            return self.model.generate(*batch.args, **kwargs)
        return self.model(*batch.args, **batch.kwargs)

    def _on_step(self, input_ids: torch.Tensor, *_: Any, **__: Any) -> bool:
        """A stopping criterion: called after each step with the ids so far."""
        if self.deadline is not None:
            self._check_time()
        if TOKENS_KEY in self.points:
            tokens = input_ids[:, -1].clone(memory_format=torch.contiguous_format)  # (B*k,)
            self._fire_value(TOKENS_KEY, tokens)
        return False  # never stops generation

    def _fire_value(self, key: tuple[str, str], value: Any) -> None:
        """Fire a moment that is no module's hook (the result, a generation step's tokens)."""
        self.current, self.replaced = value, False
        layout = self.layout
        self.layout = rows_layout(value, self.batch.size, layout)
        try:
            self._fire(key)
        finally:
            self.layout, self.current = layout, None

    def _fire(self, key: tuple[str, str], call: int | None = None) -> None:
        """Make ``key`` at its next call (or at ``call``: a backward pass's gradient moment)
        the active moment and run everything now ready."""
        if self.deadline is not None:
            self._check_time()
        if call is None:
            counts = self.calls if self.side is None else self.side_calls
            call = counts.get(key, 0)
            counts[key] = call + 1
        here = [i for i in self.sides.points(self.side, key) if self._matches(i, call)]
        if not here:
            return
        if self.grad_sources:
            grads.track(self, here)  # before anything is computed from the values read
        self.active = (key, call, self.side)
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
                        f"{describe(self.graph.nodes[i])} has already run"
                    ),
                    "read values in the order the model computes them",
                )
        self.active = None
        if self.left == 0 and not self.repeating and self._may_end():
            raise _Ended  # nothing later can need the forward

    def _may_end(self) -> bool:
        """Whether the run may end early here: not inside a backward pass (its gradients
        still flow) or a call the trace makes, and not in a generation (its later steps are
        the user's result even when the graph reads none of them; ``tracer.stop()`` ends one)."""
        return self.backward_now is None and self.side is None and not self.batch.generate

    def _matches(self, i: int, call: int) -> bool:
        if self.side is not None:
            return call == 0  # the first call inside the trace's call of the module
        node = self.graph.nodes[i]
        if node.op == "result":
            return True  # a run has one result, whichever step it was read at
        if self.key_of[i][1] == GRAD:
            return node.call == call  # the backward pass it was recorded in
        wanted = node.call
        if self.fake_mode is not None and self.batch.generate:
            return calls.fake_matches(wanted, call)  # call 1 stands for every later step
        return calls.matches(wanted, call)

    def _is_active(self, i: int) -> bool:
        active = self.active
        return (
            active is not None
            and self.key_of[i] == active[0]
            and self.sides.side_of.get(i) == active[2]
            and self._matches(i, active[1])
        )

    def _schedule(self, ids) -> None:
        for i in ids:
            heapq.heappush(self.heap, i)

    def _drain(self) -> None:
        """Run every ready node, in recording order.

        A ``function`` node that writes into nothing runs here directly: the same call that
        :meth:`function` makes, without the per-node method lookups (research code records
        thousands of these). Anything else, and every node of a run with a deadline or a
        server's memory bound (whose checks run per node), goes through :meth:`_run_node`."""
        heap, done, nodes, values = self.heap, self.done, self.graph.nodes, self.values
        quick = self._quick and self.deadline is None and not self.bounded
        mutating, plain, resolve_arg = self.mutating, SCALARS, self._value
        chained = self.chains or None
        while heap:
            i = heapq.heappop(heap)
            if done[i]:
                continue
            if self.backward_now is not None and i in self.plan.backwards:
                self.deferred.append(i)  # one backward pass at a time: after this one
                continue
            if chained is not None:
                chain = chained.get(i)
                if chain is not None and chain.ready(done):
                    self._ran_chain(chain)
                    continue
            node = nodes[i]
            if not quick or node.op != "function" or i in mutating:
                self._run_node(i)
                continue
            try:
                fn = _RUNNABLE.get(node.target) or _runnable(node.target)
                args = []
                for a in node.args:
                    kind = type(a)
                    args.append(
                        values[a.id] if kind is Ref else a if kind in plain else resolve_arg(a)
                    )
                value = fn(*args, **resolve_arg(node.kwargs)) if node.kwargs else fn(*args)
            except (_Stop, NodeFailure):
                raise
            except Exception as exc:
                raise self._failure(i, exc) from exc
            self._ran(i, value)

    def _run_node(self, i: int) -> None:
        if self.deadline is not None:  # between every two nodes: a chain of big ops stops too
            self._check_time()
        node = self.graph.nodes[i]
        try:
            value = getattr(self, node.op)(node)
        except (_Stop, NodeFailure):
            raise
        except Exception as exc:
            raise self._failure(i, exc) from exc
        self._ran(i, value)

    def _failure(self, i: int, exc: Exception) -> NodeFailure:
        if self.fake_mode is not None and fake.is_data_dependent(exc):
            return NodeFailure(
                i,
                exc,
                "this op's output shape depends on tensor values, "
                "so it is unknown inside the trace; use it after the trace",
            )
        return NodeFailure(i, exc)

    def _ran(self, i: int, value: Any) -> None:
        """Node ``i`` gave ``value``: keep it, free what no one reads now, and schedule the
        nodes whose last missing input it was."""
        values = self.values
        values[i] = value
        self.done[i] = True
        self.left -= 1
        if i in self.special:  # a point node, a repeating one, or one whose gradient is read
            self._ran_special(i, value)
        pending, kept = self.pending_users, self.kept
        for d in self.deps[i]:
            pending[d] -= 1
            if pending[d] == 0 and d not in kept:
                values[d] = None
        users = self.users[i]
        if users:
            waiting, key_of, heap = self.waiting, self.key_of, self.heap
            for u in users:
                waiting[u] -= 1
                if waiting[u] == 0 and (u not in key_of or self._is_active(u)):
                    heapq.heappush(heap, u)
        elif i not in kept and self.fake_mode is None:
            values[i] = None  # nothing reads it (a bare `x.mul_(2)`): free it now
        if i == self.stop_at:
            raise _Stop

    def _ran_chain(self, chain: chains.Chain) -> None:
        """Run ``chain`` and do for it what :meth:`_ran` does for each of its nodes."""
        values = self.values
        try:
            chain.run(self.graph, values, self.kept)
        except chains.Failed as failed:
            raise self._failure(failed.node, failed.error) from failed.error
        start, stop = chain.start, chain.stop
        self.done[start : stop + 1] = [True] * (stop + 1 - start)
        self.left -= stop + 1 - start
        pending, kept = self.pending_users, self.kept
        for d, edges in chain.reads:
            pending[d] -= edges
            if pending[d] == 0 and d not in kept:
                values[d] = None
        for i, later in chain.gives:
            pending[i] = later
        waiting, key_of, heap = self.waiting, self.key_of, self.heap
        for u, edges in chain.feeds:
            waiting[u] -= edges
            if waiting[u] == 0 and (u not in key_of or self._is_active(u)):
                heapq.heappush(heap, u)

    def _ran_special(self, i: int, value: Any) -> None:
        if i in self.grad_targets and self.fake_mode is None:
            grads.watch(self, i, value)
        if i in self.key_of:
            self.ran_at[i] = self.active
        if i in self.repeating:
            self.epoch[i] = self.forwards
            if i in self.collected:
                self.collected[i].append(value)

    def _reset(self, start: int) -> None:
        """Forget a repeating point node and everything computed from it, to run again.

        Those nodes wait again for every repeating input of theirs that is from an earlier
        forward pass (an earlier generation step), so they run once per step, on that step's
        values only.
        """
        stale = self.plan.stale(start)  # ascending
        done, values, keep = self.done, self.values, self.keep
        for i in stale:
            if done[i]:
                self.left += 1
                done[i] = False
            if i not in keep:
                values[i] = None
        # Plain loops, not sum() over generators: this runs at every step of a generation
        # for every repeating read.
        now, epoch, repeating = self.forwards, self.epoch, self.repeating
        deps, users, waiting, pending = self.deps, self.users, self.waiting, self.pending_users
        for i in stale:
            count = 0
            for d in deps[i]:
                if not done[d] or (d in repeating and epoch.get(d, now) < now):
                    count += 1
            waiting[i] = count
            pending[i] = len(users[i])

    # -- argument resolution ---------------------------------------------------------------
    def _value(self, arg: Any) -> Any:
        return resolve(arg, self.values, self.graph.constants, self.fake_mode)

    def _args(self, node: Node) -> tuple[tuple, dict]:
        values, value, plain = self.values, self._value, SCALARS
        args = tuple(
            [
                values[a.id] if type(a) is Ref else a if type(a) in plain else value(a)
                for a in node.args
            ]
        )
        return args, (value(node.kwargs) if node.kwargs else {})

    def _check_write(self, node: Node) -> None:
        first = node.args[0] if node.args else None
        home = self.home[first.id] if isinstance(first, Ref) else None
        if home in self.plan.weights:
            target = self.graph.nodes[home].target
            raise GraphError(
                f"the model's weights are read-only inside a trace ({target} would change); "
                "compute with a copy instead, e.g. `w = w.clone()`"
            )
        if home is not None and self.ran_at.get(home) != self.active:
            raise GraphError(
                f"this writes into {describe(self.graph.nodes[home])}, which the forward pass "
                "has already used, and it can only run later because it needs a value "
                "computed after that"
            )

    def _rows(self, node: Node) -> tuple[int, int] | None:
        # Inside a call the trace makes, values are the call's own: its inputs' rows.
        return node.rows if self.side is None else None

    # -- the op vocabulary (one method per member of graph.OPS) ---------------------------
    def output(self, node: Node) -> Any:
        return rows.narrow(self.current, self._rows(node), self.layout)

    def result(self, node: Node) -> Any:
        return rows.narrow(self.current, self._rows(node), self.layout)

    def tokens(self, node: Node) -> Any:
        return rows.narrow(self.current, self._rows(node), self.layout)

    def input(self, node: Node) -> Any:
        args, kwargs = self.current
        first = args[0] if args else next(iter(kwargs.values()))
        return rows.narrow(first, self._rows(node), self.layout)

    def inputs(self, node: Node) -> Any:
        return rows.narrow(self.current, self._rows(node), self.layout)

    def set_output(self, node: Node) -> None:
        new = self._value(node.args[0])
        self.current = rows.replace(self.current, new, self._rows(node), self.layout)
        self.replaced = True

    def set_input(self, node: Node) -> None:
        args, kwargs = self.current
        new, where = self._value(node.args[0]), self._rows(node)
        if args:
            first = rows.replace(args[0], new, where, self.layout)
            self.current = ((first, *args[1:]), kwargs)
        else:
            name = next(iter(kwargs))
            first = rows.replace(kwargs[name], new, where, self.layout)
            self.current = (args, {**kwargs, name: first})
        self.replaced = True

    def set_inputs(self, node: Node) -> None:
        new_args, new_kwargs = self._value(node.args[0])
        args, kwargs = rows.replace(
            self.current, (tuple(new_args), dict(new_kwargs)), self._rows(node), self.layout
        )
        self.current, self.replaced = (tuple(args), dict(kwargs)), True

    def skip(self, node: Node) -> None:
        """The module's call does not run (:mod:`.skips`): its output is ``args[0]``."""
        where = self._rows(node)
        if where is not None and where != (0, self.batch.size):
            raise GraphError(
                f"{node.target}.skip() inside an invoke: a skipped module runs for no row, so it "
                "cannot be skipped for some rows only; skip it outside the invokes, or assign "
                "the invoke's rows with `.output = ...`"
            )
        self.skipped[node.target] = self._value(node.args[0])

    def stop(self, node: Node) -> None:
        """``tracer.stop()``: everything recorded before it has run; end the run here."""
        raise _Ended

    def function(self, node: Node) -> Any:
        if node.id in self.mutating:
            self._check_write(node)
        args, kwargs = self._args(node)
        if self.bounded:  # on a server: bounded before it runs
            return call_function(node, args, kwargs)
        return (_RUNNABLE.get(node.target) or _runnable(node.target))(*args, **kwargs)

    def method(self, node: Node) -> Any:
        if node.id in self.mutating:
            self._check_write(node)
        return call_method(node, *self._args(node))

    def getattr(self, node: Node) -> Any:
        return read_attribute(node, self._value(node.args[0]))

    def python(self, node: Node) -> Any:
        """A user's function, shipped as cloudpickle bytes: trusted runs only."""
        return call_python(node, *self._args(node), trusted=self.trusted)

    # gradients (see .grads) and session state (see .session)
    def backward(self, node: Node) -> None:
        return grads.backward(self, node)

    def grad(self, node: Node) -> Any:
        return self.current

    def set_grad(self, node: Node) -> None:
        self.current, self.replaced = self._value(node.args[1]), True

    def weight(self, node: Node) -> Any:
        module, _, name = node.target.rpartition(".")
        owner = hooks.submodule(self.model, module)
        if name in owner._parameters:
            return owner._parameters[name]
        if name in owner._buffers:
            return owner._buffers[name]
        raise AttributeError(f"the model has no parameter or buffer {node.target!r}")

    def parameter(self, node: Node) -> Any:
        return self.workspace.parameter(self._value(node.args[0]))

    def carry(self, node: Node) -> Any:
        return self.workspace.carry(node)

    def optimizer(self, node: Node) -> Any:
        args, kwargs = self._args(node)
        return self.workspace.optimizer(node, args[0], kwargs)

    def optimize(self, node: Node) -> None:
        return self.workspace.optimize(node, self._value(node.args[0]))

    def module(self, node: Node) -> Any:
        """Call a submodule; the model's own moments stand still meanwhile (see the module
        docstring), and the point nodes that belong to this call fire."""
        args, kwargs = self._args(node)
        outer = (self.side, self.side_calls, self.current, self.replaced, self.active)
        self.side, self.side_calls = node.id, {}
        try:
            return self.modules[node.target](*args, **kwargs)
        finally:
            self.side, self.side_calls, self.current, self.replaced, self.active = outer
