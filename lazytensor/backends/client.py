"""Client: talks to a lazytensor server over a :mod:`~lazytensor.backends.transport`.

A client sends typed requests (:mod:`lazytensor.protocol.messages`) and reads the replies for
each request id: ``Status`` messages (received, queued with position, running), shown as a
progress line on long waits, then one ``Result`` or ``Failure``. Every run carries a request id
chosen here, so a retry after a lost connection (``Fetch`` with that id, on a fresh socket)
returns the stored result instead of running the job twice.

Errors travel as data (:func:`lazytensor.core.errors.from_data`): an error naming a node
becomes a :class:`~lazytensor.core.errors.NodeFailure`, which the trace re-raises at the user's
line with the original exception type when it is a known one.

Several jobs may share one client, from several threads: the socket is used under a lock, but
no job holds it while it waits, and replies read by one job for another are kept for it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from typing import Any

import torch

from ..core import tree
from ..core.errors import RemoteTimeout, UnknownRequest
from ..protocol import curve
from ..protocol import messages as m
from ..protocol.values import DTYPES, Record
from .base import JobState, RunRequest
from .transport import Transport, ZmqTransport

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"

log = logging.getLogger("lazytensor")

_STATES = frozenset(state.value for state in JobState)

#: Results larger than this are acknowledged at once rather than with the next request.
ACK_NOW_BYTES = 1 << 20

#: How long one job reads the socket before letting another job's thread have a turn.
_SLICE = 0.05


class Connection:
    """A connection to one server.

    Args:
        address: ``tcp://host:port``; default ``$LAZYTENSOR_SERVER`` or ``tcp://127.0.0.1:5555``.
        api_key: default ``$LAZYTENSOR_API_KEY``. Without one, the client sends a random token
            of its own instead, which an open server uses to keep this client's results apart
            from everyone else's (and to find them again after a reconnect).
        transport: use this transport instead of a ZeroMQ socket (tests, embedding).
        timeout: seconds to wait for a request's result before giving up.
        silence: seconds without any reply after which the client asks again (``fetch``),
            on a fresh socket if the first ask also goes unanswered.
        connect_timeout: seconds to wait for a server's first word on a request; without
            one the address has no lazytensor server (a typo, a server that failed to start).
            Once the server has answered, a long job keeps waiting (up to ``timeout``).
            Default ``$LAZYTENSOR_CONNECT_TIMEOUT`` or 10.
        server_key: the public key of a server started with ``--curve-secret`` (its Z85
            string or its ``.key`` file); the connection is then encrypted with CurveZMQ.
            Default ``$LAZYTENSOR_SERVER_KEY``.
        client_secret: this client's secret key (Z85, or a ``.key_secret`` file from
            ``lazytensor keys curve``), for a server that accepts only listed client keys
            (``--curve-clients``); without one a new key pair is made for this connection.
            Default ``$LAZYTENSOR_CLIENT_SECRET``.

    Raises:
        ValueError: a key is not a Z85 key or a certificate file holding one.
    """

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        transport: Transport | None = None,
        timeout: float = 600.0,
        silence: float = 5.0,
        connect_timeout: float | None = None,
        server_key: str | os.PathLike | None = None,
        client_secret: str | os.PathLike | None = None,
    ) -> None:
        self.address = address or os.environ.get("LAZYTENSOR_SERVER") or DEFAULT_ADDRESS
        self.api_key = api_key if api_key is not None else os.environ.get("LAZYTENSOR_API_KEY")
        self.token = self.api_key or secrets.token_hex(16)  # what requests carry as their key
        self.curve = False  # whether the connection uses CurveZMQ
        if transport is None:
            keys = _curve_keys(server_key, client_secret)
            self.curve = keys is not None
            transport = ZmqTransport(self.address, keys)
        self.transport = transport
        self.timeout, self.silence = timeout, silence
        if connect_timeout is None:
            connect_timeout = float(os.environ.get("LAZYTENSOR_CONNECT_TIMEOUT", "10"))
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        # Replies read by one job that belong to another job still in flight on this client.
        self._mail: dict[str, list[m.Message]] = {}
        # Runs whose results arrived, for the server to forget: sent with the next request.
        self._acks: list[str] = []

    # -- public API ---------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """What the server serves: name, parameter count, dtype, device, queue length."""
        return self.call(m.ListModels(_new_id(), self.token)).models

    def describe(self, name: str) -> m.Description:
        """A served model's module tree and tokenizer, as data."""
        return self.call(m.Describe(_new_id(), self.token, name))

    def submit(self, model: str, request: RunRequest) -> RemoteJob:
        """Send a run of ``request`` on the server's ``model``; returns its job at once."""
        run = m.Run(
            _new_id(),
            self.token,
            model,
            request.graph,
            request.batch,
            request.stop_at,
            request.fake_mode is not None,
            request.segments,
            # compiled replay is for plain runs, as locally: a materialization stays eager
            request.compile if request.stop_at is None and request.fake_mode is None else False,
        )
        job = RemoteJob(self, run, request.fake_mode)
        job.send()
        return job

    def call(self, request: m.Request) -> Any:
        """Send a read-only request and wait for its reply message."""
        job = RemoteJob(self, request, None)
        job.send()
        return job.wait()

    def close(self) -> None:
        self.flush_acks()
        self.transport.close()

    def acknowledge(self, request_id: str, nbytes: int) -> None:
        """The result of run ``request_id`` (``nbytes`` of tensors) arrived: the server may
        forget it. Small results are acknowledged with this client's next request (one
        message fewer per run); a large one, or many, at once."""
        with self._lock:
            self._acks.append(request_id)
            now = nbytes > ACK_NOW_BYTES or len(self._acks) >= m.MAX_ACKS
        if now:
            self.flush_acks()

    def flush_acks(self) -> None:
        """Tell the server now about every result acknowledged but not yet sent."""
        with self._lock:
            ids, self._acks = self._acks, []
            if ids:
                self.transport.send(m.encode(m.Ack(ids[0], self.token, acks=tuple(ids[1:]))))

    def _with_acks(self, request: m.Request) -> m.Request:
        """``request`` carrying the pending acknowledgements (the caller holds the lock)."""
        if not self._acks:
            return request
        ids, self._acks = self._acks, []
        return dataclasses.replace(request, acks=tuple(ids))

    def no_answer(self) -> str:
        """Why a server may have said nothing within ``connect_timeout``, and what to check."""
        waited = f"no answer from {self.address} within {self.connect_timeout:g} s"
        slow = "raise connect_timeout= (or $LAZYTENSOR_CONNECT_TIMEOUT) for a slow link"
        if self.curve:
            return (
                f"{waited}: a CurveZMQ server refused this client's handshake or never "
                "answered it. Check that server_key= ($LAZYTENSOR_SERVER_KEY) is the public key "
                "of the server's --curve-secret, that this client's public key is in the "
                "server's --curve-clients (pass client_secret= or $LAZYTENSOR_CLIENT_SECRET), "
                f"and the address and port; {slow}"
            )
        return (
            f"{waited}: is a lazytensor server running there? Check the address and port, "
            "that the server started (it logs 'serving ... on ...'), the API key, and whether "
            "the server needs a CurveZMQ key (started with --curve-secret: pass server_key= "
            f"or set $LAZYTENSOR_SERVER_KEY); {slow}"
        )

    def send(self, message: m.Message) -> None:
        with self._lock:
            self.transport.send(m.encode(message))


