"""A real server process on loopback: keys, lost clients, concurrent clients and shutdown.

The server is ``lazytensor serve`` (run as ``python -m lazytensor serve``) serving the tiny
Llama in its own process, reached through ZeroMQ sockets exactly as a remote user reaches it.
Every result is compared with the same trace run locally.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
import zmq

from lazytensor.backends.client import RemoteJob
from lazytensor.frontend.served import Client
from lazytensor.protocol import messages
from lazytensor_server.service import Service
from servers import MODEL, Capture, ServerProcess, embedded
from wire import wire

KEY = "s3cret-key-for-alice"
SENTENCES = ["Q: cheap\nA:", "Q: big\nA:", "Q: fast\nA:"]
N = len(SENTENCES)


def force(model, remote, neurons: dict[int, list[int]], value: float, blocking: bool = True):
    """The neuron-forcing experiment: rows N.. get ``neurons`` set to ``value``."""
    with model.trace(SENTENCES + SENTENCES, remote=remote, blocking=blocking) as tracer:
        for layer, ids in neurons.items():
            x = model.model.layers[layer].mlp.down_proj.input  # (B, T, neurons)
            x[N:, -1, ids] = value
        logits = model.output.logits[:, -1].save()  # (B, vocab)
    return tracer, logits


def local_force(local_llama, neurons, value) -> torch.Tensor:
    _, logits = force(local_llama, False, neurons, value)
    return logits


@pytest.fixture(scope="module")
def servers(llama_path, tmp_path_factory):
    """The module's server process, started when first needed and again if it was stopped.

    Starting a process is the slow part of this module, so its tests share one; the shutdown
    test stops it, and a test that runs after that gets a fresh one.
    """
    tmp = tmp_path_factory.mktemp("server")
    keys = tmp / "keys.txt"
    keys.write_text(f"# name:key\nalice:{KEY}\nbob: another-key \n")
    started: list[ServerProcess] = []

    def current() -> ServerProcess:
        if not started or started[-1].process.poll() is not None:
            log = tmp / f"server-{len(started)}.log"
            started.append(ServerProcess(llama_path, log, "--api-keys", str(keys)))
            started[-1].wait_ready(KEY)
        return started[-1]

    try:
        yield current
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def server(servers) -> ServerProcess:
    """A running server that needs key :data:`KEY`."""
    return servers()


@pytest.fixture
def client(server):
    client = Client(server.address, KEY, timeout=60.0)
    yield client
    client.close()


def served(client: Client) -> int:
    (info,) = client.models()
    return info["served"]


def test_neuron_forcing_remote_equals_local(client, local_llama):
    neurons = {1: [7, 25], 3: [94]}
    want = local_force(local_llama, neurons, 5.0)
    assert not torch.equal(want[N:], want[:N])  # the forcing changes the prediction
    _, got = force(local_llama, client, neurons, 5.0)
    assert torch.equal(got, want)
    _, got = force(client.model(MODEL), False, neurons, 5.0)  # the remote handle
    assert torch.equal(got, want)


def test_invalid_or_missing_key_is_refused(server, local_llama):
    for key in ("not-the-key", None, "another-key "):
        refused = Client(server.address, key, timeout=30.0)
        try:
            with pytest.raises(PermissionError, match="invalid or missing API key"):
                refused.models()
            with pytest.raises(PermissionError, match="invalid or missing API key"):
                force(local_llama, refused, {1: [7]}, 5.0)
        finally:
            refused.close()
    bob = Client(server.address, "another-key", timeout=30.0)  # the file's spaces are trimmed
    try:
        assert bob.models()[0]["name"] == MODEL
    finally:
        bob.close()


def test_a_client_that_disconnects_gets_its_result_on_a_new_connection(server, client, local_llama):
    neurons, value = {2: [3, 4, 5]}, -3.0
    want = local_force(local_llama, neurons, value)
    # The exact frames a client sends for this trace.
    capture = Capture()
    tracer, logits = force(
        local_llama, Client("capture", KEY, transport=capture), neurons, value, blocking=False
    )
    request_id = tracer.job.id
    before = served(client)
    # Send them on a socket of its own and go away at once.
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 5000)  # long enough to hand the request to the server
    dealer.connect(server.address)
    dealer.send_multipart(capture.sent[-1])
    dealer.close()
    context.term()  # returns once the request is sent
    # The job runs anyway, once.
    deadline = time.monotonic() + 30
    while served(client) == before:
        assert time.monotonic() < deadline, "the abandoned request never ran"
        time.sleep(0.05)
    # A new connection asks for it by id and gets the kept result, without a second run.
    job = RemoteJob(client, messages.Fetch(request_id, client.token), None)
    job.send()
    values = job.result()
    assert torch.equal(values[logits._node], want)
    assert served(client) == before + 1
    assert f"request {request_id[:12]} key=alice model={MODEL}" in server.log()


def test_eight_clients_in_parallel_each_get_their_own_results(server, local_llama):
    def interventions(i: int) -> list[tuple[dict[int, list[int]], float]]:
        return [({1: [i, 8 + i], 3: [16 + i]}, float(i + 1)), ({2: [24 + i]}, -float(i + 1))]

    want = {
        (i, j): local_force(local_llama, neurons, value)
        for i in range(8)
        for j, (neurons, value) in enumerate(interventions(i))
    }
    distinct = list(want.values())
    assert all(
        not torch.equal(a, b) for k, a in enumerate(distinct) for b in distinct[k + 1 :]
    )  # so a mix-up could not go unnoticed
    got: dict[tuple[int, int], torch.Tensor] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def user(i: int) -> None:
        client = Client(server.address, KEY, timeout=60.0)
        try:
            model = client.model(MODEL)  # its own handle and tokenizer
            start.wait(30)
            for j, (neurons, value) in enumerate(interventions(i)):
                _, logits = force(model, False, neurons, value)
                got[i, j] = logits
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert got.keys() == want.keys()
    for key, logits in want.items():  # requests that shared a forward may round differently
        torch.testing.assert_close(got[key], logits, rtol=1e-5, atol=1e-6, msg=str(key))


def test_the_server_refuses_a_bad_frame_and_goes_on(client, local_llama):
    """A raw peer speaking another protocol version gets an error naming both versions."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(client.address)
        frames = wire.encode("models", {"id": "v2", "key": KEY})
        dealer.send_multipart([wire.MAGIC + bytes([wire.PROTOCOL_VERSION + 1]), *frames[1:]])
        assert dealer.poll(30_000), "no answer"
        reply = wire.decode(dealer.recv_multipart())
    finally:
        dealer.close()
        context.term()
    assert reply.kind == "error" and reply.body["type"] == "ProtocolError"
    assert f"protocol {wire.PROTOCOL_VERSION + 1}" in reply.body["message"]
    assert reply.body["id"] == "v2"
    neurons = {3: [1]}
    _, got = force(local_llama, client, neurons, 2.0)
    assert torch.equal(got, local_force(local_llama, neurons, 2.0))


