"""Results: finished replies kept for clients that ask again, each owned by one user.

A result is kept under its *slot*, ``(owner, request id)``: the owner is the API key's name on
a server with keys, and the client's own token (or, without one, its connection) on an open
server. Only the owner can fetch it, acknowledge it or see that it exists; another user naming
the same id finds nothing. Each owner has its own quota (count and bytes), so one user's many
requests never evict another user's results; every result also expires after ``ttl`` seconds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

Slot = tuple[Any, str]  # (owner, request id)


class Results:
    """Kept results by slot, oldest first, within per-owner quotas and a time-to-live.

    Not thread-safe on its own: the service calls it under its lock.
    """

    def __init__(self, keep: int, keep_bytes: int, ttl: float) -> None:
        self.keep, self.keep_bytes, self.ttl = keep, keep_bytes, ttl
        self._kept: OrderedDict[Slot, tuple[float, list, int]] = OrderedDict()
        self._usage: dict[Any, list[int]] = {}  # owner -> [count, bytes]

    def put(self, slot: Slot, frames: list, size: int) -> None:
        self.pop(slot)
        self._kept[slot] = (time.monotonic(), frames, size)
        usage = self._usage.setdefault(slot[0], [0, 0])
        usage[0] += 1
        usage[1] += size
        self._evict(slot[0])

    def get(self, slot: Slot) -> list | None:
        """The kept frames of ``slot``, if it is kept and fresh."""
        self.expire()
        kept = self._kept.get(slot)
        return kept[1] if kept is not None else None

    def pop(self, slot: Slot) -> None:
        kept = self._kept.pop(slot, None)
        if kept is not None:
            usage = self._usage[slot[0]]
            usage[0] -= 1
            usage[1] -= kept[2]
            if usage[0] == 0:
                del self._usage[slot[0]]

    def expire(self) -> None:
        """Drop results past their time-to-live (the oldest are first)."""
        now = time.monotonic()
        while self._kept:
            slot, (stamp, _, _) = next(iter(self._kept.items()))
            if now - stamp < self.ttl:
                return
            self.pop(slot)

    def _evict(self, owner: Any) -> None:
        """Drop ``owner``'s oldest results while it is over its quota."""
        usage = self._usage.get(owner)
        if usage is None or (usage[0] <= self.keep and usage[1] <= self.keep_bytes):
            return
        for slot in [s for s in self._kept if s[0] == owner]:
            self.pop(slot)
            usage = self._usage.get(owner)
            if usage is None or (usage[0] <= self.keep and usage[1] <= self.keep_bytes):
                return
