"""Client: talks to a lazytensor server over a :mod:`~lazytensor.transport`.

A client sends requests (``models``, ``describe``, ``run``, ``fetch``) and reads the replies
for its request id: ``status`` messages (received, queued with position, running) shown as a
progress line on long waits, then one ``result`` or ``error``. Every ``run`` carries a request
id chosen here, so a retry after a lost connection (``fetch`` with that id, on a fresh socket)
returns the stored result instead of running the job twice.

Errors travel as data: an error naming a node becomes a
:class:`~lazytensor.errors.NodeFailure`, which the trace re-raises at the user's line with
the original exception type when it is a known one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any

import torch

from . import errors, wire
from .errors import NodeFailure, RemoteError
from .executor import Batch
from .graph import Graph
from .transport import InProcessTransport, Transport, ZmqTransport

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"

_EXCEPTIONS: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (IndexError, ValueError, TypeError, KeyError, AttributeError, RuntimeError,
                ZeroDivisionError, NotImplementedError, TimeoutError, PermissionError,
                errors.GraphError, errors.OpNotAllowedError, errors.ProtocolError,
                errors.TraceError, errors.LazytensorError, errors.LimitExceeded)
}  # fmt: skip


class Client:
    """A connection to one server.

    Args:
        address: ``tcp://host:port``; default ``$LAZYTENSOR_SERVER`` or ``tcp://127.0.0.1:5555``.
        api_key: default ``$LAZYTENSOR_API_KEY``.
        transport: use this transport instead of a ZeroMQ socket (tests, embedding).
        timeout: seconds to wait for a request's result before giving up.
        silence: seconds without any reply after which the client asks again (``fetch``),
            on a fresh socket if the first ask also goes unanswered.
    """

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        transport: Transport | None = None,
        timeout: float = 600.0,
        silence: float = 5.0,
    ) -> None:
        self.address = address or os.environ.get("LAZYTENSOR_SERVER") or DEFAULT_ADDRESS
        self.api_key = api_key if api_key is not None else os.environ.get("LAZYTENSOR_API_KEY")
        self.transport = transport if transport is not None else ZmqTransport(self.address)
        self.timeout, self.silence = timeout, silence
        self._lock = threading.Lock()
        # Replies read by one job that belong to another job still in flight on this client.
        self._mail: dict[str, list[wire.Message]] = {}

    # -- public API ---------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """What the server serves: name, parameter count, dtype, device, queue length."""
        return self._call("models", {})["models"]

    def model(self, name: str) -> Any:
        """A handle on a served model, built from the server's description of it.

        No weights, model class or config are needed here: the handle's envoy tree mirrors
        the server's module tree and its tokenizer is the one the server ships.
        """
        from .model import LanguageModel
        from .spec import ModuleSpec

        info = self._call("describe", {"model": name})
        spec = ModuleSpec.from_dict(info["tree"])
        tokenizer = _tokenizer(info["tokenizer"])
        return LanguageModel(spec, tokenizer=tokenizer, remote=(self, name))

    def close(self) -> None:
        self.transport.close()

    # -- running graphs -----------------------------------------------------------------------
    def execute(
        self,
        model: str,
        graph: Graph,
        batch: Batch,
        *,
        stop_at: int | None = None,
        fake_mode: Any = None,
    ) -> dict[int, Any]:
        """Run ``graph`` on the server's ``model``; returns node id -> value."""
        return self.submit(model, graph, batch, stop_at=stop_at, fake_mode=fake_mode).result()

    def submit(
        self,
        model: str,
        graph: Graph,
        batch: Batch,
        *,
        stop_at: int | None = None,
        fake_mode: Any = None,
    ) -> RemoteJob:
        body = {
            "id": uuid.uuid4().hex,
            "model": model,
            "graph": wire.encode_graph(graph),
            "batch": {
                "args": list(batch.args),
                "kwargs": batch.kwargs,
                "size": batch.size,
                "generate": batch.generate,
            },
            "stop_at": stop_at,
            "fake": fake_mode is not None,
        }
        job = RemoteJob(self, body, fake_mode)
        job.send()
        return job

    # -- plumbing -----------------------------------------------------------------------------
    def _call(self, kind: str, body: dict) -> dict:
        job = RemoteJob(self, {"id": uuid.uuid4().hex, **body}, None, kind=kind)
        job.send()
        return job.wait()

    def _frames(self, kind: str, body: dict) -> list:
        return wire.encode(kind, {**body, "key": self.api_key})


