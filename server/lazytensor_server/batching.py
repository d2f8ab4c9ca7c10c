"""Batching: several users' traces run as one forward pass, each on its own block of rows.

Jobs that wait for the same model and are *compatible* (:func:`group_key`) are merged by
:func:`merge` into one job, exactly as one trace's invokes are: each job's inputs become its
own block of rows of the batch, and every point node of its graph reads and writes only that
block (``Node.rows`` shifted into it; ``None``, the whole batch, becomes the whole block).
:func:`split` hands each job the values its own graph saved.

Compatible jobs are plain traces (no generation, gradients, session state, user code,
``stop``/``skip``, materialization or shape-only run) whose inputs have the same names, the
same non-row dimensions (the same token count: nothing is padded, so every value a job sees
has the shape it has when the job runs alone) and equal non-tensor inputs.

Row blocks keep a job's values its own only while it touches nothing the rows share. A graph
is data, so this cannot be proven before the run; :class:`MergedExecutor` checks it while the
merged forward runs and fails the job whose node would break it (the worker then runs that job
alone, see :mod:`.worker`):

* an in-place write must land inside the writer's own rows of a value it read (a value every
  row shares, or an expanded one whose rows alias each other, is refused);
* a module input or output replaced for the job's rows must leave every value the rows share
  as it was;
* a model object that is not a tensor (a key/value cache) may be saved or passed along in its
  container, but no function, attribute read or module call may look inside it: it holds
  every row.

Reads of values every row shares (a first dimension of 1, a ``cache_position`` vector) are
allowed: with equal non-row inputs they are what the job computes alone. A model that packs
several rows into one (variable-length "packed" attention) breaks the row layout that both
invokes and batching rely on; serve it with ``--max-batch-jobs 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lazytensor.core import tree
from lazytensor.core.errors import GraphError
from lazytensor.core.graph import Batch, Const, Graph, Node, Ref
from lazytensor.runtime import rows
from lazytensor.runtime.executor import Executor

#: Ops whose effects or values are not confined to a job's rows, or that end the forward.
_ALONE_OPS = frozenset(
    ("tokens", "skip", "python", "backward", "grad", "set_grad", "weight", "parameter", "carry",
     "optimizer", "optimize", "stop")
)  # fmt: skip
#: In-place methods that change a tensor's shape, not its values: on a view of a job's rows
#: they would not change the model's own tensor, as they do when the job runs alone.
_RESHAPING = frozenset(
    "t_ transpose_ squeeze_ unsqueeze_ detach_ swapaxes_ swapdims_ resize_ as_strided_".split()
)
_PLAIN = (str, int, float, bool, complex, type(None), type(Ellipsis), torch.dtype, torch.device)


def group_key(job: Any) -> tuple | None:
    """What jobs must share to run in one forward; ``None``: this job runs alone."""
    batch = job.batch
    if job.segments or job.fake or job.stop_at is not None or batch.generate or batch.size < 1:
        return None
    if any(node.op in _ALONE_OPS for node in job.graph.nodes):
        return None
    try:
        inputs = _signature((batch.args, batch.kwargs), batch.size)
    except ValueError:
        return None
    return job.model, inputs


def _signature(value: Any, size: int) -> Any:
    """``value`` with each tensor as its non-row shape and dtype; ``ValueError`` when a tensor
    does not hold one row per batch row."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != size:
            raise ValueError("an input without one row per batch row")
        return ("tensor", tuple(value.shape[1:]), value.dtype, value.device)
    if tree.is_container(value) and not isinstance(value, slice):
        keys = tuple(value) if isinstance(value, dict) else ()
        return (type(value).__name__, keys, *(_signature(v, size) for v in tree.children(value)))
    if not isinstance(value, _PLAIN + (slice,)):
        raise ValueError("an input of a type batching does not compare")
    return (type(value).__name__, repr(value))


def conflicts(a: Graph, b: Graph) -> bool:
    """Whether a ``module`` node of one graph would claim point nodes of the other: a point
    node below a called module, recorded after the call, fires inside that call."""
    return _claims(a, b) or _claims(b, a)


def _claims(caller: Graph, other: Graph) -> bool:
    called = {n.target for n in caller.nodes if n.op == "module" and n.target}
    if not called:
        return False
    for node in other.nodes:
        if node.is_point:
            parts = node.target.replace(":", ".").split(".")
            if any(".".join(parts[:k]) in called for k in range(1, len(parts))):
                return True
    return False


