"""Service: the server's request handling, independent of sockets.

``Service.handle(peer, frames, reply)`` takes one request's frames from any transport and
answers through ``reply(peer, frames)``, from this thread or a worker's. It decodes and checks
everything a peer sends before anything runs: the wire format (:mod:`lazytensor.wire`), the
API key, the limits, every op against the allow-list and every module path against the
served model. A bad request gets an ``error`` reply and changes nothing; the service keeps
serving.

Finished results are kept (bounded, with a time-to-live) under their request id, so a client
that lost its connection asks again (``fetch``) and gets the result instead of a second run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack

from lazytensor import ops, wire
from lazytensor.errors import NodeFailure, OpNotAllowedError, ProtocolError
from lazytensor.executor import Batch
from lazytensor.graph import Graph, Node

from .auth import Keys
from .limits import Limits, check
from .registry import ServedModel
from .worker import Job, Worker, error_body

log = logging.getLogger("lazytensor.server")

Reply = Callable[[Any, list], None]

#: Keyword inputs a client may pass to a model's forward or ``generate``.
INPUT_KWARGS = frozenset(
    """input_ids attention_mask position_ids token_type_ids use_cache
    max_new_tokens min_new_tokens do_sample temperature top_k top_p num_beams
    repetition_penalty no_repeat_ngram_size length_penalty pad_token_id eos_token_id
    bos_token_id num_return_sequences typical_p logits_to_keep""".split()
)


class UnknownRequest(KeyError):
    """A fetch for an id this server does not hold: the client sends the request again."""


class Service:
    """Handles requests for a set of served models.

    Args:
        models: the served models.
        keys: accepted API keys (``Keys(None)`` for an open loopback server).
        limits: per-request limits.
        keep: how many finished results to keep for clients that ask again.
        keep_bytes: how many bytes of finished results to keep.
        ttl: seconds a finished result is kept.
        trusted: run user-defined Python functions sent by clients (code from the network:
            only for clients you trust as you trust yourself).
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
    ) -> None:
        self.trusted = trusted
        self.limits = limits or Limits()
        self.keys = keys or Keys(None)
        self.models = {m.name: m for m in models}
        self.wire_limits = wire.Limits(max_total_bytes=self.limits.max_request_bytes)
        self.workers = {m.name: Worker(m, self.limits, self._done, trusted=trusted) for m in models}
        self.keep, self.keep_bytes, self.ttl = keep, keep_bytes, ttl
        self.kept_bytes = 0
        self.finished: OrderedDict[str, tuple[float, list, int]] = OrderedDict()
        self.running: dict[str, Job] = {}
        self.peers: dict[str, tuple[Any, Reply]] = {}
        self.closing = False
        self._lock = threading.Lock()

    # -- intake -------------------------------------------------------------------------------
    def handle(self, peer: Any, frames: list, reply: Reply) -> None:
        request_id = None
        size = _size(frames)
        try:
            check("request bytes", size, self.limits.max_request_bytes, "--max-request-bytes")
            message = wire.decode(frames, limits=self.wire_limits)
            body = message.body
            request_id = body.get("id") if isinstance(body.get("id"), str) else None
            key_name = self.keys.name_of(body.get("key"))
            if key_name is None:
                raise PermissionError(
                    "invalid or missing API key: pass api_key=... to "
                    "lazytensor.connect or set LAZYTENSOR_API_KEY"
                )
            handler = {
                "models": self._models,
                "describe": self._describe,
                "run": self._run,
                "fetch": self._fetch,
                "ack": self._ack,
            }.get(message.kind)
            if handler is None:
                raise ProtocolError(
                    f"unknown request kind {message.kind!r}; expected "
                    "models, describe, run or fetch"
                )
            handler(peer, reply, request_id, key_name, body, size)
        except Exception as exc:  # every bad request is answered, none crashes the server
            if request_id is None:  # so the error reaches a client waiting on that id
                request_id = _peek_id(frames, self.wire_limits.max_header_bytes)
            log.info("refused request %s: %s: %s", request_id, type(exc).__name__, exc)
            reply(peer, wire.encode("error", {"id": request_id, **error_body(exc)}))

    def _models(self, peer, reply, request_id, key_name, body, size) -> None:
        models = [
            m.info(self.workers[n].queue.qsize(), self.workers[n].served_count)
            for n, m in self.models.items()
        ]
        reply(peer, wire.encode("models", {"id": request_id, "models": models}))

    def _describe(self, peer, reply, request_id, key_name, body, size) -> None:
        served = self._model(body.get("model"))
        reply(peer, wire.encode("description", {"id": request_id, **served.description()}))

    def _run(self, peer, reply, request_id, key_name, body, size) -> None:
        if request_id is None:
            raise ProtocolError("a run request needs a string 'id'")
        with self._lock:
            self._expire()
            known = request_id in self.finished or request_id in self.running
        if known:  # a retry: never run a job twice (_resend takes the lock itself)
            self._resend(peer, reply, request_id)
            return
        if self.closing:
            raise RuntimeError(
                "the server is shutting down and accepts no new work; "
                "retry against another server or later"
            )
        served = self._model(body.get("model"))
        job = self._job(request_id, key_name, served, body, size)
        worker = self.workers[served.name]
        with self._lock:
            self.running[request_id] = job
            self.peers[request_id] = (peer, reply)
        reply(peer, wire.encode("status", {"id": request_id, "state": "received"}))
        position = worker.waiting()  # told before the worker can say "running"
        reply(
            peer, wire.encode("status", {"id": request_id, "state": "queued", "position": position})
        )
        worker.submit(job)

    def _fetch(self, peer, reply, request_id, key_name, body, size) -> None:
        with self._lock:
            self._expire()
            known = request_id in self.finished or request_id in self.running
        if known:
            self._resend(peer, reply, request_id)
        elif isinstance(body.get("request"), dict):
            self._run(peer, reply, request_id, key_name, body["request"], size)
        else:
            raise self._unknown(request_id)

    def _unknown(self, request_id: Any) -> KeyError:
        return UnknownRequest(
            f"no request {request_id!r} is running or kept on this server "
            f"(results are kept {self.ttl:g} s); send it again"
        )

    def _resend(self, peer: Any, reply: Reply, request_id: str) -> None:
        with self._lock:
            self._expire()
            if request_id in self.finished:
                reply(peer, self.finished[request_id][1])
                return
            job = self.running.get(request_id)
            if job is None:  # its result expired since the caller looked
                raise self._unknown(request_id)
            self.peers[request_id] = (peer, reply)
        state = "running" if job.started else "queued"
        reply(peer, wire.encode("status", {"id": request_id, "state": state}))

    # -- checks ---------------------------------------------------------------------------------
    def _model(self, name: Any) -> ServedModel:
        if isinstance(name, str):
            for served in self.models.values():
                if served.matches(name):
                    return served
        raise KeyError(
            f"this server does not serve a model {name!r}; it serves: {', '.join(self.models)}"
        )

    def _job(
        self, request_id: str, key_name: str, served: ServedModel, body: dict, size: int
    ) -> Job:
        limits = self.limits  # request bytes were checked in handle, before decoding
        graph = wire.decode_graph(body.get("graph"), _consts(body.get("graph")))
        check("graph nodes", len(graph.nodes), limits.max_nodes, "--max-nodes")
        _check_graph(graph, served, self.trusted)
        batch = _batch(body.get("batch"), limits)
        stop_at = body.get("stop_at")
        if stop_at is not None and not (
            isinstance(stop_at, int) and 0 <= stop_at < len(graph.nodes)
        ):
            raise ProtocolError(f"stop_at {stop_at!r} names no node of the graph")
        return Job(
            request_id, key_name, served.name, graph, batch, stop_at, bool(body.get("fake")), size
        )

    # -- outcomes -------------------------------------------------------------------------------
    def _done(self, job: Job, kind: str, body: dict) -> None:
        """Called by a worker: a status, or the job's result or error."""
        if kind == "status":
            self._send(job.id, kind, body)
            return
        try:
            frames = wire.encode(kind, {"id": job.id, **body})
        except Exception as exc:  # e.g. a saved value of a type the wire cannot carry
            kind = "error"
            frames = wire.encode(
                kind,
                {
                    "id": job.id,
                    "type": type(exc).__name__,
                    "message": f"the result cannot be sent: {exc}",
                },
            )
        size = _size(frames)
        with self._lock:
            self.running.pop(job.id, None)
            self.finished[job.id] = (time.monotonic(), frames, size)
            self.kept_bytes += size
            self._expire()
            peer, reply = self.peers.pop(job.id, (None, None))
        now = time.monotonic()
        log.info(
            "request %s key=%s model=%s nodes=%d in=%dB out=%dB wait=%.1fms run=%.1fms %s",
            job.id[:12],
            job.key_name,
            job.model,
            len(job.graph.nodes),
            job.bytes_in,
            size,
            (job.started - job.received) * 1e3,
            (now - job.started) * 1e3,
            kind,
        )
        if reply is not None:
            reply(peer, frames)

    def _send(self, request_id: str, kind: str, body: dict) -> None:
        with self._lock:
            peer, reply = self.peers.get(request_id, (None, None))
        if reply is not None:
            reply(peer, wire.encode(kind, {"id": request_id, **body}))

    def _expire(self) -> None:
        """Drop kept results past their time-to-live or over the count and byte budgets."""
        now = time.monotonic()
        while self.finished:
            oldest, (stamp, _, size) = next(iter(self.finished.items()))
            within = len(self.finished) <= self.keep and self.kept_bytes <= self.keep_bytes
            if within and now - stamp < self.ttl:
                break
            self.finished.pop(oldest)
            self.kept_bytes -= size

    def _ack(self, peer, reply, request_id, key_name, body, size) -> None:
        """The client has its result: stop keeping it (no reply)."""
        with self._lock:
            kept = self.finished.pop(request_id, None)
            if kept is not None:
                self.kept_bytes -= kept[2]

    def shutdown(self, grace: float = 30.0) -> None:
        """Refuse new work, let running jobs finish, fail the queued ones with a message."""
        self.closing = True
        for worker in self.workers.values():
            for job in worker.drain():
                self._done(
                    job,
                    "error",
                    {
                        "type": "RuntimeError",
                        "message": "the server shut down before this request ran; send it again",
                    },
                )
        for worker in self.workers.values():
            worker.stop(grace)


