"""Local: run graphs in this process, on the model's own device.

The backend gets its module through a callable, so a model built without weights
(``dispatch=False``) loads them at the first run, and moves the batch's tensors to wherever the
module's parameters live. A local job runs when its result is first asked for, so it can be
cancelled until then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.errors import TraceError
from ..core.graph import Batch, Graph, Segment
from ..runtime import compiled, session
from ..runtime.device import device_of, to_device
from ..runtime.executor import Executor
from .base import JobState, RunRequest


class LocalBackend:
    """Runs graphs on ``module()`` in this process (user code is trusted: it is the user's)."""

    def __init__(self, module: Callable[[], torch.nn.Module]) -> None:
        self.module = module

    def run(self, request: RunRequest) -> dict[int, Any]:
        module = self.module()
        batch = request.batch
        if request.fake_mode is None:
            batch = to_device(batch, device_of(module))
        plain = request.stop_at is None and request.fake_mode is None
        if plain and (request.compile or compiled.AUTO_AFTER is not None):
            values = compiled.PROGRAMS.run(module, request.graph, batch, request.compile)
            if values is not None:
                return values
        executor = Executor(
            module, request.graph, batch, stop_at=request.stop_at, fake_mode=request.fake_mode
        )
        return executor.run()

    def submit(self, request: RunRequest) -> LocalJob:
        return LocalJob(self, request)

    def run_session(self, segments: list[Segment]) -> list[dict[int, Any]]:
        module = self.module()
        device = device_of(module)

        def execute(graph: Graph, batch: Batch | None, workspace: session.Workspace) -> dict:
            if batch is None:
                return Executor(module, graph, Batch(), workspace=workspace).run_plain()
            batch = to_device(batch, device)
            return Executor(module, graph, batch, workspace=workspace).run()

        return session.run(segments, execute)


class LocalJob:
    """A local run, deferred until :meth:`result` is first called (:meth:`status` only looks)."""

    def __init__(self, backend: LocalBackend, request: RunRequest) -> None:
        self.backend, self.request = backend, request
        self.state = JobState.QUEUED
        self._values: dict[int, Any] | None = None
        self._error: BaseException | None = None

    def status(self) -> JobState:
        return self.state

    def result(self, timeout: float | None = None) -> dict[int, Any]:
        if self.state is JobState.QUEUED:
            self.state = JobState.RUNNING
            try:
                self._values = self.backend.run(self.request)
                self.state = JobState.COMPLETED
            except BaseException as exc:
                self._error, self.state = exc, JobState.FAILED
        if self.state is JobState.CANCELLED:
            raise TraceError("this job was cancelled before it ran")
        if self._error is not None:
            raise self._error
        assert self._values is not None
        return self._values

    def cancel(self) -> bool:
        if self.state is JobState.QUEUED:
            self.state = JobState.CANCELLED
            return True
        return False
