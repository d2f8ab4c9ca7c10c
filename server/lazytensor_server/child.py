"""Worker processes: a model's jobs run in a child process that the server may kill.

A job's time limit is checked between ops, which cannot stop one op that runs for minutes (a
huge matmul, a kernel that never returns, an op that holds the GIL). So ``lazytensor serve``
runs each model's jobs in a worker process, and the worker thread (:mod:`.worker`) watches
it: a group of jobs goes with the time it must end by, the process names a later end when
a run starts later (:attr:`.runner.Runner.watch`), and a run still going :data:`SLACK`
seconds after its end is stopped by killing the process. A
fresh process takes the next job: it is forked from a server that has torch and the model's
code imported (``forkserver``) and maps the same weights (CPU weights in shared memory, CUDA
ones through IPC handles), so a restart costs well under a second, not a model load. A job
whose process was killed or died fails with a message saying so; the other jobs of its
forward pass run again, each alone, in the fresh process.

Parent and child speak over a pipe, in msgpack headers and raw frames, never pickle: the
parent forwards each job's request frames as it received them (the child decodes them with
the same checks), and the child returns each outcome already encoded, which the parent sends
to the client as is. Only the process's arguments (the model, the limits) are pickled, by
:mod:`multiprocessing`, from the parent's own objects.

A small run request that arrives while the process is idle is sent *early*
(:meth:`ChildProcess.send_early`), before the server has decoded and checked it: the process
decodes it meanwhile (on a core of its own where one is free), then waits. It runs only when a
group names it, after the server's checks; a request the server refuses or cancels is
forgotten (:meth:`ChildProcess.forget`), and the process keeps at most :data:`MAX_EARLY` of
them. This takes the process's decoding off the request's path (the server's decode, its
checks and the hand-off to the worker thread take longer than the process's decode).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import mmap
import multiprocessing
import os
import signal
import socket
import threading
import time
import types
from dataclasses import dataclass
from multiprocessing import forkserver, reduction
from typing import Any

import msgpack
import torch

from lazytensor.protocol import codec
from lazytensor.protocol import messages as m

from . import inputs
from .limits import Limits
from .runner import Job, Runner

log = logging.getLogger("lazytensor.server")

#: How the server's log lines look, the worker processes' too.
LOG_FORMAT = "%(asctime)s %(name)s %(message)s"
#: Seconds a run may go past its deadline (it stops itself at the next op) before its process
#: is killed.
SLACK = 1.0
#: Seconds after which the jobs of a forward still running are told so ("running"): most
#: finish sooner, and their users hear only the result.
RUNNING_AFTER = 0.05
#: Frames under this many bytes ride inside the message that announces them: one write on
#: the pipe, one wake-up of the reader, whatever the count of frames.
INLINE_BYTES = 64 << 10
#: Reply frames of this many bytes or more (large saved tensors) reach the server through a
#: memory file, mapped rather than copied through the pipe.
SHARED_BYTES = 1 << 20
#: How a frame that is not inline travels (see :func:`_send_frames`).
FOLLOWS, SHARED = 0, 1
#: A run's deadline is sent to the server only when it is this many seconds later than the
#: one the server holds it to (most runs start at once, and say nothing).
DEADLINE_STEP = 0.1
#: Seconds a new worker process may take to start and map the model.
BOOT_SECONDS = 300.0
#: Requests sent early (decoded, waiting for a group to name them) a worker process keeps at
#: most; past that it drops the oldest, and a group naming a dropped one fails it.
MAX_EARLY = 16


_CONTEXT = multiprocessing.get_context("forkserver")


def prepare(*modules: str) -> None:
    """Start the fork server that worker processes are forked from, importing torch,
    transformers' model code and ``modules`` (a model class's module) once, in the
    background: ``lazytensor serve`` calls it before loading its models, so both go on at
    once. Later calls add nothing to a running fork server."""
    _CONTEXT.set_forkserver_preload([__name__, "transformers.modeling_utils", *modules])
    starting = threading.Thread(target=forkserver.ensure_running, name="lazytensor-forkserver")
    starting.daemon = True
    starting.start()


@dataclass(frozen=True)
class Encoded:
    """An outcome a worker process encoded: ``frames`` go to the client as they are."""

    KIND: str
    frames: list


@dataclass(frozen=True)
class Early:
    """A request sent to worker process number ``generation`` before the server checked it,
    decoded there and kept under ``token`` until a group names it."""

    generation: int
    token: int


class ChildProcess:
    """The worker process of one served model, restarted whenever it is killed or dies."""

    def __init__(self, served: Any, limits: Limits, trusted: bool) -> None:
        self.served, self.limits, self.trusted = served, limits, trusted
        self.restarts = 0
        self.closed = False
        served.module.share_memory()  # CPU weights: every process maps the same pages
        prepare(type(served.module).__module__)  # no effect once the fork server runs
        self._process: Any = None
        self._conn: Any = None
        self._ready = False
        # The event loop's thread sends early requests while the worker thread may send a
        # group or restart the process: one writer at a time.
        self._writing = threading.Lock()
        self._tokens = itertools.count()
        self._start()

    def send_early(self, frames: list) -> Early | None:
        """Send a request's ``frames`` now, for the process to decode while the server does;
        ``None`` (nothing sent) while the process is starting or gone. The caller sends only
        small requests, and only while the process is idle, so the send never waits."""
        if not self._ready or self.closed or not self._writing.acquire(blocking=False):
            return None  # (the worker thread writing: it is not idle after all)
        try:
            early = Early(self.restarts, next(self._tokens))
            _send_frames(self._conn, ["early", early.token], frames, share=False)
        except (OSError, ValueError):  # it died: a group sends the frames again
            return None
        finally:
            self._writing.release()
        return early

    def forget(self, early: Early) -> None:
        """Drop an early request the server refused or cancelled (it will not run)."""
        if early.generation != self.restarts or self.closed:
            return  # that process is gone, and its early requests with it
        if not self._writing.acquire(blocking=False):
            return  # never wait here (the event loop): the process drops it past MAX_EARLY
        try:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send_bytes(msgpack.packb(["forget", early.token]))
        finally:
            self._writing.release()

    def _start(self) -> None:
        parent, child = _CONTEXT.Pipe()
        level = log.getEffectiveLevel()  # the process logs as the server does, to its output
        spec = (self.served.name, self.served.tokenizer is None, torch.get_num_threads(), level)
        self._process = _CONTEXT.Process(
            target=main,
            args=(child, self.served.module, spec, self.limits, self.trusted),
            name=f"lazytensor-worker-{self.served.name}",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._conn, self._ready = parent, False

    def _wait_ready(self) -> None:
        if self._ready:
            return
        if not self._conn.poll(BOOT_SECONDS):
            raise RuntimeError(f"the worker process did not start within {BOOT_SECONDS:g} s")
        if _unpack(self._conn.recv_bytes()) != ["ready"]:
            raise RuntimeError("the worker process did not start")
        self._ready = True

    def run(self, jobs: list[Job], done: Any, slow: Any = None) -> None:
        """Run ``jobs`` as the worker thread's :meth:`.runner.Runner.run_group` would, in the
        worker process; ``done(job, message)`` gets each outcome, and ``slow(jobs)`` the jobs
        still without one :data:`RUNNING_AFTER` s after the start (once)."""
        try:
            self._wait_ready()
            deadline = time.monotonic() + self.limits.max_seconds  # until the child says
            # [id, early token]: a job sent early to this very process is named by its token;
            # any other's frames follow, each job's as _send_frames sends them
            tokens = [self._early_token(job) for job in jobs]
            group = [[job.id, token] for job, token in zip(jobs, tokens)]
            with self._writing:
                self._conn.send_bytes(msgpack.packb(["run", group, deadline]))
                for job, token in zip(jobs, tokens):
                    if token is None:
                        _send_frames(self._conn, ["frames"], job.frames, share=False)
        except (OSError, EOFError, RuntimeError) as exc:
            self._restart(f"it could not be reached ({exc})")
            for job in jobs:
                done(job, m.Failure.of(job.id, RuntimeError(_LOST)))
            return
        pending = dict(enumerate(jobs))
        stopped = self._collect(pending, done, slow, deadline)
        if stopped is None:
            return
        if self.closed:  # killed past the shutdown's grace period
            for job in pending.values():
                done(job, m.Failure.of(job.id, RuntimeError(_SHUT_DOWN)))
            return
        self._restart(stopped)
        if len(pending) > 1:  # the one at fault is unknown: each runs alone
            for job in pending.values():
                self.run([job], done)
            return
        for job in pending.values():
            timed_out = stopped.startswith("a run")
            error = (
                TimeoutError(_TIMED_OUT.format(self.limits.max_seconds))
                if timed_out
                else RuntimeError(_DIED.format(stopped))
            )
            done(job, m.Failure.of(job.id, error))

    def _early_token(self, job: Job) -> int | None:
        early = job.early
        return early.token if early is not None and early.generation == self.restarts else None

    def _collect(
        self, pending: dict[int, Job], done: Any, slow: Any, deadline: float
    ) -> str | None:
        """Pass on the outcomes of the group in flight; ``None`` once it finished, else why
        the process was stopped (``pending`` then holds the jobs without an outcome).
        ``deadline`` holds until the process names a later one."""
        now = time.monotonic()
        announce = now + RUNNING_AFTER if slow is not None else math.inf
        conn = self._conn
        while True:
            now = time.monotonic()
            if now >= announce:
                slow(list(pending.values()))
                announce = math.inf
            if now >= deadline + SLACK:
                return f"a run went {SLACK:g} s past its time limit"
            try:
                if not conn.poll(min(deadline + SLACK, announce) - now):
                    continue
                header = _unpack(conn.recv_bytes())
                if header[0] == "deadline":
                    deadline = header[1]
                elif header[0] == "done":
                    _, index, kind, rows, together, last, layout = header
                    frames = _receive_frames(conn, layout)
                    job = pending.pop(index)
                    job.forward_rows, job.forward_jobs = rows, together
                    done(job, Encoded(kind, frames))
                    if last:  # the group's last outcome: the process waits for the next
                        return None
                elif header[0] == "idle":
                    return None
            except (EOFError, OSError):
                self._process.join(5)
                return f"it exited with code {self._process.exitcode}"

    def _restart(self, why: str) -> None:
        if self.closed:  # the server is stopping: no new process
            return
        log.warning("worker process of %s stopped: %s; starting a new one", self.served.name, why)
        with self._writing:
            self._stop_process()
            self.restarts += 1
            self._start()

    def _stop_process(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(10)
        self._conn.close()

    def close(self, wait: float = 5.0) -> None:
        """Stop the worker process, after ``wait`` s for it to exit by itself (0 when a job
        still runs past the shutdown's grace period: it is killed)."""
        self.closed = True
        try:
            self._conn.send_bytes(msgpack.packb(["stop"]))
            self._process.join(wait)
        except (OSError, ValueError):
            pass
        self._stop_process()


_TIMED_OUT = (
    "the request ran past this server's time limit of {:g} s (--max-seconds) inside one op "
    "and was stopped (its worker process was restarted); ask for less work per request"
)
_DIED = (
    "the worker process running this request died ({}); the server restarted it; "
    "the request may have crashed it: check it before sending it again"
)
_SHUT_DOWN = (
    "the server shut down while this request ran, past its grace period (--grace); send it again"
)
_LOST = "the server's worker process could not take this request; send it again"


def _send_frames(conn: Any, header: list, frames: list, share: bool = True) -> None:
    """Send ``header`` with the frames' layout appended, then what :func:`_receive_frames`
    reads. Each frame travels as the layout says: a small one (under :data:`INLINE_BYTES`)
    inside the header's message itself; with ``share``, one of :data:`SHARED_BYTES` or more
    written once into a memory file whose descriptor crosses the pipe (``SHARED``); any other
    as a message of its own after the header (``FOLLOWS``)."""
    views = [memoryview(f.buffer if hasattr(f, "buffer") else f).cast("B") for f in frames]
    layout: list = [
        view
        if view.nbytes < INLINE_BYTES
        else SHARED
        if share and view.nbytes >= SHARED_BYTES
        else FOLLOWS
        for view in views
    ]
    conn.send_bytes(msgpack.packb([*header, layout]))
    shared = [view for view, how in zip(views, layout) if how == SHARED]
    if shared:
        fds = [_memory_file(view) for view in shared]
        try:
            with _socket(conn) as sock:
                reduction.sendfds(sock, fds)
        finally:
            for fd in fds:
                os.close(fd)
    for view, how in zip(views, layout):
        if how == FOLLOWS:
            conn.send_bytes(view)


def _receive_frames(conn: Any, layout: list) -> list:
    """The frames :func:`_send_frames` sent with a header whose layout is ``layout``: memory
    files are mapped here, never copied."""
    fds = []
    count = layout.count(SHARED)  # (an inline frame's bytes never equal an int)
    if count:
        with _socket(conn) as sock:
            fds = reduction.recvfds(sock, count)
    try:
        mapped = [memoryview(mmap.mmap(fd, 0, prot=mmap.PROT_READ)) for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)
    frames = []
    for how in layout:
        if isinstance(how, bytes):
            frames.append(how)
        elif how == SHARED:
            frames.append(mapped.pop(0))
        else:
            frames.append(conn.recv_bytes())
    return frames


def _memory_file(view: memoryview) -> int:
    """A memory file holding ``view``'s bytes, written with ``write`` (half the time of a copy
    into a fresh mapping of it, which takes a page fault for every 4 KiB: 7.1 against 14.8 ms
    for 16 MiB on the development VM)."""
    fd = os.memfd_create("lazytensor-frame", os.MFD_CLOEXEC)
    try:
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done:])
    except BaseException:
        os.close(fd)
        raise
    return fd


