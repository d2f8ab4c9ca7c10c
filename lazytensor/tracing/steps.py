"""Steps: ``tracer.iter[...]``, which generation steps (calls of each module) to record for.

Inside ``for step in tracer.iter[0:8]:`` every module access of the block means that module's
``step``-th call, so a generation's decoding steps can be read and edited one by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..core.errors import TraceError

if TYPE_CHECKING:
    from .trace import Trace


class Steps:
    """``tracer.iter[...]``: the generation steps (calls of each module) to record for."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def __getitem__(self, key: int | slice) -> Iterator[int]:
        if isinstance(key, int):
            return self._walk(range(key, key + 1))
        stop = key.stop
        if stop is None:
            stop = self.trace.options.get("max_new_tokens")
            if stop is None:
                raise TraceError("tracer.iter[...] needs a stop, e.g. tracer.iter[0:4]")
        return self._walk(range(key.start or 0, stop, key.step or 1))

    def _walk(self, steps: range) -> Iterator[int]:
        trace = self.trace
        for step in steps:
            previous, trace.call = trace.call, step
            try:
                yield step
            finally:
                trace.call = previous
