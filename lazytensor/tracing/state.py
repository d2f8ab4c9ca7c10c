"""State: a trace's lifecycle, what it asks of a model's inputs, and which trace is current.

Tracing state is per thread and per context (:mod:`contextvars`): two threads, or two asyncio
tasks, recording at once never see each other's trace.
"""

from __future__ import annotations

import enum
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

from ..core.graph import Batch

if TYPE_CHECKING:
    from .trace import Trace

_current: ContextVar[Trace | None] = ContextVar("lazytensor_trace", default=None)


class State(enum.Enum):
    RECORDING = "recording"
    SUBMITTED = "submitted"
    DONE = "done"
    FAILED = "failed"


class Inputs(Protocol):
    """What a trace asks of a model about inputs (see :mod:`lazytensor.frontend.inputs`)."""

    def prepare(self, args: tuple, kwargs: dict) -> Any:
        """One invoke's inputs as a part with a ``size`` (its number of batch rows)."""

    def batch(self, parts: list, *, generate: bool, options: dict) -> Batch:
        """The parts of every invoke joined into the inputs of one run."""


def current() -> Trace | None:
    """The trace being recorded in this thread/context, if any."""
    return _current.get()


def enter(trace: Trace | None) -> Any:
    """Make ``trace`` current (``None``: none); returns the token :func:`leave` takes."""
    return _current.set(trace)


def leave(token: Any) -> None:
    _current.reset(token)
