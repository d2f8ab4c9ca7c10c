"""Steps: which generation steps (calls of each module) what a trace records applies to.

``tracer.iter[...]`` selects steps, in a ``for`` loop or as a block::

    for step in tracer.iter[0:4]: ...        # the body is recorded once per step, for it alone
    for step in tracer.iter[[0, 2]]: ...     # a list of steps, the same way
    for _ in tracer.iter[:]: ...             # every step that runs: the body is recorded once
    with tracer.iter[1:3]: ...               # recorded once, applies at steps 1 and 2
    with tracer.all(): ...                   # every step (``for _ in tracer.all()`` too)

``tracer.next()`` moves later module accesses on to the next step.

A block recorded once for several steps runs at each of them. What its saved values become
after the trace is what they would be had the body run at every step: a list the body appends
to holds one value per step that ran, in order; a name holds the last step's value. In
generation, a value saved for a step that never ran (generation stopped early, at an
end-of-sequence token) raises a :class:`~lazytensor.core.errors.TraceError` naming its line
when it is read, and the trace logs how many steps ran.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..core.errors import TraceError
from ..runtime.calls import NotRun, per_call
from ..runtime.plan import Plan

if TYPE_CHECKING:
    from .trace import Trace

log = logging.getLogger("lazytensor")


class Steps:
    """``tracer.iter[...]``: the generation steps (calls of each module) to record for."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def __getitem__(self, key: int | slice | list[int] | range) -> Selection:
        if isinstance(key, slice):
            return _from_slice(self.trace, key)
        if isinstance(key, bool) or not isinstance(key, (int, list, tuple, range)):
            raise TraceError(
                f"tracer.iter[...] takes a step, a slice or a list of steps, not a "
                f"{type(key).__name__}"
            )
        steps = [key] if isinstance(key, int) else list(key)
        if not steps or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            raise TraceError(f"tracer.iter[{key!r}]: steps are ints, and at least one")
        _check_steps(min(steps), key)
        return Selection(self.trace, steps)


class Selection:
    """Some steps: iterate over it (a ``for`` loop) or enter it (a ``with`` block)."""

    def __init__(self, trace: Trace, steps: list[int] | None, call: Any = None) -> None:
        self.trace, self.steps, self.call = trace, steps, call

    def __iter__(self) -> Iterator[Any]:
        if self.steps is None:  # no end: the body is recorded once, for every step
            return self._walk([self.call], EveryStep(self.call))
        return self._walk(self.steps, None)

    def _walk(self, steps: list, marker: EveryStep | None) -> Iterator[Any]:
        trace = self.trace
        trace._check_recording()
        for step in steps:
            previous, trace.call = trace.call, step
            try:
                yield step if marker is None else marker
            finally:
                trace.call = previous

    def __enter__(self) -> None:
        trace = self.trace
        trace._check_recording()
        self._previous, trace.call = trace.call, self._block_call()

    def __exit__(self, *exc: Any) -> None:
        self.trace.call = self._previous

    def _block_call(self) -> Any:
        """The node call of a block over these steps: one step, or a range."""
        if self.steps is None:
            return self.call
        steps = self.steps
        if len(steps) == 1:
            return steps[0]
        step = steps[1] - steps[0]
        if step > 0 and all(b - a == step for a, b in zip(steps, steps[1:])):
            return (steps[0], steps[-1] + 1, step)
        raise TraceError(
            f"`with tracer.iter[{steps!r}]:` needs evenly spaced, increasing steps; "
            f"iterate over them instead: `for step in tracer.iter[{steps!r}]:`"
        )


class EveryStep:
    """What ``for step in tracer.iter[a:]`` yields: the body is recorded once for every step,
    so ``step`` has no single value to compare or index with."""

    def __init__(self, call: tuple) -> None:
        self.call = call

    def __repr__(self) -> str:
        start, _, step = self.call
        return f"<every step from {start}{'' if step == 1 else f', every {step}'}>"

    def _refuse(self, *_: Any) -> Any:
        raise TraceError(
            "inside `for step in tracer.iter[a:]` (no end) the body is recorded once for every "
            "step, so `step` has no value; to branch on or index by the step, give the range "
            "an end: `tracer.iter[0:8]`"
        )

    __index__ = __int__ = __bool__ = __eq__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = None  # type: ignore[assignment]


