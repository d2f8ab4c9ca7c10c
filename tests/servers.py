"""Servers for the remote tests: the same serving code reached three ways, cheapest first.

- :func:`inproc_client`: a :class:`~lazytensor.frontend.served.Client` whose transport hands frames
  straight to a :class:`~lazytensor_server.service.Service` in this process (no sockets).
- :func:`embedded_server`: an :class:`~lazytensor_server.app.App`, a real ZeroMQ ROUTER socket
  on loopback, served from a thread of this process.
- :class:`ServerProcess`: ``lazytensor serve`` (as ``python -m lazytensor serve``) in a
  separate Python process on loopback, stopped with SIGTERM.

Every server binds port 0 and the tests read back the port it got (``App.endpoint``, or the
process's ``serving ... on ENDPOINT`` log line), so no port is chosen first and bound later,
when another program may have taken it.

Loading a model and starting a process are the slow parts of these tests, so the fixtures
are session-scoped and share one loaded model; every test sends its requests in turn, so no
two workers run that model at the same time. Fixtures stop what they start, also on failure.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import lazytensor as lt
from lazytensor.frontend.served import Client, in_process
from lazytensor_server.app import App, serve_in_thread
from lazytensor_server.registry import ServedModel, load
from lazytensor_server.service import Service

#: The name every test server serves the tiny Llama under.
MODEL = "llama"


class Capture:
    """A transport that keeps what a client sends and never answers.

    Tests use it to get the exact frames a client builds for a trace (record with
    ``remote=Client(transport=Capture()), blocking=False``), then send them, whole or edited,
    some other way.
    """

    def __init__(self) -> None:
        self.sent: list[list] = []

    def send(self, frames: list) -> None:
        self.sent.append([bytes(f) for f in frames])

    def recv(self, timeout: float) -> list | None:
        return None

    def reconnect(self) -> None:
        pass

    def close(self) -> None:
        pass


#: The line ``lazytensor serve`` logs once its socket is bound (``App._serve``); the newline
#: makes sure the endpoint was read whole.
SERVING = re.compile(r"serving .* on (tcp://\S+)\r?\n")


@contextlib.contextmanager
def embedded(service: Service) -> Iterator[App]:
    """Serve ``service`` on a loopback port from a thread; stop it (and its thread) after."""
    app = serve_in_thread(service)
    try:
        yield app
    finally:
        app.stop()


class ServerProcess:
    """``lazytensor serve`` serving one model in its own process on a free loopback port.

    Its stdout and stderr go to ``log_path`` (a pipe nobody reads could fill up and stall it).
    The process binds port 0; :meth:`wait_ready` reads the port it got from that log and sets
    :attr:`address`.

    Args:
        model_path: directory of the model to serve (as :data:`MODEL`).
        log_path: file for the process's output.
        extra: more command-line arguments, e.g. ``("--api-keys", "keys.txt")``.
    """

    def __init__(self, model_path: pathlib.Path, log_path: pathlib.Path, *extra: str) -> None:
        self.address: str | None = None  # known once the process logs it: wait_ready()
        self.log_path = log_path
        argv = [str(model_path), "--name", MODEL, "--port", "0", *extra]
        self._log = open(log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lazytensor", "serve", *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, api_key: str | None = None, timeout: float = 120.0) -> None:
        """Return once the server answers ``models``; raise with its output if it died."""
        deadline = time.monotonic() + timeout
        while self.address is None:
            self._check_alive()
            bound = SERVING.search(self.log())
            if bound is not None:
                self.address = bound.group(1)
            elif time.monotonic() > deadline:
                raise RuntimeError(f"the server did not bind within {timeout:g} s:\n{self.log()}")
            else:
                time.sleep(0.05)
        while time.monotonic() < deadline:
            self._check_alive()
            client = Client(self.address, api_key, timeout=1.0, silence=10.0)
            try:
                client.models()
                return
            except TimeoutError:
                continue
            finally:
                client.close()
        raise RuntimeError(f"the server did not answer within {timeout:g} s:\n{self.log()}")

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the server process exited with {self.process.returncode}:\n{self.log()}"
            )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` s; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def server_process(
    model_path: pathlib.Path, log_path: pathlib.Path, *extra: str
) -> Iterator[ServerProcess]:
    """A :class:`ServerProcess` started with the ``extra`` flags (``--compile aot_eager``),
    ready when this yields, stopped after, also on failure."""
    server = ServerProcess(model_path, log_path, *extra)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# -- fixtures (registered in conftest.py) ------------------------------------------------------


@pytest.fixture(scope="session")
def served_llama(llama_path: pathlib.Path) -> ServedModel:
    """The tiny Llama loaded as a server loads it, served as :data:`MODEL`."""
    return load(str(llama_path), MODEL)


@pytest.fixture(scope="session")
def local_llama(llama_path: pathlib.Path) -> lt.LanguageModel:
    """The same tiny Llama as a local :class:`lazytensor.LanguageModel`: the oracle."""
    return lt.LanguageModel(str(llama_path))


@pytest.fixture(scope="session")
def llama_service(served_llama: ServedModel) -> Iterator[Service]:
    """An open (no keys) service with default limits, shared by the in-process clients."""
    service = Service([served_llama])
    yield service
    service.shutdown(grace=5.0)


@pytest.fixture(scope="session")
def inproc_client(llama_service: Service) -> Client:
    """A client wired straight to :func:`llama_service`, with short timeouts."""
    return in_process(llama_service, timeout=60.0)


@pytest.fixture(scope="session")
def embedded_server(served_llama: ServedModel) -> Iterator[App]:
    """A real ZeroMQ server on loopback (``.endpoint``), run from a thread of this process."""
    service = Service([served_llama])
    with embedded(service) as app:
        yield app


@pytest.fixture(scope="session")
def socket_client(embedded_server: App) -> Iterator[Client]:
    """A ZeroMQ client of :func:`embedded_server`."""
    client = Client(embedded_server.endpoint, timeout=60.0)
    yield client
    client.close()


@pytest.fixture(scope="session")
def process_client(
    llama_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Client]:
    """A client of ``lazytensor serve`` in its own process, with its defaults: jobs run in a
    worker process (the path a deployed server takes), started once for the session."""
    server = ServerProcess(llama_path, tmp_path_factory.mktemp("process") / "server.log")
    try:
        server.wait_ready()
        client = Client(server.address, timeout=60.0)
        yield client
        client.close()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def served_handle(inproc_client: Client) -> lt.LanguageModel:
    """A handle on the in-process server's model (``client.model(MODEL)``)."""
    return inproc_client.model(MODEL)


@pytest.fixture(params=["local", "inproc", "socket", "handle", "process"])
def where(request, local_llama, inproc_client, socket_client, served_handle):
    """(model, remote=) for a local run and each way of running on a server (``process``: a
    server process whose jobs run in its worker process)."""
    if request.param == "process":
        return local_llama, request.getfixturevalue("process_client")
    return {
        "local": (local_llama, False),
        "inproc": (local_llama, inproc_client),
        "socket": (local_llama, socket_client),
        "handle": (served_handle, False),
    }[request.param]
