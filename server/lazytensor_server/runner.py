"""Runner: runs groups of jobs on a model, in the process that holds it.

A group is run as one forward pass over its jobs' rows (:mod:`.batching`); a job that cannot
share a forward runs alone. A failure of one job (a user error, out of memory, a timeout)
fails that job only: when a merged forward fails, the job whose node failed runs alone and the
others run again without it (once; after a second failure, or one no node owns, each job runs
alone), so every job gets the outcome it gets alone. A plain job that runs alone may run as
compiled replay, where the operator allows it (:mod:`.compiling`; a merged forward is always
eager). Outcomes are reported as data through
``done``. Whoever holds the runner (a worker thread, or a worker process: :mod:`.child`) is
told each run's deadline through ``watch`` before the run starts, so that it can stop a run
that overruns it in an op that never checks the clock.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lazytensor.core import tree
from lazytensor.core.errors import NodeFailure
from lazytensor.core.graph import Batch, Graph, Segment
from lazytensor.protocol import messages as m
from lazytensor.protocol.values import Record
from lazytensor.runtime import fake, session
from lazytensor.runtime.device import device_of, to_device
from lazytensor.runtime.executor import Executor

from . import admission, batching, compiling
from .limits import Limits, check

log = logging.getLogger("lazytensor.server")


@dataclass
class Job:
    """One accepted ``run`` request."""

    id: str
    owner: Any  # whose request: see Service._owner
    model: str
    graph: Graph
    batch: Batch
    stop_at: int | None
    fake: bool
    bytes_in: int
    segments: tuple[Segment, ...] = ()  # a session's runs (then ``graph`` is empty)
    received: float = field(default_factory=time.monotonic)
    started: float = 0.0
    cancelled: bool = False
    forward_rows: int = 0  # rows of the forward pass it ran in (with other jobs' rows)
    forward_jobs: int = 1  # jobs that shared that forward pass
    weight: float = 1.0  # its owner's share of turns (the key file's weight=)
    position: int | None = None  # the queue position its owner was last told
    frames: list | None = None  # the request as received: what a worker process decodes
    early: Any = None  # its worker process decoded it already (a .child.Early), or None
    compile: bool | str = False  # the client's wish for compiled replay (see .compiling)
    shapes_known: bool = False  # admission knew every value's shape from the inputs' shapes
    note: str = ""  # for its result: why a compile wish ran eagerly

    @functools.cached_property
    def group_key(self) -> tuple | None:
        """What another job must share to run in the same forward (``None``: runs alone)."""
        return batching.group_key(self)


class Runner:
    """Runs groups of jobs on ``served``'s model; ``done(job, message)`` gets each outcome."""

    def __init__(
        self,
        served: Any,  # a ServedModel, or what a worker process knows of it (.name, .module)
        limits: Limits,
        done: Callable[[Job, m.Message], None],
        trusted: bool = False,
    ) -> None:
        self.trusted = trusted
        self.served, self.limits, self.done = served, limits, done
        self.served_count = 0
        self.watch: Callable[[float], None] = _ignore  # told each run's deadline
        self.compiler = compiling.Compiler(limits)  # compiled replay of plain runs alone

    def _deadline(self) -> float:
        deadline = time.monotonic() + self.limits.max_seconds
        self.watch(deadline)
        return deadline

    def run_group(self, jobs: list[Job]) -> None:
        """Run ``jobs`` (compatible: :func:`.batching.group_key`) in one forward pass, or one
        alone; each outcome goes to ``done``."""
        self._deadline()  # admission's shape-only passes are held to the time limit too
        jobs = admission.admitted(self, jobs)  # shape-only pass: refuse what is over a limit
        messages = self._together(jobs) if len(jobs) > 1 else [self._alone(job) for job in jobs]
        for job, message in zip(jobs, messages):
            self.served_count += 1
            self.done(job, message)

    def _alone(self, job: Job) -> m.Message:
        job.forward_rows, job.forward_jobs = job.batch.size, 1
        try:
            values = self._run(job)
            return m.Result(job.id, values, job.note)
        except Exception as exc:  # one job's failure is that job's only
            return m.Failure.of(job.id, exc)

    def _together(self, jobs: list[Job], retry: bool = True) -> list[m.Message]:
        merged = batching.merge(jobs)
        for job in jobs:
            job.forward_rows, job.forward_jobs = merged.batch.size, len(jobs)
        module = self.served.module
        executor = batching.MergedExecutor(
            module,
            merged.graph,
            to_device(merged.batch, device_of(module)),
            trusted=self.trusted,
            deadline=self._deadline(),
        )
        try:
            values = batching.split(merged, jobs, executor.run())
        except NodeFailure as failure:
            if not retry:
                return [self._alone(job) for job in jobs]
            owner = merged.owner(failure.node)
            others = jobs[:owner] + jobs[owner + 1 :]
            log.info("request %s runs alone: %s", jobs[owner].id[:12], failure)
            messages = (
                self._together(others, False) if len(others) > 1 else [self._alone(others[0])]
            )
            messages.insert(owner, self._alone(jobs[owner]))
            return messages
        except Exception as exc:  # a limit, memory: each job on its own
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            log.info("a forward of %d requests failed (%s); each runs alone", len(jobs), exc)
            return [self._alone(job) for job in jobs]
        log.info("ran %d requests in one forward (%d rows)", len(jobs), merged.batch.size)
        messages: list[m.Message] = []
        for job, saved in zip(jobs, values):
            try:
                note = compiling.shared_note(job, self.limits, len(jobs))
                messages.append(m.Result(job.id, self._finish(job, saved), note))
            except Exception as exc:
                messages.append(m.Failure.of(job.id, exc))
        return messages

    def _run(self, job: Job) -> dict:
        module = self.served.module
        device = device_of(module)
        fake_mode = fake.mode() if job.fake else None
        deadline = self._deadline()  # for a whole session too

        def execute(graph: Graph, batch: Batch | None, workspace: Any = None) -> dict:
            if batch is None:  # a session's own code
                ex = Executor(module, graph, Batch(), trusted=self.trusted, deadline=deadline,
                              workspace=workspace)  # fmt: skip
                return ex.run_plain()
            executor = Executor(
                module,
                graph,
                to_device(batch, device),
                stop_at=job.stop_at,
                fake_mode=fake_mode,
                trusted=self.trusted,
                deadline=deadline,
                workspace=workspace,
            )
            return executor.run()

        try:
            if job.segments:
                runs = session.run(list(job.segments), execute)
                values: dict = {i: run for i, run in enumerate(runs)}
            else:
                found = self.compiler.run(module, job)
                values = execute(job.graph, job.batch) if found is None else found
        except TimeoutError as exc:
            raise TimeoutError(
                f"{exc}: over this server's limit of {self.limits.max_seconds:g} s "
                "(--max-seconds); ask for less work per request"
            ) from None
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            torch.cuda.empty_cache()
            raise MemoryError(
                f"the server ran out of memory for this request: {exc}; "
                "use a smaller batch or save less"
            ) from None
        return self._finish(job, values)

    def _finish(self, job: Job, values: dict) -> dict:
        """A job's saved values as the wire carries them, held to the saved-bytes limit."""
        if job.fake:
            return {i: _pack(v, _meta_leaf) for i, v in values.items()}
        values = {i: portable(v) for i, v in values.items()}
        check("saved bytes", _nbytes(values), self.limits.max_saved_bytes, "--max-saved-bytes")
        return values