class RemoteJob:
    """One request in flight: poll :meth:`status`, block on :meth:`result`."""

    def __init__(self, client: Client, body: dict, fake_mode: Any, kind: str = "run") -> None:
        self.client, self.body, self.kind = client, body, kind
        self.id: str = body["id"]
        self.fake_mode = fake_mode
        self._state = "sent"
        self._reply: dict | None = None
        self._error: BaseException | None = None

    def send(self) -> None:
        with self.client._lock:
            self.client._mail.setdefault(self.id, [])
            self.client.transport.send(self.client._frames(self.kind, self.body))

    def status(self) -> str:
        """``sent``, ``received``, ``queued``, ``running``, ``completed`` or ``error``."""
        if self._reply is None and self._error is None:
            with self.client._lock:
                self._pump(0.0)
        return self._state

    def result(self) -> dict[int, Any]:
        """Wait for the job; returns node id -> value (raises the server's error)."""
        reply = self.wait()
        values = {int(k): v for k, v in reply["values"].items()}
        if self.fake_mode is not None:
            values = {k: _fake(v, self.fake_mode) for k, v in values.items()}
        return values

    def wait(self) -> dict:
        deadline = time.monotonic() + self.client.timeout
        started, shown, asked = time.monotonic(), False, 0
        with self.client._lock:
            while self._reply is None and self._error is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no result for request {self.id} within {self.client.timeout:.0f} s"
                    )
                if not self._pump(self.client.silence):
                    asked += 1
                    self._ask_again(reconnect=asked > 1)
                else:
                    asked = 0
                if time.monotonic() - started > 1.0 and self._reply is None:
                    shown = _progress(self.id, self._state, self._position) or shown
            if self._reply is not None and self.kind == "run":  # the server may forget it now
                self.client.transport.send(self.client._frames("ack", {"id": self.id}))
        if shown:
            _progress(self.id, self._state, None, end=True)
        if self._error is not None:
            raise self._error
        return self._reply

    def _ask_again(self, reconnect: bool) -> None:
        """After silence: ask for the job by id (a read-only request is simply sent again)."""
        transport = self.client.transport
        if reconnect:
            transport.reconnect()
        if self.kind == "run":
            transport.send(self.client._frames("fetch", {"id": self.id}))
        else:
            transport.send(self.client._frames(self.kind, self.body))

    _position: int | None = None

    def _pump(self, timeout: float) -> bool:
        """Read replies for a while; ``False`` if none came at all."""
        transport, mail, got = self.client.transport, self.client._mail, False
        for message in mail.get(self.id, []):  # read earlier by another job
            got = True
            self._take(message)
            if self._reply is not None or self._error is not None:
                break
        end = time.monotonic() + timeout
        while self._reply is None and self._error is None:
            frames = transport.recv(max(0.0, end - time.monotonic()))
            if frames is None:
                break
            got = True
            message = wire.decode(frames)
            other = message.body.get("id")
            if other == self.id:
                self._take(message)
            elif other in mail:
                mail[other].append(message)  # another job of this client: keep it for it
            # else: a late reply to a request that is already answered
        if self._reply is not None or self._error is not None:
            mail.pop(self.id, None)
        else:
            mail[self.id] = []
        return got

    def _take(self, message: wire.Message) -> None:
        body = message.body
        if message.kind == "status":
            self._state, self._position = body.get("state", self._state), body.get("position")
        elif message.kind == "error" and body.get("unknown") and self.kind == "run":
            self.client.transport.send(self.client._frames("run", self.body))  # it was lost
        elif message.kind == "error":
            self._state, self._error = "error", _error(body)
        else:
            self._state, self._reply = "completed", body


def _error(body: dict) -> BaseException:
    cls = _EXCEPTIONS.get(str(body.get("type")), RemoteError)
    message = str(body.get("message", "the server failed the request"))
    try:
        exc = cls(message)
    except Exception:
        exc = RemoteError(message)
    node = body.get("node")
    if isinstance(node, int):
        return NodeFailure(node, exc, str(body.get("hint") or ""))
    return exc


def _fake(value: Any, mode: Any) -> Any:
    """Turn the server's shape descriptions back into fake tensors of ``mode``."""
    if isinstance(value, wire.Record) and value.cls_name == "TensorMeta":
        dtype = wire.DTYPES[value["dtype"]]
        with mode:
            return torch.empty(tuple(value["shape"]), dtype=dtype)
    if isinstance(value, wire.Record):
        return wire.Record(value.cls_name, {k: _fake(v, mode) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_fake(v, mode) for v in value)
    if isinstance(value, dict):
        return {k: _fake(v, mode) for k, v in value.items()}
    return value


def _tokenizer(data: dict) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    special = {k: v for k, v in data.get("special", {}).items() if isinstance(v, str)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(data["json"]), **special)


def _progress(job: str, state: str, position: int | None, end: bool = False) -> bool:
    if not sys.stderr.isatty():
        return False
    if end:
        sys.stderr.write("\r\033[K")
    else:
        where = f" (position {position})" if position is not None else ""
        sys.stderr.write(f"\r\033[K[lazytensor] job {job[:8]}: {state}{where}")
    sys.stderr.flush()
    return True


_clients = threading.local()


def connect(address: str | None = None, api_key: str | None = None, **kwargs: Any) -> Client:
    """Connect to a server (defaults from ``LAZYTENSOR_SERVER`` / ``LAZYTENSOR_API_KEY``).

    Example:
        >>> client = connect("tcp://127.0.0.1:5555")        # doctest: +SKIP
        >>> model = client.model("llama")                  # doctest: +SKIP
    """
    return Client(address, api_key, **kwargs)


def default_client(address: str | None = None) -> Client:
    """This thread's client for ``address`` (ZeroMQ sockets are not shared across threads)."""
    address = address or os.environ.get("LAZYTENSOR_SERVER") or DEFAULT_ADDRESS
    cache = _clients.__dict__.setdefault("by_address", {})
    if address not in cache:
        cache[address] = Client(address)
    return cache[address]


def in_process(server: Any, api_key: str | None = None, **kwargs: Any) -> Client:
    """A client wired straight to a server object in this process (tests, embedding)."""
    return Client("inproc", api_key, transport=InProcessTransport(server), **kwargs)