@dataclass
class Merged:
    """Several jobs as one: the graph and batch to run, and where each job's nodes went."""

    graph: Graph
    batch: Batch
    bases: list[int]  # job -> the merged id of its node 0
    sizes: list[int]  # job -> its number of nodes

    def owner(self, node: int) -> int:
        """The index of the job whose graph holds merged node ``node``."""
        return max(j for j, base in enumerate(self.bases) if base <= node)


def merge(jobs: list[Any]) -> Merged:
    """One graph and batch for ``jobs`` (equal :func:`group_key`): job ``j``'s rows are the
    block after the rows of jobs ``0..j-1``, its nodes the ids after theirs."""
    graph, offset, bases = Graph(), 0, []
    for job in jobs:
        g, size = job.graph, job.batch.size
        base, cbase = len(graph.nodes), len(graph.constants)
        bases.append(base)
        for node in g.nodes:
            where = node.rows
            if node.is_point:
                start, stop = where if where is not None else (0, size)
                where = (offset + start, offset + stop)
            graph.nodes.append(
                Node(base + node.id, node.op, node.target, _shift(node.args, base, cbase),
                     _shift(node.kwargs, base, cbase), node.call, where)
            )  # fmt: skip
        graph.sites.extend(g.sites)
        graph.constants.extend(g.constants)
        graph.saved.extend(base + i for i in g.saved)
        offset += size
    first = jobs[0].batch
    inputs = _concat([(j.batch.args, j.batch.kwargs) for j in jobs])
    batch = Batch(tuple(inputs[0]), dict(inputs[1]), offset, first.generate)
    return Merged(graph, batch, bases, [len(j.graph.nodes) for j in jobs])


def split(merged: Merged, jobs: list[Any], values: dict[int, Any]) -> list[dict[int, Any]]:
    """Each job's saved values, under its own node ids."""
    return [
        {i: values[base + i] for i in job.graph.saved if base + i in values}
        for base, job in zip(merged.bases, jobs)
    ]


def _shift(value: Any, base: int, cbase: int) -> Any:
    kind = type(value)
    if kind is Ref:
        return Ref(value.id + base)
    if kind is Const:
        return Const(value.index + cbase)
    if tree.is_container(value) and not isinstance(value, slice):
        return tree.rebuild(value, [_shift(v, base, cbase) for v in tree.children(value)])
    return value


