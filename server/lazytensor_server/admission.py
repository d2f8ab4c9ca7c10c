"""Admission: what a job will cost, known before it runs, and held to the limits while it runs.

Before a job runs, its worker replays the graph shape-only (an :class:`Executor` with
``fake_mode``: tensors with shapes and no data; for generation, the prompt step and one
decoding step) and measures, node by node, the bytes of every new tensor the graph's own ops
make, freeing them as the real run does (:mod:`.footprint`: with a backward pass, what
autograd keeps and the gradients it makes; trainable tensors and optimizer state). A session
is replayed whole, its segments in order (session code too) sharing what outlives each one:
carried values, trainable tensors, their gradients and optimizer states. The peak is an
estimate of what the job allocates beyond the model's own forward, and what the saved values
will hold (a saved value of every generation step counts once per step). A job over
``--max-memory`` or ``--max-saved-bytes`` is refused there, with a :class:`LimitExceeded`
naming the node, its op and the flag, before any of it runs. The estimate is cached by graph
structure and input shapes, so a repeated experiment pays for the pass once.

While it runs, every op is held to ``--max-memory`` from its arguments before it allocates
(:mod:`lazytensor.runtime.bounds`, for the sizes only the run knows: after an op whose output
shape depends on values, where the shape-only pass stops) and the time limit is checked
between nodes. The values a job saves count strings and integers as well as tensors.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from lazytensor.core import tree
from lazytensor.core.errors import LimitExceeded, NodeFailure, OpNotAllowedError
from lazytensor.core.graph import GRADIENTS, STATE, Batch, Graph, Segment
from lazytensor.protocol import messages as m
from lazytensor.runtime import bounds, fake, session
from lazytensor.runtime.device import device_of
from lazytensor.runtime.plan import Plan

from .footprint import MAKES, Ledger, Sizer, nbytes
from .limits import Limits

log = logging.getLogger("lazytensor.server")

#: The longest string a graph argument may hold (einsum equations, names: a few characters).
MAX_STRING = 2**16
#: Ops that make state beyond the forward (a backward pass, trainable tensors, optimizers).
_STATEFUL = frozenset(GRADIENTS + STATE) - {"weight"}
#: Longest list of ints in a write's index that needs no shape-only pass.
LIST_INDEX = 4096
_CACHE_SIZE = 256
#: Ops (bare names) whose result holds no more than about their first input: unary maps,
#: reductions, normalizations, views, casts. Binary ops broadcast, so they are not here.
_CONTAINED = frozenset(
    """getitem setitem softmax log_softmax mean sum amax amin argmax argmin norm std var
    abs neg exp log sigmoid tanh relu gelu silu sqrt rsqrt square sign round nan_to_num isnan
    isinf isfinite cumsum logsumexp topk sort detach clone contiguous float half bfloat16
    double to cpu view reshape flatten transpose permute squeeze unsqueeze t
    size dim numel layer_norm rms_norm normalize""".split()
)


@dataclass(frozen=True)
class Estimate:
    """What a shape-only pass measured: peak bytes (at ``peak_node``) and saved bytes."""

    peak: int = 0
    peak_node: int | None = None  # where the bytes first went over --max-memory, or peaked
    saved: int = 0
    saved_node: int | None = None
    failure: NodeFailure | None = None  # a bound of lazytensor's own, hit in the pass
    peak_segment: int | None = None  # of a session: the segments of the nodes above
    saved_segment: int | None = None
    whole: bool = False  # the pass ran every node: no shape depends on values


_cache: OrderedDict[tuple, tuple[weakref.ref, Estimate]] = OrderedDict()
_lock = threading.Lock()


def admitted(worker: Any, jobs: list) -> list:
    """The ``jobs`` that pass admission; each refused one is reported to ``worker.done``.

    Runs on the worker's thread (the one that owns the model), and sets its thread's
    per-op bound to ``--max-memory`` for the runs that follow.
    """
    limits: Limits = worker.limits
    bounds.MAX_BYTES.set(limits.max_memory)
    kept = []
    for job in jobs:
        try:
            if not job.fake:
                job.shapes_known = admit(worker.served.module, job, limits,
                                         trusted=worker.trusted)  # fmt: skip
        except Exception as exc:  # refused: this job's failure only
            log.info("request %s refused at admission: %s", job.id[:12], exc)
            worker.served_count += 1
            worker.done(job, m.Failure.of(job.id, exc))
            continue
        kept.append(job)
    return kept


def admit(module: torch.nn.Module, job: Any, limits: Limits, *, trusted: bool) -> bool:
    """Refuse ``job`` (a :class:`~.worker.Job`) if a shape-only pass finds it over a limit.

    Returns:
        Whether every value's shape is known from the input shapes (the pass ran every node,
        or none of its ops needs one): what compiled replay asks (:mod:`.compiling`).

    Raises:
        NodeFailure: of a :class:`LimitExceeded` naming the node and the flag.
    """
    deadline = time.monotonic() + limits.max_seconds
    if job.segments:  # a session: replayed whole, since its segments share state
        graphs = [segment.graph for segment in job.segments]
        for index, graph in enumerate(graphs):
            try:
                check_arguments(graph, trusted)
            except NodeFailure as failure:
                failure.segment = index
                raise
        found = estimate_session(module, job.segments, limits, trusted, deadline)
        _check(graphs, found, limits)
        return found.whole
    check_arguments(job.graph, trusted)
    if not needs_pass(job.graph, job.batch):  # the per-op bounds suffice
        return True
    found = estimate(module, job.graph, job.batch, limits, trusted, deadline)
    _check([job.graph], found, limits)
    return found.whole


def needs_pass(graph: Graph, batch: Batch) -> bool:
    """Whether ``graph`` may make more than it reads, so that only a shape-only pass knows.

    A graph of point reads and writes, attribute reads, slicing and ops whose result is no
    larger than their input (:data:`_CONTAINED`) holds at most a few copies of the values it
    reads; the per-op bounds hold it while it runs. Anything else (a factory, a binary op that
    broadcasts, a matmul, a module call, a value saved at every generation step, a backward
    pass, a trainable tensor) gets the pass.
    """
    for node in graph.nodes:
        if node.op in _STATEFUL:
            return True
        if node.op in ("function", "method"):
            name = node.target.rpartition(".")[2]
            if name not in _CONTAINED:
                return True
            if name == "getitem" and not all(map(_plain_index, node.args[1:2])):
                return True
            if name == "setitem" and not all(map(_small_write, node.args[1:2])):
                return True
        elif node.op in MAKES:
            return True
    if batch.generate:
        repeating = Plan.of(graph).repeating
        return any(i in repeating for i in graph.saved)
    return False


def _small_write(index: Any) -> bool:
    """An index for an in-place write that makes nothing big: a plain index, or one with
    lists of at most :data:`LIST_INDEX` ints (``x[:, -1, [7171, 2519]] = 5.0``: the write
    makes an index tensor of the list's length, and the target is written, not copied)."""
    if isinstance(index, tuple):
        return all(map(_small_write, index))
    if type(index) is list:
        return len(index) <= LIST_INDEX and all(type(i) is int for i in index)
    return _plain_index(index)


def _plain_index(index: Any) -> bool:
    """An index of ints, slices of ints, ``None`` and ``...``: a view, or one small write."""
    if isinstance(index, tuple):
        return all(map(_plain_index, index))
    if isinstance(index, slice):
        return all(v is None or isinstance(v, int) for v in (index.start, index.stop, index.step))
    return index is None or index is Ellipsis or isinstance(index, int)


def check_arguments(graph: Graph, trusted: bool) -> None:
    """Strings in a graph's arguments are short; bytes travel only as trusted user code."""
    for node in graph.nodes:
        for leaf in tree.leaves((node.args, node.kwargs)):
            if isinstance(leaf, str) and len(leaf) > MAX_STRING:
                error = LimitExceeded(
                    f"a string argument of {len(leaf):,} characters, over the bound of "
                    f"{MAX_STRING:,}; send data as tensors"
                )
                raise NodeFailure(node.id, error)
            if isinstance(leaf, bytes) and not (trusted and node.op == "python"):
                error = OpNotAllowedError("bytes arguments are user code: trusted servers only")
                raise NodeFailure(node.id, error)


def _check(graphs: list[Graph], est: Estimate, limits: Limits) -> None:
    """Raise the refusal ``est`` calls for; ``graphs`` are a session's segments, or one."""
    session = len(graphs) > 1 or est.peak_segment is not None
    if est.peak > limits.max_memory and est.peak_node is not None:
        node = graphs[est.peak_segment or 0].nodes[est.peak_node]
        failure = NodeFailure(
            est.peak_node,
            LimitExceeded(
                f"this request would hold about {est.peak:,} bytes of its own (the tensors it "
                "makes; what its backward passes keep; trainable tensors and their optimizer "
                f"state), over this server's limit of {limits.max_memory:,} (--max-memory) "
                f"once this node ({node.op} {node.target}) has run; compute on less data per "
                "request"
            ),
        )
        failure.segment = est.peak_segment if session else None
        raise failure
    if est.saved > limits.max_saved_bytes and est.saved_node is not None:
        failure = NodeFailure(
            est.saved_node,
            LimitExceeded(
                f"saved bytes would be about {est.saved:,}, over this server's limit of "
                f"{limits.max_saved_bytes:,} (--max-saved-bytes); save less, or slices of it"
            ),
        )
        failure.segment = est.saved_segment if session else None
        raise failure
    if est.failure is not None:  # a fresh exception: the estimate is cached
        found = est.failure
        failure = NodeFailure(found.node, found.error, found.hint)
        failure.segment = found.segment
        raise failure


def estimate(
    module: torch.nn.Module,
    graph: Graph,
    batch: Batch,
    limits: Limits,
    trusted: bool,
    deadline: float | None = None,
) -> Estimate:
    """The :class:`Estimate` of running ``graph`` on ``batch``, from the cache if known."""
    key = (id(module), graph.structure_key(), shapes(batch), trusted, limits.max_memory)
    return _cached(key, module, lambda: _measure(module, [Segment(graph, batch)], trusted,
                                                 deadline, limits))  # fmt: skip


def estimate_session(
    module: torch.nn.Module,
    segments: tuple[Segment, ...],
    limits: Limits,
    trusted: bool,
    deadline: float | None = None,
) -> Estimate:
    """The :class:`Estimate` of running a session's ``segments`` in order, from the cache if
    known: nodes are named with their segment (``peak_segment``, ``saved_segment``)."""
    structure = tuple(
        (s.graph.structure_key(), None if s.batch is None else shapes(s.batch)) for s in segments
    )
    key = (id(module), "session", structure, trusted, limits.max_memory)
    return _cached(key, module, lambda: _measure(module, list(segments), trusted, deadline, limits))


def _cached(key: tuple, module: torch.nn.Module, measure: Any) -> Estimate:
    """The estimate cached under ``key`` (which holds ``id(module)``) if it was made for this
    very module: a module that is gone may leave its id to another one (tests load many)."""
    with _lock:  # one worker thread per served model shares the cache
        found = _cache.get(key)
        if found is not None and found[0]() is module:
            _cache.move_to_end(key)
            return found[1]
    result = measure()
    with _lock:
        _cache[key] = (weakref.ref(module), result)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return result


def shapes(batch: Batch) -> str:
    """A key of ``batch``'s input shapes and dtypes (and its plain values)."""

    def shape(value: Any) -> Any:
        return (tuple(value.shape), str(value.dtype)) if isinstance(value, torch.Tensor) else value

    return repr((tree.map(shape, (batch.args, batch.kwargs)), batch.size, batch.generate))


def _measure(
    module: torch.nn.Module,
    segments: list[Segment],
    trusted: bool,
    deadline: float | None,
    limits: Limits,
) -> Estimate:
    """Replay ``segments`` shape-only: one trace, or a session's runs sharing a :class:`Ledger`."""
    mode, limit = fake.mode(), limits.max_memory
    ledger = Ledger(module, mode)
    device = device_of(module)
    sizers: list[Sizer] = []

    def execute(graph: Graph, batch: Batch | None, workspace: Any = None) -> dict[int, Any]:
        if workspace is not None:
            ledger.workspace = workspace  # the session's, which keeps its carried values
        plain = batch is None  # a session's own code
        run_on = Batch() if plain else _fake(batch, mode, device)
        sizer = Sizer(module, graph, run_on, fake_mode=mode, trusted=trusted,
                      deadline=deadline, ledger=ledger, limit=limit)  # fmt: skip
        sizers.append(sizer)
        return sizer.run_plain() if plain else sizer.run()

    failure, whole = None, False
    try:
        if len(segments) == 1 and segments[0].batch is not None:
            execute(segments[0].graph, segments[0].batch)
        else:
            session.run(segments, execute)
        # every node ran: a data-dependent op of the model's own ends a pass quietly
        whole = all(all(sizer.done) for sizer in sizers)
    except NodeFailure as exc:  # the pass ends here; the run itself fails here or is bounded
        if isinstance(exc.error, LimitExceeded):
            failure = exc
    except TimeoutError as exc:
        raise TimeoutError(
            f"{exc} while its shape-only admission pass ran: over this server's limit of "
            f"{limits.max_seconds:g} s (--max-seconds); ask for less work per request"
        ) from None
    except Exception as exc:  # what ran until here is measured; the run bounds the rest
        log.debug("shape-only pass stopped early: %s", exc)
    several = len(segments) > 1 or segments[0].batch is None
    return _combined(sizers, failure, session=several, whole=whole)


def _combined(
    sizers: list[Sizer], failure: NodeFailure | None, *, session: bool, whole: bool
) -> Estimate:
    """One estimate of the segments' passes: the highest peak, the saved bytes of all."""
    if not sizers:
        return Estimate(failure=failure, whole=whole)
    over = [i for i, sizer in enumerate(sizers) if sizer.over]
    top = over[0] if over else max(range(len(sizers)), key=lambda i: sizers[i].peak)
    peak = max(sizer.peak for sizer in sizers)
    saved, saved_node, saved_segment, largest = 0, None, None, -1
    for index, sizer in enumerate(sizers):
        total, node, size = _saved(sizer)
        saved += total
        if size > largest:
            largest, saved_node, saved_segment = size, node, index
    return Estimate(
        peak, sizers[top].peak_node, saved, saved_node, failure,
        top if session else None, saved_segment if session else None, whole,
    )  # fmt: skip


def _fake(batch: Batch, mode: Any, device: torch.device) -> Batch:
    def convert(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        with mode:
            return mode.from_tensor(value).to(device)

    return Batch(tree.map(convert, batch.args), tree.map(convert, batch.kwargs), batch.size,
                 batch.generate)  # fmt: skip


def _saved(sizer: Sizer) -> tuple[int, int | None, int]:
    """Bytes the saved values will hold (per generation step for a repeating one), the node
    of the largest, and its bytes."""
    steps = int(sizer.batch.kwargs.get("max_new_tokens", 1)) if sizer.batch.generate else 1
    total, largest, node = 0, -1, None
    for i in sizer.graph.saved:
        if not sizer.done[i]:
            continue
        size = nbytes(sizer.values[i]) * (steps if i in sizer.repeating else 1)
        total += size
        if size > largest:
            largest, node = size, i
    return total, node, largest