class RemoteJob:
    """One request in flight: poll :meth:`status`, block on :meth:`result`, :meth:`cancel`."""

    def __init__(self, client: Connection, request: m.Request, fake_mode: Any) -> None:
        self.client, self.request = client, request
        self.id: str = request.id or ""
        self.fake_mode = fake_mode
        self.state = JobState.SENT
        self.position: int | None = None
        self._reply: m.Message | None = None
        self._error: BaseException | None = None

    def send(self) -> None:
        with self.client._lock:
            self.client._mail.setdefault(self.id, [])
            self.client.transport.send(m.encode(self.client._with_acks(self.request)))

    def status(self) -> JobState:
        """``sent``, ``received``, ``queued``, ``running``, ``completed``, ``error``..."""
        if not self._finished():
            with self.client._lock:
                self._pump(0.0)
        return self.state

    def result(self, timeout: float | None = None) -> dict[int, Any]:
        """Wait for the job; returns node id -> value (raises the server's error)."""
        reply = self.wait(timeout)
        if reply.note:
            _tell(reply.note)
        values = dict(reply.values)
        if self.fake_mode is not None:
            values = {k: _fake(v, self.fake_mode) for k, v in values.items()}
        return values

    def cancel(self) -> bool:
        """Ask the server to drop the job if it has not started; whether it was dropped.

        Returns once the server answers: the job dropped, started or done (a server drops a
        job silently only if it never had it: then after ``silence`` seconds, ``False``).
        """
        if self._finished() or self.status() is JobState.RUNNING:
            return False
        self.client.send(m.Cancel(self.id, self.client.token))
        end = time.monotonic() + self.client.silence
        while not self._finished() and self.state is not JobState.RUNNING:
            if time.monotonic() > end:
                break
            with self.client._lock:
                self._pump(_SLICE)
        return self.state is JobState.CANCELLED

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the reply message (``Result``, ``ModelList``...); raise a ``Failure``."""
        limit = self.client.timeout if timeout is None else timeout
        started = time.monotonic()
        quiet_since, asked, shown = started, 0, False
        heard = self.state is not JobState.SENT  # has the server said anything about it?
        while not self._finished():
            now = time.monotonic()
            if not heard and now - started > self.client.connect_timeout:
                raise RemoteTimeout(self.client.no_answer())
            if now - started > limit:
                raise RemoteTimeout(
                    f"no result for request {self.id} within {limit:.0f} s (its last state: "
                    f"{self.state}); raise the client's timeout, or fetch it later by id"
                )
            with self.client._lock:
                got = self._pump(_SLICE)
            if got:
                quiet_since, asked, heard = time.monotonic(), 0, True
            elif time.monotonic() - quiet_since > self.client.silence:
                asked += 1
                quiet_since = time.monotonic()
                self._ask_again(reconnect=asked > 1)
            if time.monotonic() - started > 1.0 and not self._finished():
                shown = _progress(self.id, self.state, self.position) or shown
        if shown:
            _progress(self.id, self.state, None, end=True)
        if self._error is not None:
            raise self._error
        if isinstance(self.request, m.Run):  # the server may forget the result now
            self.client.acknowledge(self.id, _nbytes(self._reply))
        return self._reply

    def _finished(self) -> bool:
        return self._reply is not None or self._error is not None

    def _ask_again(self, reconnect: bool) -> None:
        """After silence: ask for the job by id (a read-only request is simply sent again)."""
        with self.client._lock:
            if reconnect:
                self.client.transport.reconnect()
        if isinstance(self.request, m.Run):
            self.client.send(m.Fetch(self.id, self.client.token))
        else:
            self.client.send(self.request)

    def _pump(self, timeout: float) -> bool:
        """Read replies for up to ``timeout`` s (caller holds the lock); whether any came."""
        transport, mail, got = self.client.transport, self.client._mail, False
        for message in mail.get(self.id, []):  # read earlier by another job
            got = True
            self._take(message)
            if self._finished():
                break
        mail[self.id] = []
        end = time.monotonic() + timeout
        while not self._finished():
            # a whole slice, or nothing once it is over: the transport's timeout rarely changes
            frames = transport.recv(timeout if time.monotonic() < end else 0.0)
            if frames is None:
                break
            got = True
            message = m.decode_reply(frames)
            if message.id == self.id:
                self._take(message)
            elif message.id in mail:
                mail[message.id].append(message)  # another job of this client: keep it for it
            # else: a late reply to a request that is already answered
        if self._finished():
            mail.pop(self.id, None)
        return got

    def _take(self, message: m.Message) -> None:
        if isinstance(message, m.Status):
            if message.state in _STATES:
                self.state, self.position = JobState(message.state), message.position
            return
        if isinstance(message, m.Failure):
            error = message.exception()
            if isinstance(error, UnknownRequest) and isinstance(self.request, m.Run):
                self.client.transport.send(m.encode(self.request))  # it was lost: send again
                return
            cancelled = message.error.get("cancelled") is True
            self.state = JobState.CANCELLED if cancelled else JobState.FAILED
            self._error = error
            return
        self.state, self._reply = JobState.COMPLETED, message


_told: set[str] = set()


def _tell(note: str) -> None:
    """Log a server's note on a run (why a compile wish ran eagerly) once per text, at INFO."""
    if note not in _told and len(_told) < 64:
        _told.add(note)
        log.info("the server says: %s", note)