def _from_slice(trace: Trace, key: slice) -> Selection:
    start, stop, step = key.start or 0, key.stop, 1 if key.step is None else key.step
    for bound in (start, stop, step):
        if bound is not None and not (isinstance(bound, int) and not isinstance(bound, bool)):
            raise TraceError(f"tracer.iter[{_show(key)}]: slice bounds are ints")
    _check_steps(min(start, start if stop is None else stop), key)
    if step < 1:
        raise TraceError(f"tracer.iter[{_show(key)}]: the step must be 1 or more")
    if stop is None:
        return Selection(trace, None, (start, None, step))
    if stop <= start:
        raise TraceError(
            f"tracer.iter[{_show(key)}] selects no step: its end is not after its start"
        )
    return Selection(trace, list(range(start, stop, step)))


def _check_steps(lowest: int, key: Any) -> None:
    if lowest < 0:
        shown = _show(key) if isinstance(key, slice) else repr(key)
        raise TraceError(
            f"tracer.iter[{shown}]: steps count from 0 and cannot be negative (the number of "
            "steps a generation runs is known only once it ran); use tracer.iter[:] for every "
            "step that runs"
        )


def _show(key: slice) -> str:
    parts = ["" if v is None else str(v) for v in (key.start, key.stop)]
    return ":".join(parts) + ("" if key.step is None else f":{key.step}")


def advance(trace: Trace) -> None:
    """``tracer.next()``: later module accesses mean the next step."""
    trace._check_recording()
    if not isinstance(trace.call, int) or trace.call < 0:
        raise TraceError(
            "tracer.next() moves on from one step, but module accesses here already mean "
            "several steps (inside tracer.all() or a range of tracer.iter)"
        )
    trace.call += 1


# -- after a run -------------------------------------------------------------------------------
class PerStep(list):
    """A saved value of several steps: one value per step that ran, in order.

    In a list of the user's, the values take the saved proxy's place; a name holds the last.
    """


def received(trace: Trace) -> None:
    """Mark a run's values: per-step lists as :class:`PerStep`, never-run steps as
    :class:`~lazytensor.runtime.calls.NotRun` (and say how many steps ran)."""
    values, graph = trace.values, trace.graph
    ranged = per_call(graph, Plan.of(graph).repeating, values)
    missing = []
    for i, value in values.items():
        not_run = NotRun.of(value)
        if not_run is not None:
            values[i] = not_run
            missing.append(i)
        elif i in ranged and isinstance(value, list):
            values[i] = PerStep(value)
    if missing:
        steps = values[missing[0]]["steps"]
        log.warning(
            "%s: generation stopped after %d step(s); %d saved value(s) are of later steps, "
            "which never ran, and raise an error when read",
            graph.sites[missing[0]],
            steps,
            len(missing),
        )


def published(value: Any) -> tuple[bool, Any]:
    """What a name holding a saved proxy of ``value`` holds after the trace: ``(False, _)``
    when it keeps the proxy (whose reading raises)."""
    if isinstance(value, NotRun) or (isinstance(value, PerStep) and not value):
        return False, None
    return True, value[-1] if isinstance(value, PerStep) else value


def value(trace: Trace, i: int) -> Any:
    """The value of saved node ``i`` as a name would hold it; raises for steps never run."""
    found = trace.values[i]
    ok, value_ = published(found)
    if ok:
        return value_
    if isinstance(found, NotRun):
        why = found.message()
    else:
        why = "none of the steps it was recorded for ran"
    raise TraceError(
        f"the value saved at {trace.graph.sites[i]} does not exist: {why}; read only the steps "
        "that ran (a list filled in `for _ in tracer.iter[:]` holds exactly those)"
    )
