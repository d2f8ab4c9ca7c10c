"""Scheduler: a model's waiting jobs, served round robin across their owners.

Each owner (an API key's name, or an open server's client token) has its own first-in,
first-out queue, and the worker takes one job from each owner in turn (or, with a key's
``weight=`` in the key file, that many jobs per turn on average: deficit round robin). A user
who sends a hundred requests does not make the next user's single request wait behind all of
them: it runs after at most one job of each other owner (of weight 1). A session (many traces
sent as one request) is one job, one slot in its owner's queue.

:meth:`FairQueue.get_group` takes the next job and, to run with it in one forward pass
(:mod:`.batching`), the first waiting job of other owners, in their turn order, that fit with
it: at most one job per owner, so one owner's burst never fills a group.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class FairQueue:
    """Jobs by owner; :meth:`get` takes the next one round robin (``None`` once closed)."""

    def __init__(self) -> None:
        self._queues: dict[Any, deque] = {}
        self._turns: deque = deque()  # owners with waiting jobs, next first
        self._credit: dict[Any, float] = {}  # jobs an owner may still take (its key's weight)
        self._ready = threading.Condition()
        self._closed = False

    def put(self, job: Any) -> int:
        """Queue ``job``; how many jobs will run before it (0 = it runs next)."""
        with self._ready:
            mine = self._queues.setdefault(job.owner, deque())
            ahead = len(mine)
            # Round robin: before this owner's next job each other owner runs at most as many
            # jobs as this one has ahead of it, plus one (an upper bound on the wait).
            others = sum(min(len(q), ahead + 1) for o, q in self._queues.items() if o != job.owner)
            mine.append(job)
            if ahead == 0:
                self._turns.append(job.owner)
            self._ready.notify()
            return ahead + others

    def get(self) -> Any:
        """The next job, waiting for one; ``None`` once the queue is closed."""
        with self._ready:
            while not self._turns and not self._closed:
                self._ready.wait()
            if not self._turns:
                return None
            while True:  # ends: every turn adds a positive weight to its owner's credit
                owner = self._turns.popleft()
                mine = self._queues[owner]
                credit = self._credit.get(owner, 0.0)
                if credit < 1:
                    credit += max(float(getattr(mine[0], "weight", 1.0)), 1e-3)
                if credit < 1:  # a weight under 1: this owner runs on a later turn
                    self._credit[owner] = credit
                    self._turns.append(owner)
                    continue
                job = mine.popleft()
                credit -= 1
                if not mine:
                    del self._queues[owner]
                    self._credit.pop(owner, None)
                elif credit >= 1:  # a weight over 1: another job in the same turn
                    self._credit[owner] = credit
                    self._turns.appendleft(owner)
                else:  # its next job waits for everyone else's turn
                    self._credit[owner] = credit
                    self._turns.append(owner)
                return job

    def get_group(self, limit: int, fits: Callable[[list, Any], bool]) -> list:
        """The next job and up to ``limit - 1`` more, each the first waiting job of another
        owner for which ``fits(group so far, job)``; ``[]`` once the queue is closed.

        Owners whose job joins move to the back of the turns, as if each took its own turn;
        the others keep their places.
        """
        first = self.get()
        if first is None:
            return []
        group = [first]
        with self._ready:
            owners = {first.owner}
            for owner in list(self._turns):
                if len(group) >= limit:
                    break
                if owner in owners:
                    continue
                mine = self._queues[owner]
                if not fits(group, mine[0]):
                    continue
                group.append(mine.popleft())
                owners.add(owner)
                self._turns.remove(owner)
                if mine:
                    self._turns.append(owner)
                else:
                    del self._queues[owner]
        return group

    def ahead(self, limit: int) -> list[tuple[Any, int]]:
        """The first ``limit`` waiting jobs in the order turns would take them (one per owner
        per round; weights not counted), each with how many waiting jobs go before it."""
        with self._ready:
            queues = [list(self._queues[owner]) for owner in self._turns]
        order: list[Any] = []
        depth = 0
        while len(order) < limit and any(len(q) > depth for q in queues):
            order.extend(q[depth] for q in queues if len(q) > depth)
            depth += 1
        return [(job, index) for index, job in enumerate(order[:limit])]

    def qsize(self) -> int:
        with self._ready:
            return sum(len(q) for q in self._queues.values())

    def drain(self) -> list:
        """Remove and return every waiting job."""
        with self._ready:
            jobs = [job for q in self._queues.values() for job in q]
            self._queues.clear()
            self._turns.clear()
            self._credit.clear()
            return jobs

    def close(self) -> None:
        """Wake the worker for good: :meth:`get` returns ``None`` when nothing is left."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
