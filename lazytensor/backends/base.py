"""Backend: where a recorded graph runs. A trace knows only this interface.

A :class:`Backend` runs a :class:`RunRequest` (a graph, the batch it runs on, where to stop, or
a shape-only pass) either at once (:meth:`Backend.run`) or as a :class:`Job` to poll and wait
for (:meth:`Backend.submit`). :mod:`.local` runs graphs in this process; :mod:`.remote` sends
them to a server. A job's life is a :class:`JobState`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.graph import Batch, Graph, Segment


class JobState(str, enum.Enum):
    """Where a job is. Compares equal to its value (``JobState.QUEUED == "queued"``)."""

    SENT = "sent"
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "error"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RunRequest:
    """One run of a graph: ``stop_at`` ends it after that node (a materialization);
    ``fake_mode`` (a ``FakeTensorMode``) makes it a shape-only pass returning every value."""

    graph: Graph
    batch: Batch
    stop_at: int | None = None
    fake_mode: Any = None
    segments: tuple[Segment, ...] = ()  # a session: these runs in order, and no graph
    # compiled replay (lazytensor.runtime.compiled); a str names the backend. Remotely, where
    # the server's operator allows it (lazytensor serve --compile), else eager with a note.
    compile: bool | str = False


class Job(Protocol):
    """A submitted run."""

    def status(self) -> JobState:
        """The job's state now (asks the server without waiting, for a remote job)."""

    def result(self, timeout: float | None = None) -> dict[int, Any]:
        """Wait for the job; node id -> value for the saved nodes. Raises its failure."""

    def cancel(self) -> bool:
        """Stop the job if it has not started; whether it was stopped."""


class Backend(Protocol):
    """Runs graphs somewhere."""

    def run(self, request: RunRequest) -> dict[int, Any]:
        """Run at once and wait: node id -> value (saved nodes; every node for a fake run)."""

    def submit(self, request: RunRequest) -> Job:
        """Start a run and return its job without waiting."""

    def run_session(self, segments: list[Segment]) -> list[dict[int, Any]]:
        """Run a session's segments as one job; per segment, its saved values."""
