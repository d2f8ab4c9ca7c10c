"""Admission: what a job will cost, known before it runs, and held to the limits while it runs.

Before a job runs, its worker replays the graph shape-only (an :class:`Executor` with
``fake_mode``: tensors with shapes and no data; for generation, the prompt step and one
decoding step) and measures, node by node, the bytes of every new tensor the graph's own ops
make, freeing them as the real run does. The peak is an estimate of what the graph allocates
beyond the model's own forward, and what the saved values will hold (a saved value of every
generation step counts once per step). A job over ``--max-memory`` or ``--max-saved-bytes``
is refused there, with a :class:`LimitExceeded` naming the node, its op and the flag, before
any of it runs. The estimate is cached by graph structure and input shapes, so a repeated
experiment pays for the pass once.

While it runs, every op is held to ``--max-memory`` from its arguments before it allocates
(:mod:`lazytensor.runtime.bounds`, for the sizes only the run knows: after an op whose output
shape depends on values, where the shape-only pass stops) and the time limit is checked
between nodes. The values a job saves count strings and integers as well as tensors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from lazytensor.core import tree
from lazytensor.core.errors import LimitExceeded, NodeFailure, OpNotAllowedError
from lazytensor.core.graph import Batch, Graph
from lazytensor.protocol import messages as m
from lazytensor.runtime import bounds, fake
from lazytensor.runtime.device import device_of
from lazytensor.runtime.executor import Executor
from lazytensor.runtime.plan import Plan

from .limits import Limits

log = logging.getLogger("lazytensor.server")

#: The longest string a graph argument may hold (einsum equations, names: a few characters).
MAX_STRING = 2**16
#: Ops whose results are new memory of the graph's own (not the model's values, not weights).
_MAKES = frozenset(("function", "method", "module", "parameter", "python"))
#: Session ops a shape-only pass cannot replay on its own (they read the session's state).
_STATEFUL = frozenset(("carry", "optimizer", "optimize"))
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
    peak_node: int | None = None
    saved: int = 0
    saved_node: int | None = None
    failure: NodeFailure | None = None  # a bound of lazytensor's own, hit in the pass


_cache: OrderedDict[tuple, Estimate] = OrderedDict()
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
                admit(worker.served.module, job, limits, trusted=worker.trusted)
        except Exception as exc:  # refused: this job's failure only
            log.info("request %s refused at admission: %s", job.id[:12], exc)
            worker.served_count += 1
            worker.done(job, m.Failure.of(job.id, exc))
            continue
        kept.append(job)
    return kept


def admit(module: torch.nn.Module, job: Any, limits: Limits, *, trusted: bool) -> None:
    """Refuse ``job`` (a :class:`~.worker.Job`) if a shape-only pass finds it over a limit.

    Raises:
        NodeFailure: of a :class:`LimitExceeded` naming the node and the flag.
    """
    deadline = time.monotonic() + limits.max_seconds
    runs = [(s.graph, s.batch) for s in job.segments] or [(job.graph, job.batch)]
    for index, (graph, batch) in enumerate(runs):
        try:
            check_arguments(graph, trusted)
            if batch is None or any(n.op in _STATEFUL for n in graph.nodes):
                continue  # session code, or a trace that reads the session's state
            if needs_pass(graph, batch):  # else the per-op bounds suffice
                _check(graph, estimate(module, graph, batch, limits, trusted, deadline), limits)
        except NodeFailure as failure:
            failure.segment = index if job.segments else None
            raise


def needs_pass(graph: Graph, batch: Batch) -> bool:
    """Whether ``graph`` may make more than it reads, so that only a shape-only pass knows.

    A graph of point reads and writes, attribute reads, slicing and ops whose result is no
    larger than their input (:data:`_CONTAINED`) holds at most a few copies of the values it
    reads; the per-op bounds hold it while it runs. Anything else (a factory, a binary op that
    broadcasts, a matmul, a module call, a value saved at every generation step) gets the pass.
    """
    for node in graph.nodes:
        if node.op in ("function", "method"):
            name = node.target.rpartition(".")[2]
            if name not in _CONTAINED:
                return True
            if name in ("getitem", "setitem") and not all(map(_plain_index, node.args[1:2])):
                return True
        elif node.op in _MAKES:
            return True
    if batch.generate:
        repeating = Plan.of(graph).repeating
        return any(i in repeating for i in graph.saved)
    return False


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


def _check(graph: Graph, est: Estimate, limits: Limits) -> None:
    if est.peak > limits.max_memory and est.peak_node is not None:
        node = graph.nodes[est.peak_node]
        raise NodeFailure(
            est.peak_node,
            LimitExceeded(
                f"this request would hold about {est.peak:,} bytes of its own tensors once "
                f"this node ({node.op} {node.target}) has run, over this server's limit of "
                f"{limits.max_memory:,} (--max-memory); compute on less data per request"
            ),
        )
    if est.saved > limits.max_saved_bytes and est.saved_node is not None:
        raise NodeFailure(
            est.saved_node,
            LimitExceeded(
                f"saved bytes would be about {est.saved:,}, over this server's limit of "
                f"{limits.max_saved_bytes:,} (--max-saved-bytes); save less, or slices of it"
            ),
        )
    if est.failure is not None:
        failure = est.failure
        raise NodeFailure(failure.node, failure.error, failure.hint)


def estimate(
    module: torch.nn.Module,
    graph: Graph,
    batch: Batch,
    limits: Limits,
    trusted: bool,
    deadline: float | None = None,
) -> Estimate:
    """The :class:`Estimate` of running ``graph`` on ``batch``, from the cache if known."""
    key = (id(module), graph.structure_key(), _shapes(batch), trusted, limits.max_memory)
    with _lock:  # one worker thread per served model shares the cache
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
    result = _measure(module, graph, batch, trusted, deadline, limits.max_seconds)
    with _lock:
        _cache[key] = result
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return result


def _shapes(batch: Batch) -> str:
    def shape(value: Any) -> Any:
        return (tuple(value.shape), str(value.dtype)) if isinstance(value, torch.Tensor) else value

    return repr((tree.map(shape, (batch.args, batch.kwargs)), batch.size, batch.generate))


def _measure(
    module: torch.nn.Module,
    graph: Graph,
    batch: Batch,
    trusted: bool,
    deadline: float | None,
    seconds: float,
) -> Estimate:
    mode = fake.mode()
    sizer = _Sizer(
        module, graph, _fake(batch, mode, device_of(module)), fake_mode=mode,
        trusted=trusted, deadline=deadline,
    )  # fmt: skip
    failure = None
    try:
        sizer.run()
    except NodeFailure as exc:  # the pass ends here; the run itself fails here or is bounded
        if isinstance(exc.error, LimitExceeded):
            failure = exc
    except TimeoutError as exc:
        raise TimeoutError(
            f"{exc} while its shape-only admission pass ran: over this server's limit of "
            f"{seconds:g} s (--max-seconds); ask for less work per request"
        ) from None
    except Exception as exc:  # what ran until here is measured; the run bounds the rest
        log.debug("shape-only pass stopped early: %s", exc)
    return Estimate(sizer.peak, sizer.peak_node, *_saved(sizer), failure)


def _fake(batch: Batch, mode: Any, device: torch.device) -> Batch:
    def convert(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        with mode:
            return mode.from_tensor(value).to(device)

    return Batch(tree.map(convert, batch.args), tree.map(convert, batch.kwargs), batch.size,
                 batch.generate)  # fmt: skip


def _saved(sizer: _Sizer) -> tuple[int, int | None]:
    """Bytes the saved values will hold (per generation step for a repeating one)."""
    steps = int(sizer.batch.kwargs.get("max_new_tokens", 1)) if sizer.batch.generate else 1
    total, largest, node = 0, -1, None
    for i in sizer.graph.saved:
        if not sizer.done[i]:
            continue
        size = nbytes(sizer.values[i]) * (steps if i in sizer.repeating else 1)
        total += size
        if size > largest:
            largest, node = size, i
    return total, node


class _Sizer(Executor):
    """A shape-only replay that counts the live bytes of the tensors the graph makes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.live = self.peak = 0
        self.peak_node: int | None = None
        self.sizes: dict[int, int] = {}  # storage -> its bytes if the graph made it, else 0
        self.refs: dict[int, int] = {}  # storage -> live nodes holding a tensor on it
        self.held: dict[int, tuple[list[int], int]] = {}  # node -> (storages, Python bytes)

    def _run_node(self, i: int) -> None:
        super()._run_node(i)
        self._hold(i)
        for d in self.deps[i]:
            if self.values[d] is None:
                self._release(d)
        if not self.users[i] and i not in self.keep and i not in self.repeating:
            self._release(i)  # the real run drops it at once

    def _reset(self, start: int) -> None:
        super()._reset(start)
        for i in [i for i in self.held if self.values[i] is None]:
            self._release(i)

    def _hold(self, i: int) -> None:
        makes = self.graph.nodes[i].op in _MAKES
        storages, python = [], 0
        for leaf in tree.leaves(self.values[i]):
            if isinstance(leaf, torch.Tensor):
                key, size = _storage(leaf)
                if key not in self.sizes:
                    self.sizes[key] = size if makes else 0
                count = self.refs.get(key, 0)
                if key not in storages:
                    storages.append(key)
                    self.refs[key] = count + 1
                    if count == 0:
                        self.live += self.sizes[key]
            elif makes and isinstance(leaf, (str, bytes, int)):
                python += _python_bytes(leaf)
        self.live += python
        self.held[i] = (storages, python)
        if self.live > self.peak:
            self.peak, self.peak_node = self.live, i

    def _release(self, i: int) -> None:
        storages, python = self.held.pop(i, ((), 0))
        self.live -= python
        for key in storages:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                self.live -= self.sizes[key]


def _storage(t: torch.Tensor) -> tuple[int, int]:
    try:
        storage = t.untyped_storage()
        return storage._cdata, storage.nbytes()
    except Exception:  # no storage (a nested or sparse tensor): count it on its own
        return id(t), t.numel() * t.element_size()


def _python_bytes(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    return value.bit_length() // 8 + 1 if isinstance(value, int) else 0


def nbytes(value: Any) -> int:
    """The bytes of the values in ``value``: tensors, and strings, bytes and integers too."""
    total = 0
    for leaf in tree.leaves(value):
        if isinstance(leaf, torch.Tensor):
            total += leaf.numel() * leaf.element_size()
        else:
            total += _python_bytes(leaf)
    return total
