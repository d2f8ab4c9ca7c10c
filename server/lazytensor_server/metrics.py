"""Metrics: what the server is doing, for Prometheus (``lazytensor serve --metrics-port``).

One :class:`Metrics` owns its own ``CollectorRegistry`` (nothing is registered globally at
import). The service reports every request's outcome, refusals by reason, and each job's wait
and run time; queue depth is read from the workers when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Metrics:
    """The server's counters, gauges and histograms, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lazytensor_requests", "Requests handled, by kind and outcome", ["kind", "outcome"],
            registry=r,
        )  # fmt: skip
        self.refused = Counter(
            "lazytensor_refused", "Requests refused before running, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.wait = Histogram(
            "lazytensor_wait_seconds", "Time a job waited in its queue", ["model"], registry=r
        )
        self.run = Histogram(
            "lazytensor_run_seconds", "Time a job ran on its model", ["model"], registry=r
        )
        self.rows = Histogram(
            "lazytensor_batch_rows", "Batch rows per forward pass", ["model"], registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )  # fmt: skip
        self.jobs = Histogram(
            "lazytensor_forward_jobs", "Requests that shared each request's forward pass",
            ["model"], registry=r, buckets=(1, 2, 4, 8, 16, 32, 64),
        )  # fmt: skip
        self._queue = Gauge(
            "lazytensor_queue_depth", "Jobs waiting for a model", ["model"], registry=r
        )

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the model's queue depth at every scrape."""
        self._queue.labels(model).set_function(depth)

    def finished(self, job: Any, kind: str) -> None:
        self.requests.labels("run", kind).inc()
        self.wait.labels(job.model).observe(max(0.0, job.started - job.received))
        if job.started:
            self.run.labels(job.model).observe(max(0.0, time.monotonic() - job.started))
            self.rows.labels(job.model).observe(job.forward_rows or job.batch.size)
            self.jobs.labels(job.model).observe(job.forward_jobs)

    def text(self) -> str:
        """The metrics in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, port: int, host: str) -> None:
        """Serve the metrics over HTTP at ``http://host:port/metrics`` (a daemon thread)."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)
