"""Worker: the thread that takes a model's jobs off its queue and has them run.

A worker takes groups of jobs off its :class:`~.scheduler.FairQueue` (round robin across
owners, at most one job per owner in a group, :meth:`Worker._fits`) and runs each group as one
forward pass (:class:`~.runner.Runner`). Where it runs them is the server's choice:

* on this thread (``isolate=False``: the embedded server, tests), or
* in a worker process (``isolate=True``, what ``lazytensor serve`` does: :mod:`.child`) that
  shares the loaded weights; a job past its time limit, in whatever op, is stopped by killing
  that process, and a fresh one takes the next job within a second, the model still loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from lazytensor.protocol import messages as m

from . import batching
from .child import RUNNING_AFTER, ChildProcess
from .limits import Limits
from .registry import ServedModel
from .runner import Job, Runner, portable
from .scheduler import FairQueue

__all__ = ["POSITIONS", "Job", "Worker", "portable"]

log = logging.getLogger("lazytensor.server")

#: How many waiting jobs are told their new queue position whenever a forward pass starts.
POSITIONS = 32


class Worker(Runner):
    """Runs jobs for one model from its own thread; ``done(job, message)`` gets each outcome
    (a message, or from a worker process an :class:`~.child.Encoded` one)."""

    def __init__(
        self,
        served: ServedModel,
        limits: Limits,
        done: Callable[[Job, m.Message], None],
        trusted: bool = False,
        isolate: bool = False,
    ) -> None:
        super().__init__(served, limits, done, trusted)
        self.queue = FairQueue()
        self.busy = False
        self.child: ChildProcess | None = None
        if isolate:
            try:
                self.child = ChildProcess(served, limits, trusted)
            except Exception as exc:  # e.g. a model that cannot be shared with a process
                log.warning(
                    "%s cannot run in a worker process (%s: %s); its jobs run on a thread, "
                    "where an op past --max-seconds cannot be stopped",
                    served.name,
                    type(exc).__name__,
                    exc,
                )
        #: The group running on this thread and since when (jobs run here, not in a process).
        self._since: tuple[list[Job], float] | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"worker-{served.name}", daemon=True
        )
        self._thread.start()
        if self.child is None:
            threading.Thread(
                target=self._announce, name=f"worker-{served.name}-running", daemon=True
            ).start()

    def submit(self, job: Job) -> int:
        """Queue ``job``; how many jobs run before it (0 = it runs next)."""
        return self.queue.put(job) + int(self.busy)

    def cancel(self, job: Job) -> bool:
        """Mark a job that has not started as cancelled (the loop skips it); whether it was."""
        if job.started or job.cancelled:
            return False
        job.cancelled = True
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Take no more jobs; wait up to ``timeout`` s for the running ones (a worker process
        still running then is killed)."""
        self.queue.close()
        self._stopped.set()
        self._thread.join(timeout)
        if self.child is not None:
            self.child.close(0.0 if self._thread.is_alive() else 5.0)
            self._thread.join(5.0)  # its killed job's failure is reported before we return

    def drain(self) -> list[Job]:
        """Remove and return every job still waiting."""
        return self.queue.drain()

    def _loop(self) -> None:
        while True:
            group = self.queue.get_group(self.limits.max_batch_jobs, self._fits)
            if not group:
                return
            self.busy = True
            self._tell_positions()
            try:
                self.run_batch(group)
            except Exception:  # a bug here must not stop the model from being served
                log.exception("worker %s failed a batch", self.served.name)
            finally:
                self.busy = False

    def _announce(self) -> None:
        """Tell "running" to the jobs of a group still running :data:`RUNNING_AFTER` s after it
        started on this thread, as a worker process does: most finish sooner, and a status sent
        meanwhile would take the GIL from the forward pass (the loop posting it) and wake the
        client, only to be followed by the result a moment later."""
        told = None
        while not self._stopped.wait(RUNNING_AFTER / 2):
            since = self._since
            if since is not None and since is not told:
                if time.monotonic() - since[1] >= RUNNING_AFTER:
                    told = since
                    self._running(since[0])

    def _tell_positions(self) -> None:
        """Stream queue positions: each of the first POSITIONS waiting jobs whose place moved
        is told its new one (jobs ahead of it, the running forward included)."""
        for job, index in self.queue.ahead(POSITIONS):
            if job.position != index + 1:
                job.position = index + 1
                self.done(job, m.Status(job.id, "queued", job.position))

    def _fits(self, group: list[Job], job: Job) -> bool:
        """Whether ``job`` may join ``group`` in one forward pass."""
        key = group[0].group_key
        if key is None or job.cancelled or job.group_key != key:
            return False
        rows = job.batch.size + sum(j.batch.size for j in group)
        return rows <= self.limits.max_batch and not any(
            batching.conflicts(j.graph, job.graph) for j in group
        )

    def _running(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.done(job, m.Status(job.id, "running"))

    def run_batch(self, jobs: list[Job]) -> None:
        """Run ``jobs`` (compatible, see :meth:`_fits`) in one forward pass, or one alone."""
        jobs = [job for job in jobs if not job.cancelled]
        for job in jobs:
            job.started = time.monotonic()
        if self.child is None:
            self._since = (jobs, time.monotonic())
            try:
                self.run_group(jobs)
            finally:
                self._since = None
            return
        self.served_count += len(jobs)
        answered: set[int] = set()

        def done(job: Job, message: Any) -> None:
            answered.add(id(job))
            self.done(job, message)

        try:  # a worker process tells "running" only to the jobs still running after a while
            self.child.run(jobs, done, self._running)
        except Exception:  # the worker process could not even be restarted
            log.exception("the worker process of %s failed", self.served.name)
            for job in jobs:
                if id(job) not in answered:
                    error = RuntimeError("the server's worker process failed; send it again")
                    self.done(job, m.Failure.of(job.id, error))
