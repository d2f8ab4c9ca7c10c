"""Optimizers for trainable tensors, recorded as graph ops (``lt.optim.AdamW([vec], lr=1e-2)``).

See :mod:`lazytensor.tracing.training`: the allow-listed optimizers run where the graph runs,
and train only tensors made with :func:`lazytensor.parameter`.
"""

from __future__ import annotations

from .tracing.training import SGD, Adam, AdamW, Optimizer

__all__ = ["SGD", "Adam", "AdamW", "Optimizer"]
