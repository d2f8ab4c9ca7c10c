"""Moments: which point nodes wait for which moment of a run, and how rows lie at each.

A *moment* is a hook point ``(module path, pre | post)``, the run's result, or a generation
step's tokens, at one of its calls. :class:`Sides` splits point nodes between the model's own
forward and the calls of modules that the trace itself makes (``lm.sae(h)``, see
:mod:`.executor`). :func:`forward_layout` and :func:`rows_layout` tell the row layout
(:class:`~lazytensor.runtime.rows.Layout`) of a forward from its inputs, and of a generation's
output from its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core import tree
from ..core.graph import Graph, Node
from .plan import RESULT, TOKENS, Key, Plan
from .rows import Layout

RESULT_KEY: Key = ("", RESULT)
TOKENS_KEY: Key = ("", TOKENS)
_TOKEN_INPUTS = ("input_ids", "inputs_embeds")


@dataclass(frozen=True)
class Sides:
    """Point nodes by who runs their module: the model's forward, or a ``module`` node.

    A point node below a module ``P`` (its path starts with ``P.``) that is recorded after a
    ``module`` node calling ``P`` belongs to the latest such call: it fires inside that call.

    Attributes:
        side_of: point node -> the ``module`` node it belongs to.
        main: per hook point, the point nodes of the model's own forward.
        by_call: per ``module`` node, its point nodes by hook point.
    """

    side_of: dict[int, int]
    main: dict[Key, tuple[int, ...]]
    by_call: dict[int, dict[Key, tuple[int, ...]]]

    @classmethod
    def of(cls, graph: Graph, plan: Plan) -> Sides:
        if not plan.modules:
            return cls({}, plan.points, {})
        latest: dict[str, int] = {}  # module path -> its latest ``module`` node so far
        side_of: dict[int, int] = {}
        for node in graph.nodes:
            if node.op == "module" and node.target:
                latest[node.target] = node.id
            elif node.is_point and latest:
                owner = _owner(node.target, latest)
                if owner is not None:
                    side_of[node.id] = owner
        main = {k: tuple(i for i in ids if i not in side_of) for k, ids in plan.points.items()}
        by_call: dict[int, dict[Key, list[int]]] = {}
        for i, owner in side_of.items():
            by_call.setdefault(owner, {}).setdefault(plan.key_of[i], []).append(i)
        frozen = {m: {k: tuple(v) for k, v in keys.items()} for m, keys in by_call.items()}
        return cls(side_of, main, frozen)

    def points(self, side: int | None, key: Key) -> tuple[int, ...]:
        """The point nodes waiting for ``key`` in the forward (``side=None``) or a call."""
        if side is None:
            return self.main.get(key, ())
        return self.by_call.get(side, {}).get(key, ())

    def listens(self, side: int | None, key: Key) -> bool:
        """Whether a hook of ``key`` counts now: always in the forward, in a call only for
        the call's own point nodes."""
        return side is None or key in self.by_call.get(side, {})


def _owner(path: str, latest: dict[str, int]) -> int | None:
    """The latest ``module`` node whose module is strictly above ``path``."""
    parts = path.replace(":", ".").split(".")  # a source site (``a.b:c``) is below ``a.b``
    found = [latest[p] for p in (".".join(parts[:n]) for n in range(1, len(parts))) if p in latest]
    return max(found, default=None)


def forward_layout(args: tuple, kwargs: dict, size: int) -> Layout:
    """The layout of a forward of the model on ``args``/``kwargs`` for a batch of ``size``:
    how many rows per batch row (``generate`` expands them), and tokens per row."""
    tokens = next((kwargs[k] for k in _TOKEN_INPUTS if _is_rows(kwargs.get(k), 2)), None)
    first = (
        tokens
        if tokens is not None
        else next((v for v in (*args, *kwargs.values()) if _is_rows(v, 1)), None)
    )
    rows = first.shape[0] if first is not None else size
    expand = rows // size if rows % size == 0 else 1
    return Layout.of(size, expand, None if tokens is None else tokens.shape[1])


def rows_layout(value: Any, size: int, forward: Layout) -> Layout:
    """The layout of a value built from a generation (its result, a step's tokens): its
    tensors have some rows per batch row (returned sequences), or a forward's."""
    first = next((v for v in tree.leaves(value) if _is_rows(v, 1)), None)
    if first is None or first.shape[0] % size:
        return forward
    factors = dict.fromkeys((first.shape[0] // size, *forward.factors))
    return Layout(size, tuple(factors), forward.shared)


def _is_rows(value: Any, dims: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= dims


def describe(node: Node) -> str:
    """A point node's moment in words, for errors: ``model.layers.0.output``."""
    where = node.target or "the model"
    kind = {"set_input": "input", "set_inputs": "inputs", "set_output": "output"}.get(
        node.op, node.op
    )
    if node.op == "result":
        return "the run's result"
    if node.op == "tokens":
        return "the generated tokens"
    return f"{where}.{kind}"
