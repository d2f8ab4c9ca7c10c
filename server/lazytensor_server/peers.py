"""Peers: the connections each client address holds on the server's socket, capped.

ZeroMQ accepts every TCP connection on its own and tells the application nothing about it; its
socket monitor does. ``EVENT_ACCEPTED`` carries the new connection's file descriptor and
``EVENT_DISCONNECTED`` the same descriptor when the connection ends (the peer left, its
handshake failed or was refused by ZAP, or it was shut down). :class:`Peers` reads those events
on the app's event loop, asks each new descriptor for its peer's address (``getpeername`` on a
duplicate of it) and counts open connections per address. A connection that would put its
address over ``--max-connections-per-address`` is shut down at once (``shutdown(2)``, which
ZeroMQ sees as the peer leaving: it closes the connection and frees the descriptor), so a
flood of idle connections from one address holds at most that many descriptors and never
locks out clients at other addresses. The cap works the same with or without CurveZMQ: it is about
descriptors, not identities.

A connection is counted from its accept, before any handshake, so peers that connect and
never speak count too. One over the cap is dropped a moment after its accept, on loopback
often just after its handshake; a request it managed to send first is served like any other
(it passed every other check). Drops are logged at most once per :data:`LOG_EVERY` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket as sockets
import time
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("lazytensor.server")

#: Seconds between two log lines about dropped connections.
LOG_EVERY = 10.0
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


class Peers:
    """Count the connections of a ZeroMQ socket per peer address; shut down those over ``cap``.

    Args:
        cap: connections one address may hold open at once; 0 for no cap (nothing is watched).

    Example::

        peers = Peers(64)
        peers.start(socket)  # before socket.bind(...): every connection is seen
        ...
        await peers.stop()  # before socket.close()
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.counts: collections.Counter[str] = collections.Counter()  # address -> open
        self.dropped = 0  # since the server started
        self._open: dict[int, str] = {}  # descriptor -> address, for connections counted
        self._monitor: Any = None
        self._socket: Any = None
        self._task: asyncio.Task | None = None
        self._logged_at = -LOG_EVERY
        self._unlogged = 0

    def start(self, socket: Any) -> None:
        """Watch ``socket`` (a :mod:`zmq.asyncio` socket) from the running event loop."""
        if self.cap <= 0:
            return
        self._socket = socket
        address = f"inproc://lazytensor-peers-{id(self)}"
        socket.monitor(address, _EVENTS)
        self._monitor = socket.context.socket(zmq.PAIR)
        # No high-water mark: a lost "disconnected" event would hold its slot for good.
        self._monitor.setsockopt(zmq.RCVHWM, 0)
        self._monitor.connect(address)
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching; the socket itself stays open."""
        if self._task is None:
            return
        self._socket.disable_monitor()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._monitor.close(linger=0)
        self._task = None

    async def _watch(self) -> None:
        while True:
            frames = await self._monitor.recv_multipart()
            try:
                event = parse_monitor_message(frames)
                self.seen(event["event"], event["value"], event["endpoint"])
            except Exception:  # ZeroMQ's own events, never a client's bytes: keep watching
                log.exception("could not account for a connection event")

    def seen(self, event: int, fd: int, endpoint: bytes) -> None:
        """Account for one monitor event: connection ``fd`` accepted on ``endpoint``, or gone."""
        if event == zmq.EVENT_DISCONNECTED:
            self._forget(fd)
            return
        if event != zmq.EVENT_ACCEPTED:
            return
        self._forget(fd)  # a number is reused only after its "disconnected": never, but be sure
        with _duplicate(fd) as connection:
            address = _peer_of(connection, endpoint)
            if address is None:  # gone already, or not a TCP connection of this socket
                return
            if self.counts[address] < self.cap:
                self.counts[address] += 1
                self._open[fd] = address
                return
            with contextlib.suppress(OSError):  # it may have ended on its own meanwhile
                connection.shutdown(sockets.SHUT_RDWR)
        self._dropped(address)

    def _forget(self, fd: int) -> None:
        address = self._open.pop(fd, None)
        if address is not None:
            self.counts[address] -= 1
            if self.counts[address] <= 0:
                del self.counts[address]

    def _dropped(self, address: str) -> None:
        self.dropped += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            log.info(
                "dropped %d connection(s) over --max-connections-per-address %d (last from %s, "
                "which holds %d)",
                self._unlogged,
                self.cap,
                address,
                self.counts[address],
            )
            self._logged_at, self._unlogged = now, 0


@contextlib.contextmanager
def _duplicate(fd: int) -> Any:
    """A Python socket on a duplicate of ZeroMQ's descriptor ``fd`` (closing it leaves ZeroMQ's
    open; ``shutdown`` on it ends the connection for both), or ``None``."""
    try:
        connection = sockets.socket(fileno=os.dup(fd))
    except OSError:  # closed already, or not a socket
        yield None
        return
    try:
        yield connection
    finally:
        connection.close()


def _peer_of(connection: Any, endpoint: bytes) -> str | None:
    """The peer's address of a TCP connection accepted on ``endpoint`` (``tcp://HOST:PORT``).

    The descriptor is checked to be such a connection, on the endpoint's port: between the
    accept and this event, ZeroMQ may have closed it and the number may name something else."""
    if connection is None or connection.family not in (sockets.AF_INET, sockets.AF_INET6):
        return None
    try:
        port = int(endpoint.decode(errors="replace").rpartition(":")[2])
        if connection.getsockname()[1] != port:
            return None
        return str(connection.getpeername()[0])
    except (OSError, ValueError, IndexError):
        return None
