"""Auth: API keys, read from a file of ``name:key`` lines (a line starting ``#`` is a comment)."""

from __future__ import annotations

import hmac
from pathlib import Path


class Keys:
    """The accepted keys; ``None`` keys means an open server (loopback use only)."""

    def __init__(self, keys: dict[str, str] | None) -> None:
        self._keys = keys  # key -> name

    @classmethod
    def from_file(cls, path: str | Path) -> Keys:
        keys: dict[str, str] = {}
        for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):  # a key may contain '#': comments are lines
                continue
            name, sep, key = line.partition(":")
            if not sep or not name.strip() or not key.strip():
                raise ValueError(f"{path}:{number}: expected 'name:key', got {raw!r}")
            keys[key.strip()] = name.strip()
        return cls(keys)

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