def _concat(values: list[Any]) -> Any:
    """The inputs of several jobs (equal structure) with their tensors joined on rows."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if tree.is_container(first) and not isinstance(first, slice):
        columns = zip(*(tree.children(v) for v in values))
        return tree.rebuild(first, [_concat(list(c)) for c in columns])
    return first


def _opaque(value: Any) -> bool:
    """A model object that is neither a tensor, a container nor a plain value."""
    return not (isinstance(value, (torch.Tensor, slice) + _PLAIN) or tree.is_container(value))


class MergedExecutor(Executor):
    """An executor for a merged graph that refuses, as a :class:`GraphError` of the node that
    tries, anything one job could do to another job's rows (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_storages: set[int] = set()  # storages of tensors point reads handed out
        self.shared: set[int] = set()  # ...of those handed out whole, or rows that overlap
        self.private: dict[int, list[tuple[int, int]]] = {}  # storage -> rows' byte spans

    # -- reads: remember what each job may write into -------------------------------------
    def output(self, node: Node) -> Any:
        return self._seen(self.current, super().output(node))

    def result(self, node: Node) -> Any:
        return self._seen(self.current, super().result(node))

    def inputs(self, node: Node) -> Any:
        return self._seen(self.current, super().inputs(node))

    def input(self, node: Node) -> Any:
        args, kwargs = self.current
        return self._seen(args[0] if args else next(iter(kwargs.values())), super().input(node))

    def _seen(self, full: Any, mine: Any) -> Any:
        for whole, part in zip(tree.leaves(full), tree.leaves(mine)):
            if isinstance(part, torch.Tensor) and part.numel():
                storage = _storage(part)
                self.read_storages.add(storage)
                if part is not whole and _owns(whole, part):
                    self.private.setdefault(storage, []).append(_span(part))
                else:  # (also when the allocator reused the memory of rows read before)
                    self.shared.add(storage)
        return mine

    # -- writes ---------------------------------------------------------------------------
    def _check_write(self, node: Node) -> None:
        super()._check_write(node)
        if node.op == "method" and node.target in _RESHAPING:
            raise GraphError(
                f".{node.target}() changes the shape of a tensor in place; under server-side "
                "batching its value is a view of the job's rows, so it runs alone instead"
            )
        first = node.args[0] if node.args else None
        target = self._value(first)
        if isinstance(target, torch.Tensor):
            storage = _storage(target)
            if not target.numel() or storage not in self.read_storages:
                return  # the job's own tensor
            lo, hi = _span(target)
            spans = () if storage in self.shared else self.private.get(storage, ())
            if any(a <= lo and hi <= b for a, b in spans):
                return  # inside rows a read handed out (no view reaches beyond its rows)
        elif not _opaque(target):
            return  # a container the read rebuilt for this job
        raise GraphError(
            "this writes into a value other rows of this forward share (server-side batching "
            "runs several requests as one); it runs alone instead"
        )

    def set_output(self, node: Node) -> None:
        self._replacing(node, super().set_output)

    def set_input(self, node: Node) -> None:
        self._replacing(node, super().set_input)

    def set_inputs(self, node: Node) -> None:
        self._replacing(node, super().set_inputs)

    def _replacing(self, node: Node, write: Any) -> None:
        where = self._rows(node)
        target = self.current
        if node.op == "set_input":
            args, kwargs = target
            target = args[0] if args else next(iter(kwargs.values()))
        mine = list(tree.leaves(rows.narrow(target, where, self.layout)))
        given = list(tree.leaves(self._value(node.args[0])))
        old = list(tree.leaves(self.current))
        write(node)
        new = list(tree.leaves(self.current))
        # Alone, a write of the whole batch puts the given value in place as it is; here it
        # is expanded into the job's rows, which is the same only for a value of their shape.
        same = len(mine) == len(given) and all(
            not isinstance(p, torch.Tensor) or (isinstance(g, torch.Tensor) and g.shape == p.shape)
            for p, g in zip(mine, given)
        )
        if (
            same
            and len(old) == len(new)
            and all(_kept(a, b, where, self.layout) for a, b in zip(old, new))
        ):
            return
        raise GraphError(
            "this replaces a value other rows of this forward share (server-side batching runs "
            "several requests as one); it runs alone instead"
        )

    # -- model objects that hold every row --------------------------------------------------
    def function(self, node: Node) -> Any:
        self._no_opaque(node, node.target == "operator.getitem")
        return super().function(node)

    def getattr(self, node: Node) -> Any:
        self._no_opaque(node, True)
        return super().getattr(node)

    def module(self, node: Node) -> Any:
        self._no_opaque(node, False)
        return super().module(node)

    def _no_opaque(self, node: Node, first_only: bool) -> None:
        if first_only:
            looked_at = [self._value(node.args[0])] if node.args else []
        else:
            looked_at = list(tree.leaves(self._value((node.args, node.kwargs))))
        found = next((v for v in looked_at if _opaque(v)), None)
        if found is not None:
            raise GraphError(
                f"this looks inside a {type(found).__name__}, which holds every row of this "
                "forward (server-side batching runs several requests as one); it runs alone "
                "instead"
            )


def _kept(old: Any, new: Any, where: tuple[int, int] | None, layout: rows.Layout) -> bool:
    """Whether a leaf replaced for rows ``where`` changed only those rows."""
    if old is new:
        return True
    if isinstance(old, torch.Tensor):
        return where is not None and old.dim() > 0 and _placed(old, where, layout)
    return type(old) is type(new) and isinstance(old, _PLAIN) and old == new


def _placed(value: torch.Tensor, where: tuple[int, int], layout: rows.Layout) -> bool:
    try:
        return layout.span(where, value.shape) is not None
    except GraphError:
        return False


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage that ``t`` can reach: ``[lo, hi)``."""
    size = t.element_size()
    low = high = t.storage_offset()
    for n, stride in zip(t.shape, t.stride()):
        reach = (n - 1) * stride
        low, high = (low + reach, high) if reach < 0 else (low, high + reach)
    return low * size, (high + 1) * size


def _owns(whole: torch.Tensor, part: torch.Tensor) -> bool:
    """Whether ``part`` (a block of rows of ``whole``) reaches no byte of the other rows."""
    if whole.dim() == 0 or part.shape[0] == 0:
        return False
    lo, hi = _span(part)
    start = part.storage_offset() - whole.storage_offset()
    row = whole.stride()[0]
    if row <= 0 or start % row:
        return False
    first = start // row
    others = [whole[:first], whole[first + part.shape[0] :]]
    for rest in others:
        if rest.numel():
            a, b = _span(rest)
            if a < hi and lo < b:
                return False
    return True
