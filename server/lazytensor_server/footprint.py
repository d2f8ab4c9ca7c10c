"""Footprint: the bytes a request's replay holds beyond the model's own forward, counted shape-only.

A :class:`Sizer` is an :class:`~lazytensor.runtime.executor.Executor` in ``fake_mode`` (tensors
with shapes and no data) that keeps a ledger of storages as the nodes run and are freed, and
the peak of what is live. Counted:

* tensors the graph's own ops make (factories, arithmetic, module calls, ``lt.parameter``), and
  strings, bytes and integers they make; never the model's values it only reads, nor weights;
* with a backward pass, what autograd keeps for it: every tensor saved for backward from the
  moment a value is tracked (the model's activations included, the weights not), until the
  ``backward`` node frees them; and the gradients it makes: one the size of each value it reads
  a gradient of, while it runs, and one per trainable tensor, kept;
* optimizer state, from an optimizer's first ``step``: two tensors the size of each parameter
  for Adam and AdamW (three with ``amsgrad``), one for SGD with momentum;
* in a session, everything that outlives a segment (:class:`Ledger`: carried values, trainable
  tensors, their gradients, optimizer states) counts in every later segment.

The shape-only backward pass does not run autograd: its gradients are zeros of the watched
values' shapes, so what a ``grad`` node computes is sized like any other node.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

from lazytensor.core import tree
from lazytensor.core.graph import Node
from lazytensor.runtime.executor import Executor

#: Ops whose results are new memory of the graph's own (not the model's values, not weights).
MAKES = frozenset(("function", "method", "module", "parameter", "python"))


class Ledger:
    """What outlives one segment of a session's shape-only pass, and what it holds.

    Args:
        module: the served model (its weights are never the request's memory).
        mode: the ``FakeTensorMode`` of the pass; the session's segments share it.
    """

    def __init__(self, module: torch.nn.Module, mode: Any) -> None:
        from lazytensor.runtime.session import Workspace

        self.module, self.mode = module, mode
        self.workspace = Workspace()
        self.grads: dict[int, tuple[Any, int]] = {}  # id -> (trainable, bytes of its .grad)
        self.states: dict[int, tuple[Any, int]] = {}  # id -> (optimizer, bytes of its state)

    @functools.cached_property
    def weights(self) -> frozenset[int]:
        """Storages of the model's weights as the pass sees them: the mode makes one fake per
        weight and reuses it while it lives, so the ledger keeps them alive."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        self._fakes = [self.mode.from_tensor(t) for t in tensors]
        return frozenset(_storage(f)[0] for f in self._fakes)

    def held(self) -> tuple[int, set[int]]:
        """Bytes held between segments, and the storages among them."""
        sizes: dict[int, int] = {}
        python = 0
        values = [*self.workspace.kept.values(), *self.workspace.trainables]
        for leaf in tree.leaves(values):
            if isinstance(leaf, torch.Tensor):
                key, size = _storage(leaf)
                if key not in self.weights:
                    sizes[key] = size
            else:
                python += _python_bytes(leaf)
        extra = sum(size for _, size in (*self.grads.values(), *self.states.values()))
        return sum(sizes.values()) + python + extra, set(sizes)


class Sizer(Executor):
    """A shape-only replay that counts the live bytes of what the request holds (see the
    module docstring): after :meth:`run` or :meth:`run_plain`, their ``peak``, and
    ``peak_node``, the node where they first went over ``limit`` (``over``) or else peaked."""

    def __init__(self, *args: Any, ledger: Ledger, limit: int, **kwargs: Any) -> None:
        super().__init__(*args, workspace=ledger.workspace, **kwargs)
        self.ledger, self.limit = ledger, limit
        self.live, held = ledger.held()  # a session's earlier segments' state
        self.peak = self.live
        self.peak_node: int | None = None  # where it peaked, or first went over ``limit``
        self.over = False
        self.outer = held  # storages the ledger counts already
        self.sizes: dict[int, int] = dict.fromkeys(held, 0)  # storage -> bytes it counts for
        self.refs: dict[int, int] = {}  # storage -> live holders (nodes, autograd)
        self.held: dict[int, tuple[list[int], int]] = {}  # node -> (storages, Python bytes)
        self.autograd: set[int] = set()  # storages saved for a backward pass
        self.upgraded: set[int] = set()  # ...that count only because autograd keeps them

    # -- running: the saved-tensor hooks see what autograd keeps -----------------------------
    def run(self) -> dict[int, Any]:
        with self._autograd():
            return super().run()

    def run_plain(self) -> dict[int, Any]:
        """Session code, shape-only too (its values are fakes; a factory must not allocate)."""
        with self._autograd(), self.fake_mode:
            return super().run_plain()

    def _autograd(self) -> Any:
        if not self.plan.backwards:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _same)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, FakeTensor):  # a weight itself (or a constant), not a copy
            return tensor
        key, size = _storage(tensor)
        if key in self.ledger.weights or key in self.autograd or key in self.outer:
            return tensor
        if not self.sizes.get(key):  # a value the model made: kept now, so it counts
            if self.refs.get(key, 0) > 0:
                self.live += size
            self.sizes[key] = size
            self.upgraded.add(key)
        self.autograd.add(key)
        self._add_ref(key)
        return tensor

    # -- the ledger ---------------------------------------------------------------------------
    def _run_node(self, i: int) -> None:
        super()._run_node(i)
        self._hold(i)
        for d in self.deps[i]:
            if self.values[d] is None:
                self._release(d)
        if not self.users[i] and i not in self.keep and i not in self.repeating:
            self._release(i)  # the real run drops it at once

    def _reset(self, start: int) -> None:
        super()._reset(start)
        for i in [i for i in self.held if self.values[i] is None]:
            self._release(i)

    def _hold(self, i: int) -> None:
        makes = self.graph.nodes[i].op in MAKES
        storages, python = [], 0
        for leaf in tree.leaves(self.values[i]):
            if isinstance(leaf, torch.Tensor):
                key, size = _storage(leaf)
                if key not in self.sizes:
                    self.sizes[key] = size if makes else 0
                if key not in storages:
                    storages.append(key)
                    self._add_ref(key)
            elif makes and isinstance(leaf, (str, bytes, int)):
                python += _python_bytes(leaf)
        self.live += python
        self.held[i] = (storages, python)
        self._peak(i)

    def _release(self, i: int) -> None:
        storages, python = self.held.pop(i, ((), 0))
        self.live -= python
        for key in storages:
            self._drop_ref(key)

    def _add_ref(self, key: int) -> None:
        count = self.refs.get(key, 0)
        self.refs[key] = count + 1
        if count == 0:
            self.live += self.sizes[key]

    def _drop_ref(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes[key]
            if key in self.upgraded:  # freed: a later storage may reuse the key
                self.upgraded.discard(key)
                del self.sizes[key]

    def _peak(self, i: int) -> None:
        if self.live > self.peak or self.peak_node is None:
            self.peak = max(self.peak, self.live)
            if not self.over:  # the node that went over the limit is the one to name
                self.peak_node, self.over = i, self.live > self.limit

    # -- gradients and optimizers ---------------------------------------------------------------
    def backward(self, node: Node) -> None:
        """Count the gradients this backward pass makes, run its gradient moments shape-only,
        then free what autograd kept for it (unless ``retain_graph``)."""
        targets = self.plan.backwards.get(node.id, ())
        moving = sum(nbytes(self.values[t]) for t in targets)  # one gradient per watched value
        for p in self.workspace.trainables:
            if id(p) not in self.ledger.grads:
                self.ledger.grads[id(p)] = (p, nbytes(p))
                self.live += nbytes(p)  # .grad stays after the pass
        self.live += moving
        self._peak(node.id)
        super().backward(node)
        self.live -= moving
        if not (self._value(node.kwargs) if node.kwargs else {}).get("retain_graph"):
            for key in self.autograd:
                self._drop_ref(key)
            self.autograd.clear()

    def optimize(self, node: Node) -> None:
        """``step`` makes the optimizer's state at the first call (and changes no shape, so it
        is not run); ``zero_grad`` runs."""
        optimizer = self._value(node.args[0])
        if node.target != "step" or not isinstance(optimizer, torch.optim.Optimizer):
            return super().optimize(node)
        if id(optimizer) not in self.ledger.states:
            size = _state_bytes(optimizer)
            self.ledger.states[id(optimizer)] = (optimizer, size)
            self.live += size
        return None


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Adam, AdamW: two tensors per parameter (three with amsgrad); SGD: one with momentum."""
    sgd = type(optimizer).__name__ == "SGD"
    total = 0
    for group in optimizer.param_groups:
        if sgd:
            per = 1 if group.get("momentum") else 0
        else:
            per = 3 if group.get("amsgrad") else 2
        total += per * sum(nbytes(p) for p in group["params"])
    return total


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage(t: torch.Tensor) -> tuple[int, int]:
    try:
        storage = t.untyped_storage()
        return storage._cdata, storage.nbytes()
    except Exception:  # no storage (a nested or sparse tensor): count it on its own
        return id(t), t.numel() * t.element_size()


def _python_bytes(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    return value.bit_length() // 8 + 1 if isinstance(value, int) else 0


def nbytes(value: Any) -> int:
    """The bytes of the values in ``value``: tensors, and strings, bytes and integers too."""
    total = 0
    for leaf in tree.leaves(value):
        if isinstance(leaf, torch.Tensor):
            total += leaf.numel() * leaf.element_size()
        else:
            total += _python_bytes(leaf)
    return total
