"""State: a trace's lifecycle, what it asks of a model's inputs, and which trace is current.

Tracing state is per thread and per context (:mod:`contextvars`): two threads, or two asyncio
tasks, recording at once never see each other's trace.

While any trace block is open (recording, then running its graph), Python's cyclic garbage
collector waits (:func:`pause_collector`): a block of thousands of ops makes thousands of nodes
that live until it ends, and each automatic collection would walk every object of the process
(torch's and the model's too), costing more than the ops themselves. Reference counting still
frees what the block drops at once; the collector runs again when the last open block ends.
Blocks of several threads that overlap without end (a sweep on a thread pool) would keep it
off for good, so a block that ends while others are open collects once the collector has been
waiting :data:`LONGEST_PAUSE` seconds.
"""

from __future__ import annotations

import enum
import gc
import threading
import time
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


#: Seconds the collector may wait while blocks of several threads keep overlapping.
LONGEST_PAUSE = 5.0

_collector_lock = threading.Lock()
_open_blocks = 0  # trace blocks open in any thread
_collector_was_on = False  # whether the first of them found the collector enabled
_paused_since = 0.0  # when it last ran (or started to wait)


def pause_collector() -> None:
    """A trace block opens: the cyclic garbage collector waits until every open block ends."""
    global _open_blocks, _collector_was_on, _paused_since
    with _collector_lock:
        if _open_blocks == 0:
            _collector_was_on = gc.isenabled()
            _paused_since = time.monotonic()
            gc.disable()
        _open_blocks += 1


def resume_collector() -> None:
    """A trace block ends; the last one puts the collector back as the first one found it."""
    global _open_blocks, _paused_since
    with _collector_lock:
        _open_blocks -= 1
        if _open_blocks == 0 and _collector_was_on:
            gc.enable()
        elif _collector_was_on and time.monotonic() - _paused_since > LONGEST_PAUSE:
            _paused_since = time.monotonic()
            gc.collect()  # other threads' blocks are still open: collect now, not never
