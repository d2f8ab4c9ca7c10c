"""Trace: the ``with model.trace(...)`` block, a state machine over a backend.

A trace is RECORDING while its block runs: envoys and proxies ask it to add nodes to its
:class:`~lazytensor.core.graph.Graph`, each tagged with the user's ``file:line``. It is also where
policy lives: what a proxy's ``bool()``/``.item()``/``print`` do (a *materialization*: run the
graph recorded so far, stop the forward once the value exists, and go on recording), how
``.shape`` is answered without running the model (:mod:`.shapes`), which batch rows an invoke
sees and which call of a module an iteration step means. At the end of the block the whole
graph goes to the trace's :class:`~lazytensor.backends.base.Backend` once; the trace becomes
DONE (or FAILED), or SUBMITTED for ``blocking=False``, and saved proxies then answer with their
real values::

    RECORDING --block ends--> DONE | FAILED
    RECORDING --block ends, blocking=False--> SUBMITTED --result()--> DONE | FAILED

A trace knows nothing of models: it gets its inputs adapter (what an invoke's inputs become, how
invokes join into a batch) and its backend from whoever opens it.

Importing lazytensor patches nothing: the torch-function mode that captures factory calls such
as ``torch.zeros`` is active only inside the block (:mod:`.recorder`, :mod:`.state`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ..backends.base import Backend, Job, JobState, RunRequest
from ..core import ops, tree
from ..core.errors import NodeFailure, StrictModeError, TraceError, at_site
from ..core.graph import REFS as _REFS
from ..core.graph import SCALARS, Batch, Graph, Node, _object_new, ref
from ..core.site import KNOWN as _KNOWN_SITES
from ..core.site import Site, user_frame
from ..core.site import at as _site_at
from ..core.site import here as _site
from ..runtime.evaluate import evaluate
from . import cache as caches
from . import gradients, steps
from . import job as jobs
from . import scan as scans
from . import session as sessions
from . import stop as stopping
from .args import computed_inputs, to_graph, to_values
from .proxy import PLAIN_METHODS, Method, OpenProxy, Proxy
from .publish import publish
from .recorder import Recorder, record_python, record_torch
from .shapes import Shapes
from .state import Inputs, State, current, enter, leave, pause_collector, resume_collector
from .steps import Selection, Steps

log = logging.getLogger("lazytensor")

_META_ATTRIBUTES = frozenset(("shape", "dtype", "device", "ndim", "is_cuda", "layout"))
_META_METHODS = frozenset(("size", "dim", "numel", "ndimension", "nelement", "element_size",
                           "is_floating_point", "is_contiguous"))  # fmt: skip
_VALUE_METHODS = frozenset(("item", "tolist", "numpy"))
#: Arguments a graph holds as they are: the scalars of a node's argument pattern (graph.SCALARS).
_PLAIN_ARGS = SCALARS
#: Op -> the targets already checked against the allow-list (the check raises otherwise).
_ALLOWED: dict[str, set[str]] = {}
_getframe = sys._getframe
_RECORDING = State.RECORDING  # a global: cheaper to read than the enum's attribute
# The hot paths (Trace.apply, the proxy's operators) write ref() and Proxy.of() out inline, with the
# graph's shared REFS.


def _check_op(op: str, target: str) -> None:
    if op == "function":
        ops.resolve_function(target)
    elif op == "method":
        ops.check_method(target)
    _ALLOWED.setdefault(op, set()).add(target)


class Trace:
    """One ``with`` block: records a graph, then runs it on its backend.

    Created by :meth:`lazytensor.Model.trace` / :meth:`lazytensor.LanguageModel.generate`;
    not constructed directly. ``root`` is the envoy whose model the trace is of.
    """

    def __init__(
        self,
        root: Any,
        inputs: Inputs,
        backend: Backend,
        first: tuple[tuple, dict] | None = None,
        *,
        generate: bool = False,
        options: dict | None = None,
        strict: bool = False,
        blocking: bool = True,
        lazy: bool = False,
        compile: bool | str = False,
        scan: bool = False,
        edit: bool = False,
    ) -> None:
        self.root, self.inputs, self.backend = root, inputs, backend
        self.scan = scan  # run shape-only at the end (model.scan)
        self.edit = edit  # never run: the graph is kept for later traces (model.edit)
        self.stopped: Site | None = None  # where tracer.stop() was recorded
        self.blocking = blocking
        self.lazy = lazy  # recorded outside a block, run when a value is needed
        self.compile = compile  # compiled replay (lazytensor.runtime.compiled)
        self.job: Job | None = None
        self.graph = Graph()
        self.state = State.RECORDING
        self.generate = generate
        self.options = options or {}
        self.strict = strict
        self.parts: list[Any] = []
        self.size = 0
        self.rows: tuple[int, int] | None = None
        self.call = 0
        self.values: dict[int, Any] = {}
        self.synced: dict[int, Any] = {}
        self.shapes: Shapes | None = None  # fake values, made at the first shape query
        self._warned: set[Site | None] = set()
        self._in_invoke = False
        self._cancelled = False
        self.containers: list[Any] = []
        self.filled: list[Any] = []  # callables given the values when the run is done
        self._frame: Any = None
        self._token: Any = None
        self._mode: Recorder | None = None
        self.session: Any = None  # the session this trace is a segment of (.session)
        self.backward_id: int | None = None  # the backward pass whose block is open
        if first is not None:
            self._add_part(*first)

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        if self.state is not State.RECORDING or self._token is not None:
            raise TraceError(f"a trace can be entered once; this one is {self.state.value}")
        session = sessions.active()
        if session is not None and session.open:
            session.begin(self)
        self._token = enter(self)
        self._mode = Recorder(self)
        self._mode.__enter__()
        pause_collector()  # until __exit__ has run the graph (see .state)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return self._exit(exc_type, exc, tb)
        finally:
            resume_collector()

    def _exit(self, exc_type, exc, tb) -> bool:
        self._mode.__exit__(exc_type, exc, tb)
        self._mode = None  # it refers back to this trace: free the trace without the gc
        leave(self._token)
        if exc_type is not None:
            self.state = State.FAILED
            return False
        self._save_containers()
        if self.session is not None:  # runs with its session, at the session's end
            self.state = State.SUBMITTED
            return False
        if self.edit:  # model.edit(): the graph is applied to later traces, never run here
            self.state = State.DONE
            return False
        self._frame = user_frame()  # whose names will hold the values
        if not self.blocking:
            self._submit()
            return False
        try:
            self.values = scans.run(self) if self.scan else self._run(self.graph)
        except BaseException:
            self.state = State.FAILED
            self._frame = None
            raise
        self._finish()
        return False

    def is_current(self) -> bool:
        return current() is self

    def _finish(self) -> None:
        self.state = State.DONE
        self.synced.clear()
        self.shapes = None
        frame, self._frame = self._frame, None
        steps.received(self)  # per-step values, steps that never ran
        for fill in self.filled:  # caches (see .cache) take their values
            fill(self.values)
        publish(frame, self.values, self, self.containers)
        self.containers = []

    def save_container(self, container: Any) -> None:
        """``lt.save([...])``: keep every proxy in ``container`` (also ones added to it later
        in the block); after the trace it holds the values."""
        if self.state is State.RECORDING:
            self.containers.append(container)

    def _save_containers(self) -> None:
        for container in self.containers:
            for leaf in tree.leaves(container):
                if isinstance(leaf, Proxy) and leaf._trace is self:
                    self.graph.save(leaf._node)

    def _submit(self) -> None:
        jobs.submit(self)

    # -- as a job (blocking=False): see .job -------------------------------------------------
    def status(self) -> JobState | str:
        """For ``blocking=False``: the job's state (``queued``, ``running``, ``completed``...)."""
        return jobs.status(self)

    def cancel(self) -> bool:
        """For ``blocking=False``: drop the job if it has not started; whether it was dropped."""
        return jobs.cancel(self)

    def _wait(self, timeout: float | None = None) -> list[Any]:
        return jobs.wait(self, timeout)

    def _check_recording(self) -> None:
        if self.state is not State.RECORDING:
            raise TraceError(
                f"this trace is {self.state.value}; it records only inside its `with` block"
            )
        if self.stopped is not None:
            stopping.refuse_after(self)

    # -- invokes and iteration --------------------------------------------------------------
    @contextlib.contextmanager
    def invoke(self, *args: Any, **kwargs: Any) -> Iterator[Trace]:
        """Add inputs as extra batch rows; proxies inside see and write only those rows.

        With no inputs, the invoke sees the whole batch.
        """
        self._check_recording()
        if self._in_invoke:
            raise TraceError("invokes cannot be nested; close one before opening the next")
        rows = self._add_part(args, kwargs) if (args or kwargs) else None
        previous, self.rows, self._in_invoke = self.rows, rows, True
        try:
            yield self
        finally:
            self.rows, self._in_invoke = previous, False

    def _add_part(self, args: tuple, kwargs: dict) -> tuple[int, int]:
        args, kwargs = computed_inputs(self, args), computed_inputs(self, kwargs)
        part = self.inputs.prepare(args, kwargs)
        start = self.size
        self.size += part.size
        self.parts.append(part)
        return (start, self.size)

    def all(self) -> Selection:
        """Every call of the modules accessed inside: ``with tracer.all():`` or
        ``for _ in tracer.all():``, the same as ``tracer.iter[:]`` (see :mod:`.steps`)."""
        return Steps(self)[:]

    @property
    def iter(self) -> Steps:
        """``tracer.iter[0:8]`` yields steps; inside step i, module access means call i.

        ``tracer.iter[:]`` is every step that runs, ``tracer.iter[[0, 2]]`` a list, and
        ``with tracer.iter[1:3]:`` a block recorded once for steps 1 and 2 (see :mod:`.steps`).
        """
        return Steps(self)

    def cache(self, modules: Any = None, include_inputs: bool = False) -> caches.Cache:
        """Keep the output of every module (or of ``modules``: envoys or paths), and with
        ``include_inputs`` its ``input``/``inputs``; after the trace the returned
        :class:`~.cache.Cache` holds them by path (in generation, one value per step).

        Raises:
            AttributeError: a path names no module of the model (the message suggests some).
        """
        return caches.record(self, modules, include_inputs)

    def stop(self) -> None:
        """End the run once everything recorded so far has run (see :mod:`.stop`)."""
        stopping.record(self)

    def next(self) -> None:
        """Module accesses from here on mean the next step (call) of each module."""
        steps.advance(self)

    @property
    def result(self) -> Any:
        """Inside the block: the run's return value (for ``generate``, the generated ids).

        After a ``blocking=False`` block: the method that waits for the job and returns the
        saved values in save order (``job.result()``).
        """
        if self.state is State.RECORDING:
            return self.read("", "result")
        return self._wait

    # -- recording --------------------------------------------------------------------------
    def read(self, path: str, op: str) -> Proxy:
        self._check_recording()
        node = self.graph.add(op, path, call=self.call, rows=self.rows, site=_site())
        return OpenProxy.of(self, node.id)

    def weight(self, path: str) -> Proxy:
        """A model parameter or buffer (``lm.lm_head.weight``), read-only inside the trace."""
        self._check_recording()
        return Proxy.of(self, self.graph.add("weight", path, site=_site()).id)

    def write(self, path: str, op: str, value: Any) -> None:
        self._check_recording()
        arg = to_graph(value, self, [])
        self.graph.add(op, path, (arg,), call=self.call, rows=self.rows, site=_site())

    def _routed(self) -> Any:
        """The trace where an op on this (ended) trace's proxies records now: in an open
        session, the session's current trace or code; else ``None``."""
        session = self.session
        if self.state is not State.RECORDING and session is not None and session.open:
            return session.recording()
        return None

    def apply(
        self, op: str, target: str, args: tuple, kwargs: dict | None = None, depth: int = 1
    ) -> Any:
        """Record ``op`` (or, after the block, compute it on the real values).

        The path every recorded op takes, so it is kept short: the op is checked against the
        allow-list once per name, and plain arguments are converted inline. ``depth``: how
        many frames up the user's line most likely is, for a caller that knows every frame
        below it is lazytensor's own (a proxy's method passes 2); the site is then one lookup
        instead of a walk of the stack, which still follows when that frame is not the user's.
        """
        if self.state is not _RECORDING:
            return self._apply_outside(op, target, args, kwargs)
        if target not in _ALLOWED.get(op, ()):
            _check_op(op, target)
        if kwargs and kwargs.get("out") is not None:
            raise TraceError(
                f"out= is not supported inside a trace (at {_site()}): it writes into a tensor "
                "behind the graph's back; assign the result instead, e.g. `y[:] = torch.add(a, b)`"
            )
        refs: list[int] = []
        graph_args = []
        for arg in args:
            kind = type(arg)
            if (kind is Proxy or kind is OpenProxy) and arg._trace is self:
                i = arg._node
                refs.append(i)
                try:
                    arg = _REFS[i]
                except IndexError:
                    arg = ref(i)
            elif kind not in _PLAIN_ARGS:
                arg = to_graph(arg, self, refs)
            graph_args.append(arg)
        graph_kwargs = to_graph(kwargs, self, refs) if kwargs else {}
        try:
            frame = _getframe(depth)
        except ValueError:  # fewer frames than depth: called from the top of the stack
            frame = _getframe(1)
        site = _KNOWN_SITES.get(frame.f_lasti)
        if site is None or site[0] is not frame.f_code:  # see site.KNOWN
            site = _site_at(frame)
        node = self.graph.add(op, target, tuple(graph_args), graph_kwargs, site=site)
        # the reads were collected while converting: no second walk
        node._deps = (refs[0],) if len(refs) == 1 else tuple(sorted(set(refs)))
        # Proxy.of(self, node.id), inline as in operator; what a tensor op makes is a Proxy
        if target == "operator.getitem":  # an index is a tensor when what it indexes is one
            made = Proxy() if type(args[0]) is Proxy else OpenProxy()
        elif op == "function" or op == "method":
            made = Proxy()
        else:
            made = OpenProxy()
        made._trace = self
        made._node = node.id
        return made

    def _operator_slowly(
        self, target: str, node: int, other: Any, reflected: bool, depth: int = 4
    ) -> Any:
        """A Python operator on proxy ``node`` that the proxy's own fast path (``proxy._operator``)
        does not take, through :meth:`apply` (``depth``: the user's frame, from :meth:`apply`)."""
        mine = Proxy.of(self, node)
        args = (other, mine) if reflected else (mine, other)
        return self.apply("function", target, args, depth=depth)

    def _apply_outside(self, op: str, target: str, args: tuple, kwargs: dict | None) -> Any:
        """``apply`` once the block has ended: in an open session, record where the session
        records now; after the run, compute on the real values; else refuse."""
        routed = self._routed()
        if routed is not None:
            return routed.apply(op, target, args, kwargs)
        if self.state is State.DONE:
            eager = Node(-1, op, target, tuple(to_values(args)), to_values(kwargs or {}))
            return evaluate(eager, (), [])
        self._check_recording()
        raise AssertionError("unreachable: a trace that is not recording refuses ops")

    def apply_torch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Record a call that reached ``__torch_function__``."""
        if self.state is State.DONE:
            return func(*to_values(args), **to_values(kwargs))
        return record_torch(self._routed() or self, func, args, kwargs)

    def apply_python(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        """Record a call of the user's own function (see :func:`lazytensor.apply`)."""
        if self.state is State.DONE:
            return fn(*to_values(args), **to_values(kwargs))
        self._check_recording()
        return record_python(self, fn, args, kwargs)

    def save(self, proxy: Proxy) -> None:
        if proxy._trace is not self:
            raise TraceError("this proxy belongs to another trace")
        if self.state is State.RECORDING or (self.session is not None and self.session.open):
            self.graph.save(proxy._node)

    def backward(self, loss: Proxy, *args: Any, **kwargs: Any) -> gradients.Backward:
        """``loss.backward()``: record a backward pass (see :mod:`.gradients`)."""
        return gradients.backward(self._routed() or self, loss, *args, **kwargs)

    # -- policy: attributes, materialization, shapes ------------------------------------------
    def attribute(self, proxy: Proxy, name: str) -> Any:
        if name in PLAIN_METHODS and self.state is _RECORDING:  # h.sum: the common case
            method = _object_new(Method)  # Method(self, proxy, name), without __init__
            method.trace, method.proxy, method.name = self, proxy, name
            return method
        routed = self._routed()
        if routed is not None and name not in _META_ATTRIBUTES and name not in _META_METHODS:
            return routed.attribute(proxy, name)
        if name == "grad" and self.state is State.RECORDING:
            return gradients.read(self, proxy)
        if name == "backward" and self.state is State.RECORDING:
            return lambda *args, **kwargs: self.backward(proxy, *args, **kwargs)
        if self.state is not State.RECORDING and routed is None:  # DONE answers; FAILED raises
            return getattr(self.value_of(proxy), name)
        if name in _META_ATTRIBUTES or name in _META_METHODS:
            return getattr(self.meta(proxy), name)
        if name in _VALUE_METHODS:
            return lambda *a, **k: self.materialize(proxy, lambda v: getattr(v, name)(*a, **k))
        if ops.is_method(name):
            PLAIN_METHODS.add(name)  # recording, and none of the names above
            return Method(self, proxy, name)
        return self.apply("getattr", ops.check_attribute(name), (proxy,), depth=3)

    def set_attribute(self, proxy: Proxy, name: str, value: Any) -> None:
        if name == "grad" and (self.state is State.RECORDING or self._routed() is not None):
            gradients.write(self._routed() or self, proxy, value)
            return
        raise TraceError(
            f"cannot set attribute {name!r} on a proxy at {_site()}; "
            "assign to a module's .output/.input instead"
        )

    def call_value(self, proxy: Proxy, args: tuple, kwargs: dict) -> Any:
        if self.state is State.DONE:
            return self.value_of(proxy)(*args, **kwargs)
        node = self.graph.nodes[proxy._node]
        if node.op == "getattr" and callable(getattr(torch.Tensor, node.target, None)):
            ops.check_method(node.target)  # a tensor method outside the allow-list
        raise TraceError(f"a proxy is not callable inside a trace (at {_site()})")

    def value_of(self, proxy: Proxy) -> Any:
        i = proxy._node
        if self.state is State.DONE:
            if i in self.values:
                return steps.value(self, i)
            raise TraceError(
                f"the value recorded at {self.graph.sites[i]} was not saved: "
                "call .save() on it inside the trace to read it afterwards"
            )
        if self.state is State.FAILED:
            raise TraceError("the trace failed, so it has no values")
        if self.session is not None and self.session.open:
            self.session.refuse_value("reading a value")
        if self.state is State.SUBMITTED:
            self._wait()
            return self.value_of(proxy)
        return self.materialize(proxy, lambda v: v)

    def length(self, proxy: Proxy) -> int:
        if self.state is not State.RECORDING:
            return len(self.value_of(proxy))
        return len(self.meta(proxy))

    def materialize(self, proxy: Proxy, how: Any) -> Any:
        """A sync point: run the graph so far until ``proxy`` exists, return ``how(value)``."""
        if self.state is not State.RECORDING:
            return how(self.value_of(proxy))
        if self.scan:
            scans.refuse_values(self)
        site = _site()
        if self.session is not None:
            self.session.refuse_value("reading a real value")
        if self.strict:
            raise StrictModeError(
                f"materialization at {site}: reading a real value inside a strict trace "
                "runs the model early; save it and read it after the trace, or drop strict=True"
            )
        if site not in self._warned and not self.lazy:
            self._warned.add(site)
            log.warning(
                "%s: reading a real value inside a trace runs the forward pass up to "
                "it now (a sync point); save it and read it after the trace to avoid "
                "the extra pass",
                site,
            )
        i = proxy._node
        if i not in self.synced:
            self.synced[i] = self._run(self.graph.prefix(i), stop_at=i)[i]
            if self.lazy:  # a lazy result is the real thing from its first use on
                publish(user_frame(), self.synced, self, [])
        return how(self.synced[i])

    def meta(self, proxy: Proxy) -> Any:
        """A fake (shape-only) value for ``proxy``, computed without running the model."""
        if proxy._node in self.synced:
            return self.synced[proxy._node]
        if self.shapes is None:
            self.shapes = Shapes(self)
        return self.shapes.of(proxy._node)

    # -- running --------------------------------------------------------------------------
    def _batch(self) -> Batch:
        if not self.parts:
            raise TraceError(
                "this trace has no inputs: pass them to .trace(...) or to an "
                "invoke, e.g. `with tracer.invoke(prompt):`"
            )
        return self.inputs.batch(self.parts, generate=self.generate, options=self.options)

    def _run(self, graph: Graph, stop_at: int | None = None, fake_mode: Any = None) -> dict:
        """Run ``graph`` on the backend (shape-only under ``fake_mode``), recording paused."""
        try:
            with self._paused():
                request = RunRequest(graph, self._batch(), stop_at, fake_mode, compile=self.compile)
                return self.backend.run(request)
        except NodeFailure as failure:
            raise self._at_site(failure) from failure.error

    def _at_site(self, failure: NodeFailure) -> BaseException:
        return at_site(failure.error, self.graph.sites[failure.node], failure.hint)

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        """Let torch calls run for real (the model's own ``torch.arange``...), not record.

        No trace is current meanwhile, so the recorder of an enclosing trace stands aside too.
        """
        token = enter(None)
        mode = self._mode
        paused = mode.paused if mode is not None else False
        if mode is not None:  # a lazy trace records outside any block, without a mode
            mode.paused = True
        try:
            yield
        finally:
            if mode is not None:
                mode.paused = paused
            leave(token)
