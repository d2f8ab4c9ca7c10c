"""Auth: API keys, read from a file of ``name:key`` lines, each with optional per-key fields.

A line is ``name:key``, optionally followed by ``field=value`` words::

    # name:key [weight=W] [max_inflight=N]
    alice:s3cret#key
    bob:another-key weight=2 max_inflight=4

A line starting with ``#`` is a comment; a ``#`` inside a key is part of the key, and so is a
space: only trailing words of the form ``field=value`` with a space before them are fields.
``weight`` is the key's share of the fair scheduler's turns (default 1); ``max_inflight`` caps
how many of its requests may be queued or running at once (default: the server's
``--max-inflight``). Fields belong to the key's *name*: several keys of one name (a rotation)
share one set of limits.
"""

from __future__ import annotations

import hmac
import math
import re
from dataclasses import dataclass
from pathlib import Path

#: A trailing ``field=value`` word after a key (a lower-case name, ``=``, no spaces).
_FIELD = re.compile(r"\s+([a-z_]+)=(\S*)$")


@dataclass(frozen=True)
class KeyLimits:
    """What the key file says about one name: its scheduling weight and in-flight cap.

    Args:
        weight: the owner's share of turns in the fair queue, relative to weight 1.
        max_inflight: at most this many requests queued or running; ``None``: the server's
            ``--max-inflight``.
    """

    weight: float = 1.0
    max_inflight: int | None = None


class Keys:
    """The accepted keys; ``None`` keys means an open server (loopback use only).

    Example:
        >>> keys = Keys({"s3cret": "alice"}, {"alice": KeyLimits(weight=2)})
        >>> keys.name_of("s3cret"), keys.weight_of("alice"), keys.weight_of("bob")
        ('alice', 2, 1.0)
    """

    def __init__(
        self, keys: dict[str, str] | None, limits: dict[str, KeyLimits] | None = None
    ) -> None:
        self._keys = keys  # key -> name
        self._limits = limits or {}  # name -> its fields from the key file

    @classmethod
    def from_file(cls, path: str | Path) -> Keys:
        """Read a key file (see the module docstring).

        Raises:
            ValueError: ``FILE:LINE: ...`` for a malformed line, an unknown field or a bad value.
        """
        keys: dict[str, str] = {}
        limits: dict[str, KeyLimits] = {}
        for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):  # a key may contain '#': comments are lines
                continue
            name, sep, rest = line.partition(":")
            key, fields = _fields(rest.strip(), f"{path}:{number}")
            if not sep or not name.strip() or not key:
                raise ValueError(f"{path}:{number}: expected 'name:key', got {raw!r}")
            name = name.strip()
            keys[key] = name
            if fields:
                mine = KeyLimits(**fields)
                if limits.get(name, mine) != mine:
                    raise ValueError(
                        f"{path}:{number}: {name!r} has other fields on an earlier line; "
                        "give a name's fields once, or the same on each of its lines"
                    )
                limits[name] = mine
        return cls(keys, limits)

    @property
    def open(self) -> bool:
        """Whether this server takes requests without a key (loopback use only)."""
        return self._keys is None

    def name_of(self, key: object) -> str | None:
        """The key's name, ``"anonymous"`` on an open server, ``None`` if refused."""
        if self._keys is None:
            return "anonymous"
        if not isinstance(key, str):
            return None
        for known, name in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return name
        return None

    def limits_of(self, name: str) -> KeyLimits:
        """The key file's fields for ``name`` (defaults for a name without any)."""
        return self._limits.get(name, KeyLimits())

    def weight_of(self, name: str) -> float:
        """The scheduling weight of ``name``: 1 unless its key file line says otherwise."""
        return self.limits_of(name).weight


def _fields(rest: str, where: str) -> tuple[str, dict]:
    """Split ``key field=value ...`` into the key and its checked fields."""
    fields: dict = {}
    while (found := _FIELD.search(rest)) is not None:
        field, value = found.groups()
        if field in fields:
            raise ValueError(f"{where}: field {field!r} given twice")
        fields[field] = _value(field, value, where)
        rest = rest[: found.start()].rstrip()
    return rest, fields


def _value(field: str, value: str, where: str) -> float | int:
    if field not in _PARSERS:
        raise ValueError(
            f"{where}: unknown field {field!r}; a key's fields are weight=W "
            "(a positive number) and max_inflight=N (a positive integer)"
        )
    try:
        number = _PARSERS[field](value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or number <= 0:
        kind = "integer" if _PARSERS[field] is int else "number"
        raise ValueError(f"{where}: {field}={value!r} is not valid: it must be a positive {kind}")
    return number


#: How each field's value is read.
_PARSERS = {"weight": float, "max_inflight": int}