def _nbytes(reply: Any) -> int:
    values = getattr(reply, "values", {})
    return sum(v.nbytes for v in tree.leaves(values) if isinstance(v, torch.Tensor))


def _new_id() -> str:
    return uuid.uuid4().hex


def _curve_keys(
    server_key: str | os.PathLike | None, client_secret: str | os.PathLike | None
) -> tuple[bytes, bytes, bytes] | None:
    """The server's public key and this client's key pair, or ``None`` for a plain socket."""
    server_key = server_key if server_key is not None else os.environ.get("LAZYTENSOR_SERVER_KEY")
    if client_secret is None:
        client_secret = os.environ.get("LAZYTENSOR_CLIENT_SECRET")
    if not server_key:
        if client_secret:
            raise ValueError(
                "client_secret= (or $LAZYTENSOR_CLIENT_SECRET) needs the server's public key "
                "too: pass server_key= or set $LAZYTENSOR_SERVER_KEY"
            )
        return None
    if client_secret:
        public, secret = curve.key_pair(client_secret)
    else:  # a server without --curve-clients takes any key: make one for this connection
        import zmq

        public, secret = zmq.curve_keypair()
    return curve.public_key(server_key), public, secret


def _fake(value: Any, mode: Any) -> Any:
    """Turn the server's shape descriptions back into fake tensors of ``mode``."""
    if isinstance(value, Record) and value.cls_name == "TensorMeta":
        with mode:
            return torch.empty(tuple(value["shape"]), dtype=DTYPES[value["dtype"]])
    if tree.is_container(value):
        return tree.rebuild(value, [_fake(v, mode) for v in tree.children(value)])
    return value


def _progress(job: str, state: JobState, position: int | None, end: bool = False) -> bool:
    if not sys.stderr.isatty():
        return False
    if end:
        sys.stderr.write("\r\033[K")
    else:
        where = f" (position {position})" if position is not None else ""
        sys.stderr.write(f"\r\033[K[lazytensor] job {job[:8]}: {state}{where}")
    sys.stderr.flush()
    return True
