"""Scan: ``model.scan(...)``, a trace run as a shape-only pass.

The block records as any trace does; at its end the graph runs once under a ``FakeTensorMode``
(:mod:`lazytensor.runtime.fake`), so every saved value is a fake tensor: shape, dtype and device,
no data. No weights are needed: a model made with ``dispatch=False`` stays on the meta device,
and a served model's pass runs on its server, which answers with shapes only. A shape error
(a wrong ``view``, mismatched operands) is raised at the user's line, as in a real run.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..backends.base import RunRequest
from ..backends.local import LocalBackend
from ..core.errors import TraceError
from ..runtime import fake
from ..runtime.device import to_device

if TYPE_CHECKING:
    from .trace import Trace


def run(trace: Trace) -> dict[int, Any]:
    """Run ``trace``'s graph shape-only; the fake values of its saved nodes."""
    found = trace._run(trace.graph, fake_mode=fake.mode())
    for i in trace.graph.saved:
        if found.get(i) is None:
            raise TraceError(
                f"the scan never reached the value saved at {trace.graph.sites[i]}: the model "
                "computes a shape from tensor values before it (or never computes it); "
                "run a real trace to get it"
            )
    return {i: found[i] for i in trace.graph.saved}


def refuse_values(trace: Trace) -> None:
    """A scan has shapes only: reading a value inside it is an error, not a real run."""
    raise TraceError(
        "a scan computes shapes only, so its values have no data: use .shape/.dtype inside "
        "it, or run a real trace (model.trace(...)) to read values"
    )


class Weightless(LocalBackend):
    """Runs a scan on the module as it is, never loading weights: a model without them (on
    the meta device) gets its inputs on the meta device too, since fake tensors of two devices
    do not mix."""

    def run(self, request: RunRequest) -> dict[int, Any]:
        param = next(self.module().parameters(), None)
        if param is not None and param.is_meta:
            request = dataclasses.replace(request, batch=to_device(request.batch, param.device))
        return super().run(request)
