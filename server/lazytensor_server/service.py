"""Service: the server's request handling, independent of sockets.

``Service.handle(peer, frames, reply)`` takes one request's frames from any transport and
answers through ``reply(peer, frames)``, from this thread or a worker's. It decodes and checks
everything a peer sends before anything runs: the wire format and message types
(:mod:`lazytensor.protocol.messages`), the API key, the limits, every op against the
allow-list and every module path against the served model. Requests are matched on their
message class. A bad request gets a ``Failure`` reply and changes nothing; the service keeps
serving.

Every request belongs to its *owner*: the API key's name, or on an open server the client's
own random token (or its connection). Finished results are kept per owner
(:class:`~.results.Results`: bounded per owner, with a time-to-live), so a client that lost its
connection asks again (``fetch``) and gets the result instead of a second run; no other user
can fetch, acknowledge, cancel or even see a request that is not theirs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack

from lazytensor.core import ops
from lazytensor.core.errors import (
    LimitExceeded,
    NodeFailure,
    OpNotAllowedError,
    ProtocolError,
    UnknownRequest,
)
from lazytensor.core.graph import Graph, Node
from lazytensor.protocol import codec
from lazytensor.protocol import messages as m

from . import inputs, sessions
from .auth import Keys
from .child import Encoded
from .limits import Limits, check
from .metrics import Metrics
from .registry import ServedModel
from .results import Results, Slot
from .worker import Job, Worker

log = logging.getLogger("lazytensor.server")

Reply = Callable[[Any, list], None]

#: Run requests up to this many bytes are sent to an idle worker process before they are
#: decoded here (:meth:`Service._send_early`); larger ones are decoded on a decoding thread.
EARLY_BYTES = 64 << 10


class Service:
    """Handles requests for a set of served models.

    Args:
        models: the served models.
        keys: accepted API keys (``Keys(None)`` for an open loopback server).
        limits: per-request limits.
        keep: how many finished results to keep per owner for clients that ask again.
        keep_bytes: how many bytes of finished results to keep per owner.
        ttl: seconds a finished result is kept.
        trusted: run user-defined Python functions sent by clients (code from the network:
            only for clients you trust as you trust yourself).
        metrics: where to count requests, latency and refusals (Prometheus).
        isolate: run each model's jobs in a worker process that is killed and restarted when
            a job overruns ``--max-seconds`` inside an op (:mod:`.child`); else on the
            worker's thread.
    """

    def __init__(
        self,
        models: list[ServedModel],
        keys: Keys | None = None,
        limits: Limits | None = None,
        *,
        keep: int = 1024,
        keep_bytes: int = 4 << 30,
        ttl: float = 600.0,
        trusted: bool = False,
        metrics: Metrics | None = None,
        isolate: bool = False,
    ) -> None:
        self.trusted = trusted
        self.limits = limits or Limits()
        self.keys = keys or Keys(None)
        self.models = {m.name: m for m in models}
        self.wire_limits = codec.Limits(
            max_total_bytes=self.limits.max_request_bytes,
            max_header_bytes=self.limits.max_header_bytes,
        )
        self.workers = {
            m.name: Worker(m, self.limits, self._done, trusted=trusted, isolate=isolate)
            for m in models
        }
        self.ttl = ttl
        self.results = Results(keep, keep_bytes, ttl)
        self.running: dict[Slot, Job] = {}
        self.inflight: Counter = Counter()  # owner -> its jobs in self.running
        self.peers: dict[Slot, tuple[Any, Reply]] = {}
        self.closing = False
        self._lock = threading.Lock()
        self.metrics = metrics
        if metrics is not None:
            for name, worker in self.workers.items():
                metrics.watch_queue(name, worker.queue.qsize)

    # -- intake -------------------------------------------------------------------------------
    def handle(self, peer: Any, frames: list, reply: Reply) -> None:
        request_id = None
        size = _size(frames)
        early = None  # (worker, Early) while the request was sent early and is not a job yet
        try:
            check("request bytes", size, self.limits.max_request_bytes, "--max-request-bytes")
            if not self.keys.open:  # no work for a peer without a key: check it first, cheaply
                self._check_key_first(frames)
            early = self._send_early(frames, size)
            request = m.decode_request(frames, self.wire_limits)
            request_id = request.id
            key_name = self.keys.name_of(request.key)
            if key_name is None:
                raise PermissionError(
                    "invalid or missing API key: pass api_key=... to "
                    "lazytensor.connect or set LAZYTENSOR_API_KEY"
                )
            owner = self._owner(peer, request, key_name)
            if request.acks:  # results the client has received: forget them
                with self._lock:
                    for acked in request.acks:
                        self.results.pop((owner, acked))
            if isinstance(request, m.ListModels):
                self._models(peer, reply, request)
            elif isinstance(request, m.Describe):
                self._describe(peer, reply, request)
            elif isinstance(request, m.Run):
                if self._run(peer, reply, request, owner, frames, early):
                    early = None  # its job holds it now
            elif isinstance(request, m.Fetch):
                self._fetch(peer, reply, request, owner, frames)
            elif isinstance(request, m.Ack):
                with self._lock:
                    self.results.pop((owner, request.id))
            elif isinstance(request, m.Cancel):
                self._cancel((owner, request.id))
        except Exception as exc:  # every bad request is answered, none crashes the server
            if request_id is None:  # so the error reaches a client waiting on that id
                request_id = _peek_id(frames, self.wire_limits.max_header_bytes)
            log.info("refused request %r: %s: %s", request_id, type(exc).__name__, exc)
            if self.metrics is not None:
                self.metrics.refused.labels(type(exc).__name__).inc()
            reply(peer, m.encode(m.Failure.of(request_id, exc)))
        finally:
            if early is not None:  # refused, or a retry of a known request: it never runs
                early[0].child.forget(early[1])

    def _send_early(self, frames: list, size: int) -> tuple[Worker, Any] | None:
        """Send a small run request for an idle worker process's model to that process before
        decoding and checking it here, so that the process decodes it meanwhile (on a core of
        its own where one is free) rather than after the hand-off
        (:meth:`.child.ChildProcess.send_early`). It runs only once this service queued it.
        The header is unpacked for its kind and model alone, nothing else trusted: the
        process decodes and checks the request as this service does."""
        if size > EARLY_BYTES or len(frames) < 2:
            return None
        try:
            header = msgpack.unpackb(
                frames[1].buffer if hasattr(frames[1], "buffer") else frames[1]
            )
            if header["kind"] != "run":
                return None
            worker = self.workers[self._model(header["body"]["model"]).name]
        except Exception:  # not a run request as it should be: decoding says what is wrong
            return None
        child = worker.child
        if child is None or worker.busy or worker.queue.qsize():
            return None  # only for the next job: a queued one would hold memory in the process
        sent = child.send_early(frames)
        return (worker, sent) if sent is not None else None

    def _models(self, peer: Any, reply: Reply, request: m.ListModels) -> None:
        models = [
            served.info(self.workers[n].queue.qsize(), self.workers[n].served_count)
            for n, served in self.models.items()
        ]
        reply(peer, m.encode(m.ModelList(request.id, models)))

    def _describe(self, peer: Any, reply: Reply, request: m.Describe) -> None:
        served = self._model(request.model)
        reply(peer, m.encode(m.Description(request.id, **served.description())))

    def _check_key_first(self, frames: list) -> None:
        """Refuse a request whose key is wrong before its header is decoded: the key is read
        with a streaming unpacker that skips, without building, everything before it."""
        header = frames[1] if len(frames) > 1 else b""
        data = header.buffer if hasattr(header, "buffer") else header
        if len(data) > self.wire_limits.max_header_bytes:
            return  # decode refuses it by its size alone, before unpacking anything
        if self.keys.name_of(_peek(data, "key")) is None:
            raise PermissionError(
                "invalid or missing API key: pass api_key=... to "
                "lazytensor.connect or set LAZYTENSOR_API_KEY"
            )

    def _check_inflight(self, owner: Any) -> None:
        """At most ``--max-inflight`` (or the key's ``max_inflight``) jobs queued or running
        per owner, so that one client cannot queue unbounded work (caller holds the lock)."""
        limit, flag = self.limits.max_inflight, "--max-inflight"
        if owner[0] == "key":
            mine = self.keys.limits_of(owner[1]).max_inflight
            if mine is not None:
                limit, flag = mine, "the key file's max_inflight"
        if self.inflight[owner] >= limit:
            raise LimitExceeded(
                f"this client has {limit} request(s) queued or running, this server's limit "
                f"({flag}); wait for one to finish (or cancel one) and send again"
            )

    def _owner(self, peer: Any, request: m.Request, key_name: str) -> Any:
        """Whose request this is: the key's name; on an open server the client's token."""
        if not self.keys.open:
            return ("key", key_name)
        return ("token", request.key) if request.key else ("peer", peer)

    def _run(
        self,
        peer: Any,
        reply: Reply,
        request: m.Run,
        owner: Any,
        frames: list,
        early: tuple[Worker, Any] | None = None,
    ) -> bool:
        """Queue ``request`` (or answer a retry of it); whether it was queued as a job,
        holding ``early`` (the request sent early to the worker process of its model)."""
        request_id = request.id
        if request_id is None:
            raise ProtocolError("a run request needs a string 'id'")
        slot = (owner, request_id)
        with self._lock:
            known = self.results.get(slot) is not None or slot in self.running
        if known:  # a retry: never run a job twice (_resend takes the lock itself)
            self._resend(peer, reply, slot)
            return False
        if self.closing:
            raise RuntimeError(
                "the server is shutting down and accepts no new work; "
                "retry against another server or later"
            )
        served = self._model(request.model)
        job = self._job(request, owner, served, _size(frames))
        job.frames = frames  # what a worker process decodes again
        worker = self.workers[served.name]
        if early is not None and early[0] is worker:
            job.early = early[1]
        with self._lock:
            self._check_inflight(owner)  # under the lock: two decoding threads cannot both pass
            self.running[slot] = job
            self.inflight[owner] += 1
            self.peers[slot] = (peer, reply)
        with self._lock:  # "queued" goes out before the worker can say "running"
            position = job.position = worker.submit(job)
            if position:  # a job that runs next hears "running" at once, and nothing before
                reply(peer, m.encode(m.Status(request_id, "queued", position)))
        return job.early is not None

    def _fetch(self, peer: Any, reply: Reply, request: m.Fetch, owner: Any, frames: list) -> None:
        slot = (owner, request.id)
        with self._lock:
            known = self.results.get(slot) is not None or slot in self.running
        if known:
            self._resend(peer, reply, slot)
        elif request.request is not None:  # (never sent early: it is a fetch)
            self._run(peer, reply, request.request, owner, frames)
        else:
            raise self._unknown(request.id)

    def _unknown(self, request_id: Any) -> UnknownRequest:
        return UnknownRequest(
            f"no request {request_id!r} is running or kept on this server "
            f"(results are kept {self.ttl:g} s); send it again"
        )

    def _resend(self, peer: Any, reply: Reply, slot: Slot) -> None:
        with self._lock:
            frames = self.results.get(slot)
            if frames is not None:
                reply(peer, frames)
                return
            job = self.running.get(slot)
            if job is None:  # its result expired since the caller looked
                raise self._unknown(slot[1])
            self.peers[slot] = (peer, reply)
        state = "running" if job.started else "queued"
        reply(peer, m.encode(m.Status(slot[1], state)))

    # -- checks ---------------------------------------------------------------------------------
    def _model(self, name: Any) -> ServedModel:
        if isinstance(name, str):
            for served in self.models.values():
                if served.matches(name):
                    return served
        raise KeyError(
            f"this server does not serve a model {name!r}; it serves: {', '.join(self.models)}"
        )

    def _job(self, request: m.Run, owner: Any, served: ServedModel, size: int) -> Job:
        limits = self.limits  # request bytes were checked in handle, before decoding
        graph, segments = request.graph, request.segments
        nodes = len(graph.nodes) + sum(len(s.graph.nodes) for s in segments)
        check("graph nodes", nodes, limits.max_nodes, "--max-nodes")
        if segments:
            if graph.nodes or request.stop_at is not None or request.fake:
                raise ProtocolError("a session sends its segments only, with an empty graph")
            sessions.check_segments(segments)
            for index, segment in enumerate(segments):
                try:
                    _check_graph(segment.graph, served, self.trusted)
                except NodeFailure as failure:
                    failure.segment = index
                    raise
        elif any(node.op == "carry" for node in graph.nodes):
            raise ProtocolError("only a session's segments carry values between runs")
        _check_graph(graph, served, self.trusted)
        job = inputs.job_of(request, served.name, limits, positional=served.tokenizer is None)
        job.owner, job.bytes_in = owner, size
        job.weight = self.keys.weight_of(owner[1]) if owner[0] == "key" else 1.0
        return job

    # -- outcomes -------------------------------------------------------------------------------
    def _done(self, job: Job, message: m.Message | Encoded) -> None:
        """Called by a worker: a status, or the job's result or failure (encoded already
        when it comes from a worker process)."""
        slot = (job.owner, job.id)
        if isinstance(message, m.Status):
            self._send(slot, message)
            return
        if isinstance(message, Encoded):
            frames = message.frames
        else:
            try:
                frames = m.encode(message)
            except Exception as exc:  # e.g. a saved value of a type the wire cannot carry
                error = {"type": type(exc).__name__, "message": f"the result cannot be sent: {exc}"}
                message = m.Failure(job.id, error)
                frames = m.encode(message)
        job.frames = None  # the request's frames are not needed any more
        size = _size(frames)
        with self._lock:
            if self.running.pop(slot, None) is not None:
                self.inflight[job.owner] -= 1
                if not self.inflight[job.owner]:
                    del self.inflight[job.owner]
            self.results.put(slot, frames, size)
            peer, reply = self.peers.pop(slot, (None, None))
        now = time.monotonic()
        log.info(
            "request %s key=%s model=%s nodes=%d in=%dB out=%dB wait=%.1fms run=%.1fms %s",
            job.id[:12],
            _owner_name(job.owner),
            job.model,
            len(job.graph.nodes),
            job.bytes_in,
            size,
            (job.started - job.received) * 1e3,
            (now - job.started) * 1e3,
            message.KIND,
        )
        if self.metrics is not None:
            self.metrics.finished(job, message.KIND)
        if reply is not None:
            reply(peer, frames)

    def _send(self, slot: Slot, message: m.Message) -> None:
        with self._lock:
            peer, reply = self.peers.get(slot, (None, None))
        if reply is not None:
            reply(peer, m.encode(message))

    def _cancel(self, slot: Slot) -> None:
        """Drop the owner's job if it has not started; it fails with a "cancelled" error."""
        with self._lock:
            job = self.running.get(slot)
        if job is not None and self.workers[job.model].cancel(job):
            self._done(job, m.Failure(job.id, {**_CANCELLED, "cancelled": True}))
            if job.early is not None:
                self.workers[job.model].child.forget(job.early)

    def shutdown(self, grace: float = 30.0) -> None:
        """Refuse new work, let running jobs finish, fail the queued ones with a message."""
        self.closing = True
        for worker in self.workers.values():
            for job in worker.drain():
                message = "the server shut down before this request ran; send it again"
                self._done(job, m.Failure(job.id, {"type": "RuntimeError", "message": message}))
        for worker in self.workers.values():
            worker.stop(grace)