def test_sigterm_shuts_down_cleanly(server, local_llama):
    """Last in this module: it stops the shared server."""
    neurons = {1: [7, 25], 3: [94]}
    want = local_force(local_llama, neurons, 5.0)
    client = Client(server.address, KEY, timeout=60.0)
    try:
        jobs = [force(local_llama, client, neurons, 5.0, blocking=False) for _ in range(3)]
        deadline = time.monotonic() + 30
        while any(tracer.status() == "sent" for tracer, _ in jobs):  # all received
            assert time.monotonic() < deadline, "the server never received the requests"
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        # Each in-flight request either finished or was failed with a message; none hangs.
        for tracer, logits in jobs:
            try:
                tracer.result()
            except RuntimeError as exc:
                assert "shut down" in str(exc)
            else:
                assert torch.equal(logits, want)
        assert server.process.wait(10) == 0
    finally:
        client.close()
    log = server.log()
    assert "shutting down" in log, log
    assert "Traceback" not in log, log


def test_a_large_request_is_decoded_off_the_event_loop(served_llama, local_llama) -> None:
    """Requests over INLINE_BYTES are checked on a decoding thread; small ones on the loop."""
    from lazytensor_server import app as app_module

    threads: list[str] = []
    service = Service([served_llama])
    handle = service.handle

    def spy(peer, frames, reply):
        threads.append(threading.current_thread().name)
        return handle(peer, frames, reply)

    service.handle = spy
    with embedded(service) as app:
        client = Client(app.endpoint, timeout=60.0)
        try:
            big = torch.ones(app_module.INLINE_BYTES // 4 + 1)  # a constant over the limit
            with local_llama.trace("Hello", remote=client):
                out = (local_llama.model.norm.output.sum() + big).sum().save()
            with local_llama.trace("Hello"):
                want = (local_llama.model.norm.output.sum() + big).sum().save()
        finally:
            client.close()
    torch.testing.assert_close(out, want)
    assert any(name.startswith("lazytensor-decode") for name in threads)
    assert any(not name.startswith("lazytensor-decode") for name in threads)
