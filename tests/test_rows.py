"""Tests for lazytensor/runtime/rows.py: one invoke's batch rows, read from and written into values.

``narrow`` and ``replace`` are checked on every container a module's input or output can be;
the oracle is plain slicing (``t[start:stop]``) and ``torch.cat``. The last tests replay
row-limited point nodes and compare them with hooks that slice the same rows.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from lazytensor.core.errors import GraphError
from lazytensor.core.graph import Batch, Graph, Ref
from lazytensor.runtime.executor import Executor
from lazytensor.runtime.rows import Layout, narrow, replace
from models import TinyMLP, hooked

Pair = namedtuple("Pair", "main gate")
SIZE, ROWS = 4, (1, 3)


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def batch(*tail: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(SIZE, *tail, generator=torch.Generator().manual_seed(seed))


class Tagged(dict):
    """A mapping with state of its own, rebuilt as a copy."""

    def __init__(self, tag: str, items: dict) -> None:
        super().__init__(items)
        self.tag = tag


# -- narrow -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [None, (0, SIZE)], ids=["none", "all"])
def test_the_whole_batch_is_the_value_itself(rows) -> None:
    value = (batch(2), {"k": batch(3)})
    assert narrow(value, rows, SIZE) is value


def test_a_tensor_is_narrowed_to_a_view_of_its_rows() -> None:
    t = batch(3)
    part = narrow(t, ROWS, SIZE)
    exact(part, t[1:3])
    assert part._base is t
    part[:, 0] = -5.0  # an in-place write through the view lands in the batch
    assert (t[1:3, 0] == -5.0).all() and (t[[0, 3], 0] != -5.0).all()


@pytest.mark.parametrize(
    "value",
    [torch.tensor(2.0), torch.ones(1, 5), 7, "text", None, slice(0, SIZE)],
    ids=["0-dim", "broadcast", "int", "str", "none", "slice"],
)
def test_values_every_row_shares_are_read_whole(value) -> None:
    assert narrow(value, ROWS, SIZE) is value


@pytest.mark.parametrize(
    "value",
    [torch.ones(SIZE + 1, 2), torch.ones(2, SIZE), (torch.ones(SIZE), torch.ones(3))],
    ids=["other-length", "batch-not-first", "in-a-tuple"],
)
def test_a_first_dimension_of_unknown_layout_is_a_graph_error(value) -> None:
    with pytest.raises(GraphError, match="cannot tell which part"):
        narrow(value, ROWS, SIZE)
    assert narrow(value, None, SIZE) is value  # the whole batch never looks at the layout


def test_expanded_and_token_major_rows() -> None:
    tokens = 3
    layout = Layout.of(SIZE, expand=2, tokens=tokens)
    beams = torch.arange(SIZE * 2.0)  # each batch row twice, consecutively
    exact(narrow(beams, ROWS, layout), beams[2:6])
    flat = torch.arange(SIZE * 2.0 * tokens).reshape(-1, 1)  # (B*k*T, 1)
    exact(narrow(flat, ROWS, layout), flat[2 * tokens : 6 * tokens])
    positions = torch.arange(tokens)  # cache_position: one per token, shared by every row
    assert narrow(positions, ROWS, layout) is positions


@pytest.mark.parametrize(
    "make",
    [
        lambda a, b: (a, b, 3),
        lambda a, b: [a, b, 3],
        lambda a, b: Pair(a, b),
        lambda a, b: {"a": a, "b": b, "n": 3},
        lambda a, b: OrderedDict(a=a, b=b),
        lambda a, b: Tagged("t", {"a": a, "b": b}),
        lambda a, b: CausalLMOutputWithPast(logits=a, hidden_states=(b,)),
        lambda a, b: ((a,), {"mask": b, "flag": True}),
    ],
    ids=["tuple", "list", "namedtuple", "dict", "ordered", "subclass", "model-output", "inputs"],
)
def test_containers_are_narrowed_leaf_by_leaf_and_keep_their_type(make) -> None:
    a, b = batch(3), batch(2, seed=1)
    value = make(a, b)
    part = narrow(value, ROWS, SIZE)
    assert type(part) is type(value)
    expected = make(a[1:3], b[1:3])
    if isinstance(value, dict):
        assert list(part) == list(value)
    flat_got, flat_want = _flat(part), _flat(expected)
    assert len(flat_got) == len(flat_want)
    for got, want in zip(flat_got, flat_want):
        if isinstance(want, torch.Tensor):
            exact(got, want)
        else:
            assert got == want
    for got in flat_got:  # every narrowed tensor is a view into the batch
        if isinstance(got, torch.Tensor) and got.dim() > 0:
            got.fill_(0.0)
    assert (a[1:3] == 0).all() and (b[1:3] == 0).all() and (a[0] != 0).any()
    if isinstance(value, Tagged):
        assert part.tag == "t"


def _flat(value):
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _flat(v)]
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _flat(v)]
    return [value]


# -- replace ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [None, (0, SIZE)], ids=["none", "all"])
def test_replacing_the_whole_batch_is_the_new_value(rows) -> None:
    new = batch(3, seed=1)
    assert replace(batch(3), new, rows, SIZE) is new


def test_a_tuple_for_a_whole_named_tuple_keeps_its_type() -> None:
    new = (batch(2), batch(2, seed=1))
    got = replace(Pair(batch(2, seed=2), batch(2, seed=3)), new, None, SIZE)
    assert type(got) is Pair and got.main is new[0] and got.gate is new[1]


def test_replacing_rows_of_a_tensor_builds_a_new_tensor() -> None:
    full, new = batch(3), batch(3, seed=1)[:2]
    got = replace(full, new, ROWS, SIZE)
    exact(got, torch.cat([full[:1], new, full[3:]]))
    assert got.data_ptr() != full.data_ptr()
    exact(full, batch(3))  # the original batch is unchanged


@pytest.mark.parametrize(
    ("new", "row"),
    [(7.0, [7.0, 7.0, 7.0]), (torch.tensor([1.0, 2.0, 3.0]), [1.0, 2.0, 3.0]), (2, [2.0] * 3)],
    ids=["scalar", "one-row", "int"],
)
def test_a_smaller_value_is_broadcast_over_the_rows(new, row) -> None:
    full = batch(3)
    got = replace(full, new, ROWS, SIZE)
    assert got.dtype == full.dtype
    exact(got[1:3], torch.tensor([row, row]))
    exact(got[[0, 3]], full[[0, 3]])


def test_a_zero_dim_tensor_is_replaced_whole() -> None:
    new = torch.tensor(5.0)
    assert replace(torch.tensor(1.0), new, ROWS, SIZE) is new


@pytest.mark.parametrize(
    ("full", "match"),
    [(torch.ones(1, 3), "every row shares it"), (torch.ones(SIZE + 2, 3), "cannot tell")],
    ids=["shared", "other-length"],
)
def test_rows_of_a_value_without_the_batch_layout_cannot_be_written(full, match) -> None:
    with pytest.raises(GraphError, match=match):
        replace(full, torch.zeros(2, 3), ROWS, SIZE)


@pytest.mark.parametrize(
    "make",
    [
        lambda a, b: (a, b),
        lambda a, b: [a, b],
        lambda a, b: Pair(a, b),
    ],
    ids=["tuple", "list", "namedtuple"],
)
def test_sequences_are_replaced_item_by_item(make) -> None:
    a, b = batch(3), batch(2, seed=1)
    new_a, new_b = batch(3, seed=2)[:2], batch(2, seed=3)[:2]
    got = replace(make(a, b), (new_a, new_b), ROWS, SIZE)
    assert type(got) is type(make(a, b))
    exact(got[0], torch.cat([a[:1], new_a, a[3:]]))
    exact(got[1], torch.cat([b[:1], new_b, b[3:]]))


def test_a_sequence_of_another_length_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="rows 1:3 of a tuple of 2 items with one of 3 items"):
        replace((batch(1), batch(1)), (1, 2, 3), ROWS, SIZE)


@pytest.mark.parametrize(
    "make",
    [
        lambda logits, mask: {"logits": logits, "mask": mask},
        lambda logits, mask: CausalLMOutputWithPast(logits=logits, loss=mask),
        lambda logits, mask: Tagged("t", {"logits": logits, "mask": mask}),
    ],
    ids=["dict", "model-output", "subclass"],
)
def test_mappings_replace_the_keys_given_and_keep_the_others(make) -> None:
    logits, mask = batch(5), batch(1, seed=1)
    new = batch(5, seed=2)[:2]
    got = replace(make(logits, mask), {"logits": new}, ROWS, SIZE)
    assert type(got) is type(make(logits, mask))
    exact(got["logits"], torch.cat([logits[:1], new, logits[3:]]))
    assert list(got) == list(make(logits, mask))
    assert next(v for k, v in got.items() if k != "logits") is mask


# -- inside a replay --------------------------------------------------------------------------


def test_a_row_limited_read_and_in_place_write_match_a_hook(tiny_mlp: TinyMLP) -> None:
    x = torch.randn(SIZE, 8, generator=torch.Generator().manual_seed(4))
    graph = Graph()
    part = graph.add("output", "layer1", rows=ROWS)
    graph.add("function", "operator.setitem", (Ref(part.id), (slice(None), slice(0, 4)), 0.0))
    seen = graph.add("output", "layer2", rows=ROWS)
    y = graph.add("output", "")
    graph.save(seen.id)
    graph.save(y.id)
    got = Executor(tiny_mlp, graph, Batch((x,), {}, SIZE)).run()

    captured = {}

    def edit(module, args, output):
        output[1:3, 0:4] = 0.0

    expected = hooked(
        tiny_mlp,
        x,
        post=[
            (tiny_mlp.layer1, edit),
            (tiny_mlp.layer2, lambda m, a, o: captured.update(rows=o[1:3].clone())),
        ],
    )
    exact(got[y.id], expected)
    exact(got[seen.id], captured["rows"])


def test_a_row_limited_replacement_matches_a_hook(tiny_mlp: TinyMLP) -> None:
    x = torch.randn(SIZE, 8, generator=torch.Generator().manual_seed(5))
    graph = Graph()
    part = graph.add("output", "layer2", rows=(2, 4))
    doubled = graph.add("function", "operator.mul", (Ref(part.id), 2.0))
    graph.add("set_output", "layer2", (Ref(doubled.id),), rows=(2, 4))
    graph.add("set_input", "layer3", (0.5,), rows=(0, 1))
    y = graph.add("output", "")
    graph.save(y.id)
    got = Executor(tiny_mlp, graph, Batch((x,), {}, SIZE)).run()

    def double_rows(module, args, output):
        return torch.cat([output[:2], output[2:] * 2.0])

    def set_first_row(module, args):
        return (torch.cat([torch.full_like(args[0][:1], 0.5), args[0][1:]]),)

    expected = hooked(
        tiny_mlp, x, pre=[(tiny_mlp.layer3, set_first_row)], post=[(tiny_mlp.layer2, double_rows)]
    )
    exact(got[y.id], expected)
