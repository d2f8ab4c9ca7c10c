"""Transports: how a client's frames reach a server and its replies come back.

A transport moves lists of frames and nothing else; it knows no message kinds. Two exist:
:class:`ZmqTransport` (a DEALER socket to a server's ROUTER socket, the real thing) and
:class:`InProcessTransport` (hands frames to a server object in this process, so the whole
client and server logic can be tested without sockets).
"""

from __future__ import annotations

import contextlib
import queue
from typing import Any, Protocol

#: How long :meth:`ZmqTransport.send` waits for a connection to queue a request on.
SEND_WAIT_MS = 1000


class Transport(Protocol):
    def send(self, frames: list) -> None: ...

    def recv(self, timeout: float) -> list | None:
        """The next reply's frames, or ``None`` if none came within ``timeout`` seconds."""

    def reconnect(self) -> None: ...

    def close(self) -> None: ...


class ZmqTransport:
    """A DEALER socket connected to ``address`` (e.g. ``tcp://127.0.0.1:5555``).

    With ``curve`` (the server's public key, this client's public and secret keys, Z85 bytes)
    the connection is encrypted with CurveZMQ and the server checks this client's key at the
    handshake (:mod:`lazytensor.protocol.curve`).
    """

    def __init__(self, address: str, curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        import zmq

        self.address = address
        self.curve = curve
        self._zmq = zmq
        self._context = zmq.Context.instance()
        self._wait_ms = -1  # the socket's receive timeout (RCVTIMEO), set only when it changes
        self._socket = self._connect()

    def _connect(self) -> Any:
        socket = self._context.socket(self._zmq.DEALER)
        socket.setsockopt(self._zmq.LINGER, 0)
        self._wait_ms = -1
        if self.curve is not None:
            server, public, secret = self.curve
            socket.setsockopt(self._zmq.CURVE_SERVERKEY, server)
            socket.setsockopt(self._zmq.CURVE_PUBLICKEY, public)
            socket.setsockopt(self._zmq.CURVE_SECRETKEY, secret)
        socket.connect(self.address)
        return socket

    def send(self, frames: list) -> None:
        """Queue ``frames``; drop them if the socket has no connection to queue them on.

        A DEALER whose handshake a CurveZMQ server refused has no connection left, and a
        blocking send would wait forever. The client notices a dropped request as silence:
        it asks again on a fresh socket, and names the likely cause when nothing ever answers
        (:meth:`~lazytensor.backends.client.Connection.no_answer`).
        """
        zmq = self._zmq
        try:  # the common case, a connection with room: no poll before the send
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return
        except zmq.Again:
            pass
        if self._socket.poll(SEND_WAIT_MS, zmq.POLLOUT):
            with contextlib.suppress(zmq.Again):
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)

    def recv(self, timeout: float) -> list | None:
        """A blocking receive bounded by the socket's RCVTIMEO, not a poll then a receive: one
        call into ZeroMQ per reply. The option is set only when ``timeout`` changes (a client
        waits in slices of one length)."""
        wait_ms = max(0, int(timeout * 1000))
        if wait_ms != self._wait_ms:
            self._socket.setsockopt(self._zmq.RCVTIMEO, wait_ms)
            self._wait_ms = wait_ms
        try:
            return self._socket.recv_multipart(copy=False)
        except self._zmq.Again:
            return None

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
