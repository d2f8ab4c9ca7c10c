"""Transports: how a client's frames reach a server and its replies come back.

A transport moves lists of frames and nothing else; it knows no message kinds. Two exist:
:class:`ZmqTransport` (a DEALER socket to a server's ROUTER socket, the real thing) and
:class:`InProcessTransport` (hands frames to a server object in this process, so the whole
client and server logic can be tested without sockets).
"""

from __future__ import annotations

import queue
from typing import Any, Protocol


class Transport(Protocol):
    def send(self, frames: list) -> None: ...

    def recv(self, timeout: float) -> list | None:
        """The next reply's frames, or ``None`` if none came within ``timeout`` seconds."""

    def reconnect(self) -> None: ...

    def close(self) -> None: ...


class ZmqTransport:
    """A DEALER socket connected to ``address`` (e.g. ``tcp://127.0.0.1:5555``)."""

    def __init__(self, address: str) -> None:
        import zmq

        self.address = address
        self._zmq = zmq
        self._context = zmq.Context.instance()
        self._socket = self._connect()

    def _connect(self) -> Any:
        socket = self._context.socket(self._zmq.DEALER)
        socket.setsockopt(self._zmq.LINGER, 0)
        socket.connect(self.address)
        return socket

    def send(self, frames: list) -> None:
        self._socket.send_multipart(frames, copy=False)

    def recv(self, timeout: float) -> list | None:
        if not self._socket.poll(int(timeout * 1000)):
            return None
        return self._socket.recv_multipart(copy=False)

    def reconnect(self) -> None:
        """A fresh socket (a new identity): used after a lost connection."""
        self._socket.close(0)
        self._socket = self._connect()

    def close(self) -> None:
        self._socket.close(0)


class InProcessTransport:
    """Delivers frames to ``server.handle(peer, frames, reply)`` in this process."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._replies: queue.Queue = queue.Queue()
        self._peer = object()

    def send(self, frames: list) -> None:
        frames = [bytes(f) if isinstance(f, memoryview) else f for f in frames]
        self.server.handle(self._peer, frames, self._deliver)

    def _deliver(self, peer: Any, frames: list) -> None:
        if peer is self._peer:
            self._replies.put(frames)

    def recv(self, timeout: float) -> list | None:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            return None

    def reconnect(self) -> None:
        self._peer = object()

    def close(self) -> None:
        pass