def _size(frames: list) -> int:
    return sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)


def _peek_id(frames: list, max_bytes: int) -> str | None:
    """The ``id`` in the header of a request that failed to decode, or ``None``.

    Plain msgpack of at most ``max_bytes`` (extension types stay opaque ``ExtType``s), read
    only to address the error reply; nothing else of the request is trusted or used.
    """
    try:
        header = frames[1]
        data = header.buffer if hasattr(header, "buffer") else header
        if len(data) > max_bytes:
            return None
        request_id = msgpack.unpackb(data, raw=False, strict_map_key=False)["body"]["id"]
    except Exception:
        return None
    return request_id if isinstance(request_id, str) else None


def _consts(data: Any) -> Any:
    return data.get("constants") if isinstance(data, dict) else None


def _check_graph(graph: Graph, served: ServedModel, trusted: bool) -> None:
    """Every op allow-listed, every module path one of the served model's.

    A refusal names its node, so the client re-raises it at the user's line.
    """
    for node in graph.nodes:
        try:
            _check_node(node, served, trusted)
        except (AttributeError, OpNotAllowedError) as exc:
            raise NodeFailure(node.id, exc) from None


def _check_node(node: Node, served: ServedModel, trusted: bool) -> None:
    if node.is_point or node.op == "module":
        if node.target not in served.paths:
            raise AttributeError(f"the model {served.name!r} has no module {node.target!r}")
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


def _batch(data: Any, limits: Limits) -> Batch:
    if not isinstance(data, dict):
        raise ProtocolError("a run request needs a 'batch' mapping")
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    size, generate = data.get("size", 1), data.get("generate", False)
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(size, int):
        raise ProtocolError("batch must have list 'args', mapping 'kwargs' and int 'size'")
    for name in kwargs:
        if name not in INPUT_KWARGS:
            raise OpNotAllowedError(
                f"model input {name!r} is not accepted by this server; "
                f"accepted: {', '.join(sorted(INPUT_KWARGS))}"
            )
    check("batch size", size, limits.max_batch, "--max-batch")
    if generate:
        steps = kwargs.setdefault("max_new_tokens", min(20, limits.max_new_tokens))
        if not isinstance(steps, int):
            raise ProtocolError("max_new_tokens must be an integer")
        check("generation steps (max_new_tokens)", steps, limits.max_new_tokens, "--max-new-tokens")
    return Batch(tuple(args), kwargs, size, bool(generate))
