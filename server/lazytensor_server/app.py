"""App: the composition root. A ROUTER socket on an asyncio (uvloop) loop in front of a Service.

The event loop only reads frames: it hands each request to :class:`~.service.Service` (which
checks it and queues it for a model's worker thread; a large request on a decoding thread).
Replies leave from whichever thread has them, a worker's included (:class:`Wire`). The loop
never waits on a GPU.
SIGTERM/SIGINT stop intake, let running jobs finish (up to a grace period), fail queued ones
with a message, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
import zmq.asyncio

from lazytensor.protocol.messages import COMPILE_BACKENDS

from . import child
from .curve import Curve
from .peers import Peers
from .service import Service

log = logging.getLogger("lazytensor.server")

#: Requests up to this many bytes are checked and queued on the event loop's thread; larger
#: ones on one of DECODERS threads, so that the loop keeps answering others meanwhile (the GIL
#: is shared, but the loop gets its turn every switch interval instead of waiting for the end).
INLINE_BYTES = 64 << 10
DECODERS = 2
#: Requests the loop reads in one turn before it lets its other callbacks run.
BURST = 64


class App:
    """Serve ``service`` on ``address`` (``tcp://127.0.0.1:5555``)."""

    def __init__(
        self, service: Service, address: str, *, grace: float = 30.0, curve: Curve | None = None
    ) -> None:
        self.service, self.address, self.grace = service, address, grace
        self.curve = curve  # CurveZMQ encryption and client keys checked at the handshake
        self.bound = threading.Event()
        self.thread: threading.Thread | None = None
        self.endpoint: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def run(self, *, signals: bool = True) -> None:
        """Serve until stopped (SIGTERM/SIGINT, or :meth:`stop` from another thread)."""
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            runner = asyncio.run
        runner(self._serve(signals))

    def stop(self, timeout: float | None = 60.0) -> None:
        """Shut down as on SIGTERM; waits for it when the app runs on another thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    async def _serve(self, signals: bool) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        context = zmq.asyncio.Context()
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 1000)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # ZeroMQ drops a peer whose message part is over the request limit as it arrives,
        # before buffering it whole (the service checks the whole message again).
        socket.setsockopt(zmq.MAXMSGSIZE, self.service.limits.max_request_bytes)
        authenticator = self.curve.secure(context, socket) if self.curve is not None else None
        peers = Peers(self.service.limits.max_connections_per_address)
        peers.start(socket)  # before bind: every connection is counted per address
        socket.bind(self.address)
        self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        loop = self._loop
        wire = Wire(socket, loop, self.service.handle)

        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        # The bound endpoint, read back by whoever started `lazytensor serve --port 0`.
        log.info("serving %s on %s", ", ".join(self.service.models), self.endpoint)
        wire.start()
        self.bound.set()
        await self._stop.wait()
        log.info("shutting down: finishing running requests (grace %.0f s)", self.grace)
        self.service.closing = True  # requests still arriving are told so, not dropped
        shutdown = threading.Thread(target=self.service.shutdown, args=(self.grace,))
        shutdown.start()
        while shutdown.is_alive():
            await asyncio.sleep(0.02)
        wire.stop()
        await peers.stop()
        socket.close()
        if authenticator is not None:
            authenticator.stop()
        context.term()


class Wire:
    """The server socket's traffic: requests read on the event loop, replies sent at once
    from whichever thread has them.

    ZeroMQ sockets are not thread-safe, but one may be used from several threads one at a
    time (a lock is the memory barrier ZeroMQ asks for). So a worker thread sends its own
    result rather than handing it to the loop: the reply leaves without waiting for the loop
    to wake up (and, on worker threads, for the GIL the worker still holds). The loop wakes
    on the socket's descriptor, which signals a change of state rather than a message: after
    every send, from any thread, the socket is asked whether requests wait, and the loop is
    woken to read them if so (:meth:`reply`).
    """

    def __init__(self, socket: Any, loop: asyncio.AbstractEventLoop, handle: Any) -> None:
        # the same socket without asyncio's wrapper: its own sends and receives are not used
        self.socket = zmq.Socket.shadow(socket.underlying)
        self.loop, self.handle = loop, handle
        self.lock = threading.Lock()
        self.closed = False
        self.fd = self.socket.getsockopt(zmq.FD)
        self.on_loop = threading.get_ident()
        # decoding a large request must not hold up everyone else's
        self.pool = ThreadPoolExecutor(DECODERS, thread_name_prefix="lazytensor-decode")

    def start(self) -> None:
        self.loop.add_reader(self.fd, self.read)
        self.loop.call_soon(self.read)  # whatever came before the reader was added

    def stop(self) -> None:
        """Stop reading; replies still coming are dropped (their results stay kept)."""
        self.loop.remove_reader(self.fd)
        with self.lock:
            self.closed = True
        self.pool.shutdown(wait=False)

    def read(self) -> None:
        """On the loop: take every waiting request (a burst in turns of :data:`BURST`)."""
        socket = self.socket
        for _ in range(BURST):
            with self.lock:
                if self.closed or not socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                identity, *frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            peer = identity.bytes
            if sum(len(f.buffer) for f in frames) <= INLINE_BYTES:
                self._handle(peer, frames)
            else:
                self.loop.run_in_executor(self.pool, self._handle, peer, frames)
        self.loop.call_soon(self.read)  # the rest after the loop's other work

    def _handle(self, peer: bytes, frames: list) -> None:
        try:
            self.handle(peer, frames, self.reply)
        except Exception:  # the service answers errors itself; this is a last guard
            log.exception("unhandled error for a request")

    def reply(self, peer: Any, frames: list) -> None:
        """Send ``frames`` to ``peer`` now, from any thread, without waiting: a ROUTER socket
        queues a reply (or, for a gone peer, drops it), so nothing blocks."""
        with self.lock:
            if self.closed:
                return
            try:
                self.socket.send_multipart([peer, *frames], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:  # the peer is gone: its result stays kept for a fetch
                log.info("could not deliver a reply: %s", exc)
            waiting = self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN
        if waiting:  # this send may have consumed the descriptor's signal: read them anyway
            if threading.get_ident() == self.on_loop:
                self.loop.call_soon(self.read)
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed: nothing to read
                    self.loop.call_soon_threadsafe(self.read)


def serve_in_thread(service: Service, address: str = "tcp://127.0.0.1:0") -> App:
    """Start an app on a daemon thread (demo, tests); returns once it is bound."""
    app = App(service, address)
    thread = threading.Thread(
        target=app.run, kwargs={"signals": False}, daemon=True, name="lazytensor-server"
    )
    app.thread = thread
    thread.start()
    if not app.bound.wait(30):
        raise RuntimeError(f"the embedded server did not start on {address}")
    return app


def _backends(parser: Any, args: Any) -> tuple[str, ...]:
    """The backends ``--compile`` allows, checked with the flags it goes with."""
    backends = tuple(name.strip() for name in args.compile.split(",") if name.strip())
    unknown = [name for name in backends if name not in COMPILE_BACKENDS]
    if unknown or len(set(backends)) < len(backends):
        parser.error(
            f"--compile {args.compile}: give distinct backends from {', '.join(COMPILE_BACKENDS)}"
        )
    if args.compile_after < 0 or (args.compile_after and not backends):
        parser.error("--compile-after N takes N >= 0, and --compile BACKENDS to compile with")
    if backends and args.workers == "thread":
        parser.error(
            "--compile needs --workers process: a compiled run never checks the clock, and "
            "only a worker process can be stopped past --max-seconds"
        )
    return backends


def main(argv: list[str] | None = None) -> int:
    """``lazytensor serve``: load models and serve them until SIGTERM."""
    import argparse

    from .auth import Keys
    from .limits import Limits
    from .registry import load

    parser = argparse.ArgumentParser(prog="lazytensor serve", description=main.__doc__)
    parser.add_argument("paths", nargs="*", help="model directories or hub ids to serve")
    parser.add_argument("--model", action="append", default=[], help="another model to serve")
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        help="the name of each model, in order (default: its folder name)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port",
        type=int,
        default=5555,
        help="TCP port; 0 picks a free one, named by the log line 'serving MODELS on ENDPOINT'",
    )
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: where it loads)")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16")
    parser.add_argument(
        "--api-keys",
        default=None,
        help="file of 'name:key [weight=W] [max_inflight=N]' lines",
    )
    parser.add_argument(
        "--curve-secret",
        default=None,
        metavar="PATH",
        help="encrypt every connection with CurveZMQ: the server's secret certificate "
        "(PATH.key_secret from `lazytensor keys curve PATH`); clients pass PATH.key as server_key",
    )
    parser.add_argument(
        "--curve-clients",
        default=None,
        metavar="DIR_OR_FILE",
        help="with --curve-secret: accept only these client public keys, checked at the "
        "handshake (a folder of .key certificates, one certificate, or a file of Z85 keys)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (queue depth, latency, "
        "rows per forward, refusals by reason)",
    )
    parser.add_argument(
        "--trusted-clients",
        action="store_true",
        help="run user-defined Python functions that clients send (their code runs here!)",
    )
    parser.add_argument(
        "--keep-results",
        type=int,
        default=1024,
        help="finished results kept per user for a client that asks again (oldest dropped)",
    )
    parser.add_argument(
        "--workers",
        choices=("process", "thread"),
        default="process",
        help="where each model's jobs run: 'process' (default), a worker process that is "
        "killed and restarted when a job overruns --max-seconds inside one op; 'thread', a "
        "thread of the server (no such stop: for trusted single users)",
    )
    parser.add_argument(
        "--compile",
        default="",
        metavar="BACKENDS",
        help="run requests that ask for it (trace(..., compile=...)) as compiled replay, in "
        "the worker process: the torch.compile backends clients may ask for, comma-separated, "
        f"from {', '.join(COMPILE_BACKENDS)}; the first is what compile=True means. Off by "
        "default; compiling counts against --max-seconds",
    )
    parser.add_argument(
        "--compile-after",
        type=int,
        default=0,
        metavar="N",
        help="with --compile: also compile any plain request whose graph structure and input "
        "shapes the worker has run N times, asked or not (with the first backend)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds running requests get to finish on shutdown",
    )
    defaults = Limits()
    for field, flag in (
        ("max_request_bytes", "--max-request-bytes"),
        ("max_header_bytes", "--max-header-bytes"),
        ("max_nodes", "--max-nodes"),
        ("max_saved_bytes", "--max-saved-bytes"),
        ("max_memory", "--max-memory"),
        ("max_seconds", "--max-seconds"),
        ("max_new_tokens", "--max-new-tokens"),
        ("max_batch", "--max-batch"),
        ("max_batch_jobs", "--max-batch-jobs"),
        ("max_inflight", "--max-inflight"),
        ("max_connections_per_address", "--max-connections-per-address"),
    ):
        default = getattr(defaults, field)
        parser.add_argument(flag, dest=field, type=type(default), default=default)
    args = parser.parse_args(argv)
    args.compile = _backends(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a TCP port: give 1-65535, or 0 for a free one")
    sources = [*args.paths, *args.model]
    if not sources:
        parser.error("name at least one model to serve")
    if len(args.name) > len(sources):
        parser.error("more --name than models")
    names = [*args.name, *[None] * (len(sources) - len(args.name))]
    logging.basicConfig(level=logging.INFO, format=child.LOG_FORMAT)
    if args.workers == "process":
        child.prepare()  # the worker processes' imports, while the models load
    models = [load(s, n, device=args.device, dtype=args.dtype) for s, n in zip(sources, names)]
    keys = Keys.from_file(args.api_keys) if args.api_keys else Keys(None)
    if args.curve_clients is not None and args.curve_secret is None:
        parser.error("--curve-clients needs --curve-secret (the server's own key pair)")
    curve = None
    if args.curve_secret is not None:
        try:
            curve = Curve.from_files(args.curve_secret, args.curve_clients)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        accepted = "any client" if curve.clients is None else f"{len(curve.clients)} client keys"
        log.info("CurveZMQ on: server key %s, accepting %s", curve.public.decode(), accepted)
    if args.api_keys is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("serving beyond loopback needs --api-keys")
    limits = Limits(**{f: getattr(args, f) for f in Limits.__dataclass_fields__})
    metrics = None
    if args.metrics_port is not None:
        from .metrics import Metrics

        metrics = Metrics()
        metrics.serve(args.metrics_port, args.host)
    service = Service(
        models,
        keys,
        limits,
        trusted=args.trusted_clients,
        metrics=metrics,
        isolate=args.workers == "process",
        keep=args.keep_results,
    )
    App(service, f"tcp://{args.host}:{args.port}", grace=args.grace, curve=curve).run()
    busy = [t.name for t in threading.enumerate() if t.name.startswith("worker-") and t.is_alive()]
    if busy:  # a job ran past --grace: exit now rather than tear torch down under it
        log.warning("server stopped with jobs still running past --grace: %s", ", ".join(busy))
        logging.shutdown()
        os._exit(0)
    log.info("server stopped")
    return 0
