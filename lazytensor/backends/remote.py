"""Remote: run graphs on a lazytensor server, through a client connection.

``remote=`` takes ``True`` (the server at ``$LAZYTENSOR_SERVER``), an address such as
``"tcp://gpu-host:5555"``, or a connection; :func:`connection` turns each into a client, one
per address and thread (ZeroMQ sockets are not shared across threads).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..core.graph import Batch, Graph, Segment
from .base import RunRequest
from .client import DEFAULT_ADDRESS, Connection, RemoteJob


class RemoteBackend:
    """Runs graphs on the model a server serves as ``model``."""

    def __init__(self, client: Connection, model: str) -> None:
        self.client, self.model = client, model

    def run(self, request: RunRequest) -> dict[int, Any]:
        return self.submit(request).result()

    def submit(self, request: RunRequest) -> RemoteJob:
        return self.client.submit(self.model, request)

    def run_session(self, segments: list[Segment]) -> list[dict[int, Any]]:
        values = self.run(RunRequest(Graph(), Batch(), segments=tuple(segments)))
        return [values.get(i, {}) for i in range(len(segments))]


_clients = threading.local()


def connection(remote: Any) -> Connection:
    """The client for a ``remote=`` argument: a connection as is, else this thread's client
    for the address (``True``: ``$LAZYTENSOR_SERVER``)."""
    if isinstance(remote, Connection):
        return remote
    address = remote if isinstance(remote, str) else None
    address = address or os.environ.get("LAZYTENSOR_SERVER") or DEFAULT_ADDRESS
    cache = _clients.__dict__.setdefault("by_address", {})
    if address not in cache:
        cache[address] = Connection(address)
    return cache[address]