def portable(value: Any) -> Any:
    """A saved value in a form the wire carries: CPU tensors, records, containers, scalars."""
    return _pack(value, _portable_leaf)


def _pack(value: Any, leaf: Any) -> Any:
    r"""``value`` rebuilt in one walk: mappings other than plain dicts (``ModelOutput``) as
    :class:`Record`\ s, containers as themselves, every other value through ``leaf``."""
    if isinstance(value, dict) and type(value) is not dict and not isinstance(value, Record):
        return Record(type(value).__name__, {k: _pack(v, leaf) for k, v in value.items()})
    if tree.is_container(value) and not isinstance(value, slice):
        return tree.rebuild(value, [_pack(v, leaf) for v in tree.children(value)])
    return leaf(value)


def _portable_leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (str, int, float, bool, type(None), torch.dtype, torch.device, slice)):
        return value
    return Record("Opaque", {"type": type(value).__name__})


def _meta_leaf(leaf: Any) -> Any:
    """A fake run's tensor as its shape: a ``TensorMeta`` record."""
    if isinstance(leaf, torch.Tensor):
        dtype = str(leaf.dtype).removeprefix("torch.")
        return Record("TensorMeta", {"shape": list(leaf.shape), "dtype": dtype,
                                     "device": str(leaf.device)})  # fmt: skip
    return _portable_leaf(leaf)


def _nbytes(value: Any) -> int:
    return admission.nbytes(value)  # strings and integers count too


def _ignore(deadline: float) -> None:
    pass
