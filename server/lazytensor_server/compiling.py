"""Compiling: which of a server's jobs run as compiled replay, and what their clients hear.

A client asks for compiled replay (:mod:`lazytensor.runtime.compiled`) with
``trace(..., compile=True)`` or a backend's name, one of
:data:`~lazytensor.protocol.messages.COMPILE_BACKENDS` (a ``run`` request's ``compile``
field); the operator allows it with ``lazytensor serve --compile BACKENDS``
(:attr:`.limits.Limits.compile`, whose first backend ``compile=True`` means), and
``--compile-after N`` compiles any structure its worker has run N times, asked or not. A job
runs compiled only when all of these hold:

* it runs alone, in a worker process (:attr:`Compiler.killable`): compiling counts against
  ``--max-seconds``, and a compiled function never checks the clock, so only killing the
  process past the deadline stops it;
* it is a plain run or a generation: no ``stop_at``, no shape-only pass, no session;
* every node is one a compiled program expresses (:data:`OPS`; each module moment once, but
  in a generation at any steps), with keyword names that are ASCII identifiers (the only text
  of a graph the generated code spells);
* admission knew every value's shape from the inputs' shapes (:attr:`.runner.Job.shapes_known`):
  no size and no Python value depends on tensor values. A program is keyed by the graph's
  structure (its constants' shapes included) and the input shapes, so every run of it makes
  tensors of the shapes the first run made, which was an eager run under the per-op bounds
  (``--max-memory``) that the compiled function skips, and every run passed admission. A
  compiled generation (:mod:`lazytensor.runtime.generation`) runs the model on a static KV
  cache of the prompt and ``max_new_tokens`` (``--max-new-tokens`` bounds it): the model's own
  memory, which the eager run's cache reaches at its last step; its interventions see the
  shapes the eager run's steps made.

Otherwise the job runs eagerly, and one that asked is told why in its result's ``note``; so
does the first run of each structure (it records the schedule its next runs compile), a graph
the program generator turns down and a backend that fails.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import torch

from lazytensor.core.errors import NodeFailure
from lazytensor.protocol import messages as m
from lazytensor.runtime import compiled
from lazytensor.runtime.device import device_of, to_device

from . import admission
from .limits import Limits

log = logging.getLogger("lazytensor.server")

#: The ops a compiled program runs (``lazytensor.runtime.compiled``); a graph holding any
#: other (a module call, a gradient, user code) runs eagerly. ``tokens`` is a generation's.
OPS = frozenset(
    "input inputs output set_input set_output result tokens function method getattr".split()
)
#: Structures whose runs a worker counts (the oldest forgotten first); also the bound kept on
#: ``compiled.PROGRAMS.runs``, which counts every structure it was ever asked to run.
REMEMBERED = 256

_NOT_SERVED = "this server does not compile (its operator did not start it with --compile)"
_CANNOT = "compiled replay cannot express this graph (the server's log says why)"
_FIRST = (
    "the first run of this graph structure (with these input shapes) on the server runs "
    "eagerly and records its schedule; its next runs are compiled"
)


class Compiler:
    """The compiled replay of one worker's plain runs alone: the rules above, and each
    structure's runs counted (for ``--compile-after`` and the first run's note)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        #: Set in a worker process, which is killed when a run overruns its deadline.
        self.killable = False
        self.runs: OrderedDict[tuple, int] = OrderedDict()

    def run(self, module: torch.nn.Module, job: Any) -> dict | None:
        """The saved values of ``job`` (a :class:`.runner.Job`) from its compiled program, or
        ``None``: run it eagerly (``job.note`` says why, when it asked)."""
        allowed, after = self.limits.compile, self.limits.compile_after
        if job.compile is False and not (allowed and after):
            return None
        backend, why = self._backend(job.compile)
        if why is None:
            why = refusal(job)
        if why is None and not self.killable:
            why = "this server compiles only in worker processes (--workers process)"
        if why is not None:
            return _eager(job, why)
        try:
            key = (compiled.structure(job.graph, job.batch), admission.shapes(job.batch), backend)
        except Exception:  # an argument without a structure key
            return _eager(job, _CANNOT)
        runs = self._count(key)
        if job.compile is False and runs < after:
            return None
        batch, started = to_device(job.batch, device_of(module)), time.monotonic()
        try:
            values = compiled.PROGRAMS.run(module, job.graph, batch, backend)
        except (torch.cuda.OutOfMemoryError, MemoryError, NodeFailure):
            raise  # out of memory; or the eager first run's error, which names its node
        except Exception as exc:  # a backend's failure: the eager run says what is wrong
            return _eager(job, f"compiling with {backend} failed ({type(exc).__name__})")
        finally:
            _bound(compiled.PROGRAMS)
        if values is None:
            return _eager(job, _CANNOT)
        if job.compile is not False and runs == 1:
            job.note = _FIRST
        elif runs == (2 if job.compile is not False else after + 1):  # after the schedule's
            log.info("request %s: compiled a program with %s (%d nodes) in %.1f s", job.id[:12],
                     backend, len(job.graph.nodes), time.monotonic() - started)  # fmt: skip
        return values

    def _backend(self, wish: bool | str) -> tuple[str | None, str | None]:
        """The backend a job compiles with (a wish of ``False``: the operator's first), or
        why it does not."""
        allowed = self.limits.compile
        if not allowed:
            return None, _NOT_SERVED
        if wish is True or wish is False:
            return allowed[0], None
        if wish not in allowed:
            return None, f"this server compiles with {', '.join(allowed)} only, not {wish}"
        return wish, None

    def _count(self, key: tuple) -> int:
        runs = self.runs[key] = self.runs.pop(key, 0) + 1
        while len(self.runs) > REMEMBERED:
            self.runs.popitem(last=False)
        return runs


def refusal(job: Any) -> str | None:
    """Why ``job`` may not run compiled on a server (``None``: it may)."""
    if job.segments or job.fake or job.stop_at is not None:
        return "only plain runs compile (no materialization, shape pass or session)"
    steps = job.batch.generate  # a generation's nodes may run at any of its steps
    for node in job.graph.nodes:
        if node.op not in OPS or (node.call != 0 and not steps):
            return f"a {node.op} node ({node.target}) cannot be compiled"
        if not all(name.isascii() and name.isidentifier() for name in node.kwargs):
            return "a keyword argument that is not a plain name cannot be compiled"
    if not job.shapes_known:
        return "a value's shape depends on tensor values (admission could not see every node)"
    return None


def _eager(job: Any, why: str) -> None:
    """Run ``job`` eagerly: tell its client why, if it asked to compile."""
    if job.compile is not False:
        job.note = f"ran eagerly: {why}"[: m.MAX_NOTE]


def shared_note(job: Any, limits: Limits, jobs: int) -> str:
    """The note for a job that ran in one forward with others (always eagerly)."""
    if job.compile is False:
        return ""
    if not limits.compile:
        return f"ran eagerly: {_NOT_SERVED}"
    return (
        f"ran eagerly in one forward pass with {jobs - 1} other requests: compiled replay "
        "runs requests alone"
    )


def _bound(programs: compiled.Programs) -> None:
    """Forget the oldest run counts past :data:`REMEMBERED`: ``compiled.Programs`` keeps one
    per structure it was ever asked to run, and a server is asked for unboundedly many."""
    with programs.lock:
        while len(programs.runs) > REMEMBERED:
            del programs.runs[next(iter(programs.runs))]
