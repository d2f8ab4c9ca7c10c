"""Worker: the one thread that owns a model's device and runs its jobs.

A worker takes a *batch* of jobs off its queue and runs them; today each batch runs its jobs
one after another (cross-user batching into one forward pass is the next step, and will live
in :meth:`Worker.run_batch`). A failure of one job (a user error, out of memory, a timeout)
fails that job only: the worker reports it as data and takes the next.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lazytensor import wire
from lazytensor.errors import NodeFailure
from lazytensor.executor import Batch, Executor
from lazytensor.graph import Graph

from .limits import LimitExceeded, Limits, check
from .registry import ServedModel

log = logging.getLogger("lazytensor.server")


@dataclass
class Job:
    """One accepted ``run`` request."""

    id: str
    key_name: str
    model: str
    graph: Graph
    batch: Batch
    stop_at: int | None
    fake: bool
    bytes_in: int
    received: float = field(default_factory=time.monotonic)
    started: float = 0.0


class Worker:
    """Runs jobs for one model on its own thread; ``done(job, kind, body)`` gets each outcome."""

    def __init__(
        self,
        served: ServedModel,
        limits: Limits,
        done: Callable[[Job, str, dict], None],
        max_batch: int = 1,
        trusted: bool = False,
    ) -> None:
        self.trusted = trusted
        self.served, self.limits, self.done = served, limits, done
        self.max_batch = max_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.served_count = 0
        self.busy = False
        self._thread = threading.Thread(
            target=self._loop, name=f"worker-{served.name}", daemon=True
        )
        self._thread.start()

    def waiting(self) -> int:
        """How many jobs run before one submitted now (0 = it runs next)."""
        return self.queue.qsize() + int(self.busy)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def stop(self, timeout: float | None = None) -> None:
        self.queue.put(None)
        self._thread.join(timeout)

    def drain(self) -> list[Job]:
        """Remove and return every job still waiting."""
        jobs = []
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    extra = self.queue.get_nowait()
                except queue.Empty:
                    break
                if extra is None:
                    self.queue.put(None)
                    break
                batch.append(extra)
            self.busy = True
            try:
                self.run_batch(batch)
            except Exception:  # a bug here must not stop the model from being served
                log.exception("worker %s failed a batch", self.served.name)
            finally:
                self.busy = False

    def run_batch(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.started = time.monotonic()
            self.done(job, "status", {"state": "running"})
            try:
                body = {"values": self._run(job)}
                kind = "result"
            except Exception as exc:  # one job's failure is that job's only
                kind, body = "error", error_body(exc)
            self.served_count += 1
            self.done(job, kind, body)

    def _run(self, job: Job) -> dict:
        module = self.served.module
        device = _device(module)
        batch = Batch(
            _to(job.batch.args, device),
            _to(job.batch.kwargs, device),
            job.batch.size,
            job.batch.generate,
        )
        fake_mode = None
        if job.fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        executor = Executor(
            module,
            job.graph,
            batch,
            stop_at=job.stop_at,
            fake_mode=fake_mode,
            trusted=self.trusted,
            deadline=time.monotonic() + self.limits.max_seconds,
        )
        try:
            values = executor.run()
        except TimeoutError as exc:
            raise TimeoutError(
                f"{exc}: over this server's limit of {self.limits.max_seconds:g} s "
                "(--max-seconds); ask for less work per request"
            ) from None
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise MemoryError(
                f"the GPU ran out of memory for this request: {exc}; "
                "use a smaller batch or save less"
            ) from None
        if job.fake:
            return {i: _meta(v) for i, v in values.items()}
        values = {i: portable(v) for i, v in values.items()}
        check("saved bytes", _nbytes(values), self.limits.max_saved_bytes, "--max-saved-bytes")
        return values


def error_body(exc: BaseException) -> dict:
    """An exception as data for the client."""
    if type(exc).__name__ == "UnknownRequest":
        return {"type": "KeyError", "message": str(exc.args[0]), "unknown": True}
    if isinstance(exc, NodeFailure):
        error = exc.error
        return {
            "type": type(error).__name__,
            "message": _text(error),
            "node": exc.node,
            "hint": exc.hint,
        }
    if isinstance(exc, LimitExceeded):
        return {"type": "LimitExceeded", "message": str(exc)}
    return {"type": type(exc).__name__, "message": _text(exc)}


def _text(exc: BaseException) -> str:
    """The message of ``exc`` (``str`` of a ``KeyError`` is the repr of its message)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def portable(value: Any) -> Any:
    """A saved value in a form the wire carries: CPU tensors, records, containers, scalars."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (str, int, float, bool, type(None), torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(portable(v) for v in value)
    if isinstance(value, dict):
        return (
            wire.Record(type(value).__name__, {k: portable(v) for k, v in value.items()})
            if type(value) is not dict
            else {k: portable(v) for k, v in value.items()}
        )
    return wire.Record("Opaque", {"type": type(value).__name__})


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return wire.Record(
            "TensorMeta",
            {
                "shape": list(value.shape),
                "dtype": str(value.dtype).removeprefix("torch."),
                "device": str(value.device),
            },
        )
    if isinstance(value, (tuple, list)):
        return type(value)(_meta(v) for v in value)
    if isinstance(value, dict):
        return wire.Record(type(value).__name__, {k: _meta(v) for k, v in value.items()})
    return portable(value)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _device(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
