"""Job: a trace opened with ``blocking=False``, as a job to poll, wait for or cancel.

At the end of its block such a trace submits its graph to its backend and becomes SUBMITTED;
:func:`wait` (``tracer.result()``, or reading a saved proxy) takes it to DONE or FAILED. A
trace used without a ``with`` block (``job = model.trace(x, blocking=False)``) is submitted on
first use, saving the model's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..backends.base import JobState, RunRequest
from ..core.errors import NodeFailure, TraceError
from .state import State

if TYPE_CHECKING:
    from .trace import Trace


def submit(trace: Trace) -> None:
    try:
        request = RunRequest(trace.graph, trace._batch(), compile=trace.compile)
        trace.job = trace.backend.submit(request)
    except BaseException:
        trace.state = State.FAILED
        raise
    trace.state = State.SUBMITTED


def status(trace: Trace) -> JobState | str:
    _submit_unentered(trace)
    if trace.job is None or trace.state is not State.SUBMITTED:
        return trace.state.value
    return trace.job.status()


def cancel(trace: Trace) -> bool:
    _submit_unentered(trace)
    if trace.job is None or trace.state is not State.SUBMITTED:
        return False
    cancelled = trace.job.cancel()
    if cancelled:
        trace.state, trace._cancelled = State.FAILED, True
    return cancelled


def wait(trace: Trace, timeout: float | None = None) -> list[Any]:
    """Wait for the job; the saved values in save order (saved names hold them from then on)."""
    _submit_unentered(trace)
    if trace.state is State.FAILED:
        what = "was cancelled" if trace._cancelled else "failed"
        raise TraceError(f"this trace's job {what}, so it has no values")
    if trace.state is State.SUBMITTED:
        try:
            trace.values = trace.job.result(timeout)
        except NodeFailure as failure:
            trace.state = State.FAILED
            raise trace._at_site(failure) from failure.error
        except BaseException:
            trace.state = State.FAILED
            raise
        trace._finish()
    return [trace.values[i] for i in trace.graph.saved if i in trace.values]


def _submit_unentered(trace: Trace) -> None:
    fresh = trace.state is State.RECORDING and trace._token is None and not trace.lazy
    if fresh and not trace.blocking and trace.parts:
        if not trace.graph.nodes:
            trace.save(trace.read("", "output"))
        submit(trace)
