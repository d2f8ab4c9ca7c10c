"""Tree: the one walker over nested values (tuples, lists, dicts, slices and their kin).

Values in lazytensor nest: a module's ``inputs`` is ``(args, kwargs)``, a Hugging Face output is
a ``ModelOutput`` (a dict subclass) holding tuples of tensors, a graph argument is a slice of
refs inside a tuple. Every place that walks such a value (recording, batch rows, the codec, the
server's result packing) goes through :func:`map` or :func:`leaves` here, so they agree on what a
container is and rebuild each one as its own type:

* ``tuple`` and its subclasses: named tuples (``collections.namedtuple``), ``torch.Size``, the
  struct sequences of ``torch.return_types``;
* ``list``; ``slice`` (its start, stop and step);
* ``dict`` and its subclasses: ``ModelOutput`` (rebuilt through its constructor) and other
  mappings such as the codec's ``Record`` (rebuilt as a copy with new items).

Everything else is a leaf.

>>> from collections import namedtuple
>>> Pair = namedtuple("Pair", "a b")
>>> map(lambda x: None if x is None else x * 10, {"p": Pair(1, [2, 3]), "s": slice(4, None)})
{'p': Pair(a=10, b=[20, 30]), 's': slice(40, None, None)}
>>> list(leaves((1, [2, {"k": 3}])))
[1, 2, 3]
"""

from __future__ import annotations

import builtins
import copy
from collections.abc import Callable, Iterator
from typing import Any

#: Leaf types checked first, by exact type (the common case on hot paths).
_ATOMS = frozenset((int, float, bool, str, bytes, complex, type(None), type(Ellipsis)))


def is_container(value: Any) -> bool:
    """Whether :func:`map` descends into ``value``."""
    return isinstance(value, (tuple, list, dict, slice))


def children(value: Any) -> list[Any]:
    """The items of a container, in order (a dict's values, a slice's start/stop/step)."""
    if isinstance(value, dict):
        return builtins.list(value.values())
    if isinstance(value, slice):
        return [value.start, value.stop, value.step]
    return builtins.list(value)


def rebuild(like: Any, items: list[Any]) -> Any:
    """A container of ``like``'s type holding ``items`` (as :func:`children` lists them)."""
    kind = type(like)
    if kind is tuple:
        return tuple(items)
    if kind is list:
        return items
    if kind is dict:
        return dict(zip(like, items))
    if kind is slice:
        return slice(*items)
    if isinstance(like, tuple):
        if hasattr(like, "_fields"):  # a named tuple
            return kind(*items)
        try:  # torch.Size, torch.return_types
            return kind(items)
        except TypeError:
            return tuple(items)
    if isinstance(like, list):
        return kind(items)
    if isinstance(like, dict):
        fields = dict(zip(like, items))
        if hasattr(kind, "__dataclass_fields__"):  # ModelOutput: its fields are its arguments
            try:
                return kind(**fields)
            except TypeError:
                pass
        # Other mappings are copied, keeping their own state: a codec Record's class name (even
        # with a field called "cls_name"), a defaultdict's factory.
        new = copy.copy(like)
        new.clear()
        new.update(fields)
        return new
    raise TypeError(f"{kind.__name__} is not a container")


def map(fn: Callable[[Any], Any], value: Any) -> Any:  # noqa: A001 - the walker's verb
    """``value`` with every leaf replaced by ``fn(leaf)``, containers rebuilt as their types."""
    if type(value) in _ATOMS:
        return fn(value)
    if type(value) is tuple:
        return tuple([map(fn, v) for v in value])
    if type(value) is list:
        return [map(fn, v) for v in value]
    if type(value) is dict:
        return {k: map(fn, v) for k, v in value.items()}
    if is_container(value):
        return rebuild(value, [map(fn, v) for v in children(value)])
    return fn(value)


def leaves(value: Any) -> Iterator[Any]:
    """Every leaf of ``value``, depth first, in order."""
    if type(value) in _ATOMS or not is_container(value):
        yield value
        return
    for item in children(value):
        yield from leaves(item)


def any_leaf(predicate: Callable[[Any], bool], value: Any) -> bool:
    """Whether some leaf of ``value`` satisfies ``predicate``."""
    return any(predicate(leaf) for leaf in leaves(value))
