"""Tests for lazytensor/core/tree.py: the one walker over nested values.

Every container kind a model's inputs and outputs can be is walked and rebuilt; the oracle is
the value built by hand with the same leaves transformed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict, namedtuple

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from lazytensor.core import tree
from lazytensor.protocol.values import Record

Pair = namedtuple("Pair", "main gate")


class Tagged(dict):
    """A mapping with state of its own and a constructor that is not ``dict``'s."""

    def __init__(self, tag: str, items: dict) -> None:
        super().__init__(items)
        self.tag = tag


class Row(list):
    pass


class Triple(tuple):
    """A tuple subclass whose constructor takes no iterable: rebuilt as a plain tuple."""

    def __new__(cls, a, b, c):
        return super().__new__(cls, (a, b, c))


def ten_times(x):
    return x * 10 if isinstance(x, (int, float, complex, torch.Tensor)) and x is not True else x


def same(a, b) -> bool:
    """Equal values of equal types, all the way down (tensors by value)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# -- map over every container kind -------------------------------------------------------------

CASES = {
    "tuple": ((1, 2.5, "s"), (10, 25.0, "s")),
    "list": ([1, [2]], [10, [20]]),
    "dict": ({"a": 1, "b": (2,)}, {"a": 10, "b": (20,)}),
    "slice": (slice(1, None, 2), slice(10, None, 20)),
    "namedtuple": (Pair(1, [2]), Pair(10, [20])),
    "size": (torch.Size([2, 3]), torch.Size([20, 30])),
    "list-subclass": (Row([1, 2]), Row([10, 20])),
    "tuple-subclass": (Triple(1, 2, 3), (10, 20, 30)),
    "ordered-dict": (OrderedDict(b=1, a=2), OrderedDict(b=10, a=20)),
    "counter": (Counter(a=1, b=2), Counter(a=10, b=20)),
    "nested": (
        {"p": Pair(1, (slice(None, 3), [4])), "q": [Row([5])]},
        {"p": Pair(10, (slice(None, 30), [40])), "q": [Row([50])]},
    ),
    "atoms": ((None, True, "text", b"raw", ..., 1j), (None, True, "text", b"raw", ..., 10j)),
}


@pytest.mark.parametrize(("value", "expected"), list(CASES.values()), ids=list(CASES))
def test_map_rebuilds_each_container_as_its_own_type(value, expected) -> None:
    got = tree.map(ten_times, value)
    assert same(got, expected), got
    assert tree.map(lambda x: x, value) == value


def test_return_types_keep_their_type_and_fields() -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    top = torch.max(x, 0)
    got = tree.map(lambda t: t * 2, top)
    assert type(got) is type(top)
    torch.testing.assert_close(got.values, top.values * 2, rtol=0, atol=0)
    torch.testing.assert_close(got.indices, top.indices * 2, rtol=0, atol=0)
    ordered = torch.sort(x)
    assert [id(leaf) for leaf in tree.leaves(ordered)] == [id(ordered.values), id(ordered.indices)]


def test_a_size_that_no_longer_holds_ints_becomes_a_tuple() -> None:
    got = tree.map(lambda d: d / 2, torch.Size([2, 3]))
    assert type(got) is tuple and got == (1.0, 1.5)


def test_tensors_and_strings_are_leaves() -> None:
    t = torch.arange(3)
    seen = []
    tree.map(seen.append, (t, "abc"))
    assert seen[0] is t and seen[1] == "abc" and len(seen) == 2


# -- mappings ---------------------------------------------------------------------------------


def test_model_outputs_are_rebuilt_through_their_constructor() -> None:
    logits = torch.ones(2, 3)
    out = CausalLMOutputWithPast(logits=logits, hidden_states=(logits, logits + 1))
    got = tree.map(lambda t: t * 2, out)
    assert type(got) is CausalLMOutputWithPast
    assert list(got) == ["logits", "hidden_states"] and got.loss is None
    torch.testing.assert_close(got.logits, logits * 2, rtol=0, atol=0)
    torch.testing.assert_close(got[1][1], (logits + 1) * 2, rtol=0, atol=0)
    assert got.to_tuple()[0] is got.logits  # a working ModelOutput, attribute and index access


def test_mappings_with_their_own_state_are_copied() -> None:
    tagged = tree.map(ten_times, Tagged("t", {"a": 1}))
    assert type(tagged) is Tagged and tagged == {"a": 10} and tagged.tag == "t"
    record = tree.map(ten_times, Record("Out", {"logits": 1, "loss": None}))
    assert type(record) is Record and record.cls_name == "Out"
    assert dict(record) == {"logits": 10, "loss": None}


def test_a_defaultdict_keeps_its_factory() -> None:
    got = tree.map(ten_times, defaultdict(list, a=1))
    assert type(got) is defaultdict and got == {"a": 10}
    assert got.default_factory is list


def test_a_record_with_a_field_named_like_its_constructor_arguments() -> None:
    got = tree.map(ten_times, Record("Out", {"cls_name": 1, "fields": 2}))
    assert got.cls_name == "Out"
    assert dict(got) == {"cls_name": 10, "fields": 20}


# -- children, rebuild, leaves -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "items"),
    [
        ((1, 2), [1, 2]),
        ([1, 2], [1, 2]),
        ({"a": 1, "b": 2}, [1, 2]),
        (slice(1, 5), [1, 5, None]),
        (Pair(1, 2), [1, 2]),
        (torch.Size([4]), [4]),
    ],
    ids=["tuple", "list", "dict", "slice", "namedtuple", "size"],
)
def test_children_and_rebuild_are_inverse(value, items) -> None:
    assert tree.is_container(value)
    assert tree.children(value) == items
    rebuilt = tree.rebuild(value, tree.children(value))
    assert type(rebuilt) is type(value) and rebuilt == value


@pytest.mark.parametrize("value", [1, "s", None, torch.ones(2), range(3), {1, 2}, b"x"])
def test_other_values_are_not_containers(value) -> None:
    assert not tree.is_container(value)
    assert [id(leaf) for leaf in tree.leaves(value)] == [id(value)]
    with pytest.raises(TypeError, match="is not a container"):
        tree.rebuild(value, [])


def test_leaves_are_depth_first_in_order() -> None:
    value = {"a": (1, [2, slice(3, None)]), "b": Pair(4, {"c": 5}), "d": torch.Size([6])}
    assert list(tree.leaves(value)) == [1, 2, 3, None, None, 4, 5, 6]


def test_any_leaf() -> None:
    value = {"a": (1, [2, torch.ones(1)])}
    assert tree.any_leaf(lambda x: isinstance(x, torch.Tensor), value)
    assert not tree.any_leaf(lambda x: isinstance(x, str), value)
    assert not tree.any_leaf(bool, ())