def _socket(conn: Any) -> socket.socket:
    return socket.socket(fileno=os.dup(conn.fileno()))


def _unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, use_list=True)


# -- the worker process ---------------------------------------------------------------------------
def main(conn: Any, module: torch.nn.Module, spec: tuple, limits: Limits, trusted: bool) -> None:
    """A worker process: run the groups of jobs the parent sends until it says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when its workers stop
    name, positional, threads, level = spec
    logging.basicConfig(level=level, format=LOG_FORMAT)
    torch.set_num_threads(threads)
    wire = codec.Limits(
        max_total_bytes=limits.max_request_bytes, max_header_bytes=limits.max_header_bytes
    )
    served = types.SimpleNamespace(name=name, module=module)
    outcomes: list[tuple[Job, m.Message]] = []
    runner = Runner(served, limits, lambda job, message: outcomes.append((job, message)), trusted)
    known = [0.0]  # the deadline the server holds the group to

    def watch(deadline: float) -> None:  # told only when later than the server thinks
        if deadline > known[0] + DEADLINE_STEP:
            known[0] = deadline
            conn.send_bytes(msgpack.packb(["deadline", deadline]))

    runner.watch = watch
    runner.compiler.killable = True  # compiled replay runs here: a run past its end is killed
    early: dict[int, Job | Exception] = {}  # requests sent early, decoded, by token

    def decoded(frames: list) -> Job | Exception:
        try:
            return _job(frames, wire, name, limits, positional)
        except Exception as exc:  # the service refuses it too, or answers with this
            return exc

    conn.send_bytes(msgpack.packb(["ready"]))
    while True:
        try:
            header = _unpack(conn.recv_bytes())
        except EOFError:  # the server is gone
            return
        if header[0] == "stop":
            return
        if header[0] == "early":
            _, token, layout = header
            early[token] = decoded(_receive_frames(conn, layout))
            if len(early) > MAX_EARLY:
                del early[next(iter(early))]
            continue
        if header[0] == "forget":
            early.pop(header[1], None)
            continue
        known[0] = header[2]
        jobs, index = [], {}
        for position, (job_id, token) in enumerate(header[1]):
            if token is None:
                job = decoded(_receive_frames(conn, _unpack(conn.recv_bytes())[1]))
            else:
                job = early.pop(token, None)
                if job is None:  # dropped past MAX_EARLY
                    job = RuntimeError(_LOST)
            if isinstance(job, Exception):  # the service accepted it; answer rather than stop
                _send(conn, position, job_id, m.Failure.of(job_id, job), 0, 0, False)
                continue
            index[id(job)] = position
            jobs.append(job)
        if jobs:
            runner.run_group(jobs)
        for n, (job, message) in enumerate(outcomes, 1):
            last = n == len(outcomes)
            _send(conn, index[id(job)], job.id, message, job.forward_rows, job.forward_jobs, last)
        if not outcomes:
            conn.send_bytes(msgpack.packb(["idle"]))
        outcomes.clear()


def _job(frames: list, wire: codec.Limits, name: str, limits: Limits, positional: bool) -> Job:
    request = m.decode_request(frames, wire)
    if isinstance(request, m.Fetch):
        request = request.request
    return inputs.job_of(request, name, limits, positional=positional)


def _send(
    conn: Any, position: int, job_id: str, message: m.Message, rows: int, jobs: int, last: bool
) -> None:
    """One job's outcome, encoded; ``last``: the group's last (the process then waits)."""
    try:
        frames = m.encode(message)
    except Exception as exc:  # e.g. a saved value of a type the wire cannot carry
        message = m.Failure(
            job_id, {"type": type(exc).__name__, "message": f"the result cannot be sent: {exc}"}
        )
        frames = m.encode(message)
    _send_frames(conn, ["done", position, message.KIND, rows, jobs, last], frames)