_CANCELLED = {"type": "RemoteError", "message": "the request was cancelled before it ran"}


def _owner_name(owner: Any) -> str:
    """An owner as the log shows it: a key's name, never a client's token."""
    kind, who = owner
    return str(who) if kind == "key" else "anonymous"


def _size(frames: list) -> int:
    return sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)


def _peek(data: Any, field: str) -> Any:
    """``body[field]`` of a msgpack header, skipping every other value unbuilt; ``None`` if
    the header is not a map holding a body map with that field."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() != "body":
                unpacker.skip()
                continue
            for _ in range(unpacker.read_map_header()):
                if unpacker.unpack() == field:
                    return unpacker.unpack()
                unpacker.skip()
            return None
    except Exception:
        return None
    return None


def _peek_id(frames: list, max_bytes: int) -> str | None:
    """The ``id`` in the header of a request that failed to decode, or ``None``.

    Read with :func:`_peek` from at most ``max_bytes``, only to address the error reply;
    nothing else of the request is trusted or used.
    """
    try:
        header = frames[1]
        data = header.buffer if hasattr(header, "buffer") else header
        if len(data) > max_bytes:
            return None
        request_id = _peek(data, "id")
    except Exception:
        return None
    return request_id if isinstance(request_id, str) and len(request_id) <= 128 else None


def _check_graph(graph: Graph, served: ServedModel, trusted: bool) -> None:
    """Every op allow-listed, every module path one of the served model's.

    A refusal names its node, so the client re-raises it at the user's line.
    """
    for node in graph.nodes:
        try:
            if node.op in sessions.OPS:
                sessions.check_node(node, graph, served)
                continue
            _check_node(node, served, trusted)
        except (AttributeError, OpNotAllowedError) as exc:
            raise NodeFailure(node.id, exc) from None


def _check_node(node: Node, served: ServedModel, trusted: bool) -> None:
    if node.is_point or node.op == "module":
        path, site, name = node.target.partition(":")  # a source site: "<module path>:<name>"
        if path not in served.paths:
            raise AttributeError(f"the model {served.name!r} has no module {path!r}")
        if site and node.op == "module":
            raise OpNotAllowedError(f"{node.target!r} is a call inside a forward, not a module")
        if site:
            served.check_site(path, name)
        if node.target == "" and node.op in ("set_input", "set_inputs"):
            raise OpNotAllowedError(
                "a graph may not rewrite the model's own inputs (they are the batch, held to "
                "this server's input allow-list); send them as the request's inputs"
            )
        if node.op == "skip" and (not path or site):
            raise OpNotAllowedError(
                f"skip of {node.target!r} refused: skip() takes a submodule of the served model "
                "(not its root or a source site)"
            )
    elif node.op == "stop":  # ends the run once the nodes it reads have run; names nothing
        if node.target or node.kwargs:
            raise OpNotAllowedError("a stop node takes no target and no keyword arguments")
    elif node.kwargs.get("out") is not None:
        raise OpNotAllowedError(f"{node.target} with out= is refused: it writes behind the graph")
    elif node.op == "function":
        ops.resolve_function(node.target)
    elif node.op == "method":
        ops.check_method(node.target)
    elif node.op == "getattr":
        ops.check_attribute(node.target)
    elif node.op == "python":
        if not trusted:
            raise OpNotAllowedError(
                f"user-defined Python function {node.target!r} refused: this server runs only "
                "allow-listed ops (lazytensor.ops); its operator must start it with "
                "--trusted-clients to run client code"
            )
    else:
        raise OpNotAllowedError(f"unknown op {node.op!r}")
