"""Tests for lazytensor/backends/client.py: a connection, its jobs, and the replies they read.

Two kinds of peer: a scripted transport (:class:`Script`) that decodes what the client sends and
answers with whatever a test puts in its queue, for exact control of statuses, failures,
silence and reply order; and a real :class:`~lazytensor_server.service.Service` serving a tiny
MLP through an :class:`~lazytensor.backends.transport.InProcessTransport`, whose results are
compared with hand-written hooks.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import zmq
from torch._subclasses.fake_tensor import FakeTensor

from lazytensor.backends.base import JobState, RunRequest
from lazytensor.backends.client import Connection
from lazytensor.backends.transport import InProcessTransport, ZmqTransport
from lazytensor.core.errors import (
    LimitExceeded,
    NodeFailure,
    OpNotAllowedError,
    RemoteError,
    RemoteOutOfMemory,
    RemoteTimeout,
    UnknownRequest,
)
from lazytensor.core.graph import Batch, Graph, Ref
from lazytensor.protocol import messages as m
from lazytensor.runtime import fake
from lazytensor_server import worker
from lazytensor_server.auth import Keys
from lazytensor_server.limits import Limits
from lazytensor_server.registry import ServedModel
from lazytensor_server.service import Service
from models import TinyMLP, hooked


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def inputs(batch: int = 2, seed: int = 6) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def request(x: torch.Tensor, scale: float = 2.0, **options) -> RunRequest:
    """Save layer1's output and scale layer2's output by ``scale``."""
    graph = Graph()
    h = graph.add("output", "layer1")
    out = graph.add("output", "layer2")
    scaled = graph.add("function", "operator.mul", (Ref(out.id), scale))
    graph.add("set_output", "layer2", (Ref(scaled.id),))
    y = graph.add("output", "")
    graph.save(h.id)
    graph.save(y.id)
    return RunRequest(graph, Batch((x,), {}, len(x)), **options)


def expected(model: TinyMLP, x: torch.Tensor, scale: float = 2.0) -> dict[int, torch.Tensor]:
    seen = {}
    y = hooked(
        model,
        x,
        post=[
            (model.layer1, lambda mod, a, o: seen.update(h=o)),
            (model.layer2, lambda mod, a, o: o * scale),
        ],
    )
    return {0: seen["h"], 4: y}


class Script:
    """A transport that decodes what the client sends and answers from a queue.

    ``answer(request)`` gives the replies to each request as it is sent (none by default); a
    test may also ``push`` replies at any time.
    """

    def __init__(self, answer: Callable[[m.Request], list[m.Message]] | None = None) -> None:
        self.answer = answer or (lambda request: [])
        self.sent: list[m.Request] = []
        self.replies: queue.Queue = queue.Queue()
        self.reconnects = 0

    def send(self, frames: list) -> None:
        message = m.decode_request([bytes(f) for f in frames])
        self.sent.append(message)
        self.push(*self.answer(message))

    def push(self, *messages: m.Message) -> None:
        for message in messages:
            self.replies.put([bytes(f) for f in m.encode(message)])

    def recv(self, timeout: float) -> list | None:
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            return None

    def reconnect(self) -> None:
        self.reconnects += 1

    def close(self) -> None:
        pass

    def kinds(self) -> list[str]:
        return [message.KIND for message in self.sent]


def scripted(answer=None, **options) -> tuple[Connection, Script]:
    script = Script(answer)
    options = {"timeout": 10.0, "silence": 60.0, **options}
    return Connection("inproc", None, transport=script, **options), script


# -- statuses and results (scripted) ----------------------------------------------------------


def test_statuses_are_read_without_waiting_then_the_result() -> None:
    client, script = scripted(lambda r: [m.Status(r.id, "received"), m.Status(r.id, "queued", 2)])
    job = client.submit("tiny", request(inputs()))
    assert job.state is JobState.SENT
    assert job.status() is JobState.QUEUED and job.position == 2
    script.push(m.Status(job.id, "not-a-state"))  # an unknown state changes nothing
    assert job.status() is JobState.QUEUED
    script.push(m.Status(job.id, "running"))
    assert job.status() is JobState.RUNNING and job.position is None
    script.push(m.Result(job.id, {0: torch.ones(2)}))
    values = job.result()
    exact(values[0], torch.ones(2))
    assert job.status() is JobState.COMPLETED
    assert script.kinds() == ["run"]  # the acknowledgement waits for the next request
    client.submit("tiny", request(inputs()))
    assert script.kinds() == ["run", "run"] and script.sent[1].acks == (job.id,)


def test_a_run_carries_the_request_and_the_key() -> None:
    script = Script()
    client = Connection("inproc", "secret", transport=script, timeout=10.0)
    req = request(inputs(), stop_at=2)
    job = client.submit("tiny", req)
    [sent] = script.sent
    assert type(sent) is m.Run and sent.id == job.id and sent.key == "secret"
    assert (sent.model, sent.stop_at, sent.fake) == ("tiny", 2, False)
    assert sent.graph.nodes == req.graph.nodes and sent.batch.size == 2
    assert client.submit("tiny", req).id != job.id  # each run gets its own id


def test_read_only_calls_return_their_reply() -> None:
    listing = [{"name": "tiny", "parameters": 1}]
    client, script = scripted(
        lambda r: (
            [m.ModelList(r.id, listing)]
            if type(r) is m.ListModels
            else [m.Description(r.id, r.model, {"cls": "MLP", "children": {}}, {})]
        )
    )
    assert client.models() == listing
    assert client.describe("tiny").tree == {"cls": "MLP", "children": {}}
    assert script.kinds() == ["models", "describe"]  # no ack for read-only requests


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        ({"type": "RemoteTimeout", "message": "over --max-seconds"}, RemoteTimeout),
        ({"type": "RemoteOutOfMemory", "message": "no room"}, RemoteOutOfMemory),
        ({"type": "LimitExceeded", "message": "graph nodes"}, LimitExceeded),
        ({"type": "PermissionError", "message": "invalid or missing API key"}, PermissionError),
        ({"type": "SomethingElse", "message": "odd"}, RemoteError),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_a_failure_is_raised_as_the_clients_exception(error: dict, cls: type) -> None:
    client, script = scripted(lambda r: [m.Status(r.id, "received"), m.Failure(r.id, error)])
    job = client.submit("tiny", request(inputs()))
    with pytest.raises(cls, match=error["message"]) as caught:
        job.result()
    assert type(caught.value) is cls
    assert job.status() is JobState.FAILED
    assert script.kinds() == ["run"]
    with pytest.raises(cls):  # asking again raises the same failure, without the network
        job.result()


def test_a_failure_naming_a_node_is_a_node_failure() -> None:
    error = {"type": "IndexError", "message": "index 99 is out of bounds", "node": 3, "hint": ""}
    client, _ = scripted(lambda r: [m.Failure(r.id, error)])
    with pytest.raises(NodeFailure) as caught:
        client.submit("tiny", request(inputs())).result()
    assert caught.value.node == 3 and type(caught.value.error) is IndexError


def test_a_run_the_server_lost_is_sent_again() -> None:
    def answer(r: m.Request) -> list[m.Message]:
        if sum(type(s) is m.Run for s in script.sent) == 1:
            return [m.Failure.of(r.id, UnknownRequest("no request"))]
        return [m.Result(r.id, {0: 1})]

    client, script = scripted(answer)
    job = client.submit("tiny", request(inputs()))
    assert job.result() == {0: 1}
    assert script.kinds() == ["run", "run"]
    assert script.sent[0].id == script.sent[1].id == job.id
    client.close()  # what is still unacknowledged goes as one ack
    assert script.kinds() == ["run", "run", "ack"] and script.sent[2].id == job.id


def test_unknown_request_for_a_read_only_call_is_raised() -> None:
    client, _ = scripted(lambda r: [m.Failure.of(r.id, UnknownRequest("gone"))])
    with pytest.raises(UnknownRequest, match="gone"):
        client.models()


# -- timeouts and silence (scripted) ----------------------------------------------------------


def test_no_reply_within_the_timeout_is_a_remote_timeout() -> None:
    client, _ = scripted(lambda r: [m.Status(r.id, "queued", 4)], timeout=0.3)
    job = client.submit("tiny", request(inputs()))
    started = time.monotonic()
    with pytest.raises(RemoteTimeout) as caught:
        job.result()
    assert 0.3 <= time.monotonic() - started < 5.0
    assert isinstance(caught.value, TimeoutError)
    assert job.id in str(caught.value) and "queued" in str(caught.value)


def test_a_job_the_server_answered_is_not_reported_as_no_server() -> None:
    client, _ = scripted(lambda r: [m.Status(r.id, "queued", 3)], timeout=1.0, connect_timeout=0.2)
    job = client.submit("tiny", request(inputs()))
    assert job.status() is JobState.QUEUED  # the server's answer, read before waiting
    with pytest.raises(RemoteTimeout, match=f"no result for request {job.id}"):
        job.result()


def test_no_first_word_within_the_connect_timeout() -> None:
    client, _ = scripted(timeout=10.0, connect_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(RemoteTimeout, match="is a lazytensor server running there"):
        client.submit("tiny", request(inputs())).result()
    assert time.monotonic() - started < 5.0


def test_the_wait_timeout_overrides_the_clients() -> None:
    client, _ = scripted(timeout=600.0)
    job = client.submit("tiny", request(inputs()))
    started = time.monotonic()
    with pytest.raises(RemoteTimeout, match="within 0 s"):
        job.result(timeout=0.2)
    assert time.monotonic() - started < 5.0


def test_silence_asks_again_by_id_then_on_a_fresh_socket() -> None:
    client, script = scripted(timeout=0.9, silence=0.2)
    job = client.submit("tiny", request(inputs()))
    with pytest.raises(RemoteTimeout):
        job.result()
    kinds = script.kinds()
    assert kinds[0] == "run" and kinds.count("fetch") >= 2
    assert all(s.id == job.id for s in script.sent)
    assert script.reconnects >= 1  # the second ask goes out on a fresh socket


def test_a_read_only_request_is_simply_sent_again_after_silence() -> None:
    client, script = scripted(timeout=0.6, silence=0.15)
    with pytest.raises(RemoteTimeout):
        client.models()
    assert set(script.kinds()) == {"models"} and len(script.sent) >= 2
    assert len({s.id for s in script.sent}) == 1


# -- several jobs on one client ---------------------------------------------------------------


def test_replies_read_by_one_job_are_kept_for_the_other() -> None:
    client, script = scripted()
    first = client.submit("tiny", request(inputs()))
    second = client.submit("tiny", request(inputs()))
    script.push(
        m.Status(second.id, "running"),
        m.Result(second.id, {0: "second"}),
        m.Status("someone-else", "running"),  # a late reply to nobody: dropped
        m.Result(first.id, {0: "first"}),
    )
    assert first.result() == {0: "first"}
    assert script.replies.empty()
    assert second.state is JobState.SENT  # its replies wait in the mailbox
    assert second.result() == {0: "second"}
    assert second.state is JobState.COMPLETED
    assert client._mail == {}  # nothing left behind


# -- cancel (scripted) -----------------------------------------------------------------------


def test_cancel_of_a_queued_job() -> None:
    def answer(r: m.Request) -> list[m.Message]:
        if type(r) is m.Cancel:
            error = {"type": "RemoteError", "message": "cancelled before it ran", "cancelled": True}
            return [m.Failure(r.id, error)]
        return [m.Status(r.id, "queued", 1)]

    client, script = scripted(answer)
    job = client.submit("tiny", request(inputs()))
    assert job.cancel() is True
    assert job.status() is JobState.CANCELLED
    with pytest.raises(RemoteError, match="cancelled"):
        job.result()
    assert script.kinds() == ["run", "cancel"]
    assert job.cancel() is False and script.kinds() == ["run", "cancel"]


def test_cancel_of_a_job_that_has_started_returns_at_once() -> None:
    def answer(r: m.Request) -> list[m.Message]:
        return [m.Status(r.id, "running")] if type(r) is m.Cancel else [m.Status(r.id, "queued")]

    client, script = scripted(answer)
    job = client.submit("tiny", request(inputs()))
    started = time.monotonic()
    assert job.cancel() is False  # the server started it instead: it says "running"
    assert job.state is JobState.RUNNING and time.monotonic() - started < 5.0
    assert job.cancel() is False and script.kinds() == ["run", "cancel"]  # known to run: not sent
    script.push(m.Result(job.id, {0: 1}))
    assert job.result() == {0: 1}


def test_cancel_without_an_answer_gives_up_after_silence() -> None:
    client, script = scripted(silence=0.3)
    job = client.submit("tiny", request(inputs()))
    started = time.monotonic()
    assert job.cancel() is False
    assert 0.3 <= time.monotonic() - started < 5.0
    assert script.kinds() == ["run", "cancel"] and job.state is JobState.SENT


def test_cancel_of_a_job_that_already_ran() -> None:
    client, script = scripted(lambda r: [m.Result(r.id, {0: 1})] if type(r) is m.Run else [])
    job = client.submit("tiny", request(inputs()))
    assert job.result() == {0: 1}
    assert job.cancel() is False
    assert script.kinds() == ["run"]


# -- against a real service ---------------------------------------------------------------------


class Gate(TinyMLP):
    """A :class:`TinyMLP` whose forward waits until ``opened`` is set (or a few seconds pass)."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.opened = threading.Event()
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.opened.wait(10.0)
        return super().forward(x)


@pytest.fixture(scope="module")
def tiny() -> TinyMLP:
    return TinyMLP(seed=0).eval()


@pytest.fixture(scope="module")
def service(tiny: TinyMLP) -> Iterator[Service]:
    service = Service([ServedModel.wrap("tiny", tiny)])
    yield service
    service.shutdown(grace=5.0)


@pytest.fixture
def client(service: Service) -> Connection:
    return Connection("inproc", None, transport=InProcessTransport(service), timeout=30.0)


def test_a_run_on_the_service_equals_hooks(client: Connection, tiny: TinyMLP) -> None:
    x = inputs(3)
    job = client.submit("tiny", request(x))
    got = job.result()
    assert job.status() is JobState.COMPLETED
    want = expected(tiny, x)
    assert set(got) == set(want)
    for i in want:
        exact(got[i], want[i])


def test_a_shape_only_run_returns_fake_tensors(client: Connection) -> None:
    mode = fake.mode()
    got = client.submit("tiny", request(inputs(5), fake_mode=mode)).result()
    assert isinstance(got[0], FakeTensor) and isinstance(got[4], FakeTensor)
    assert got[0].shape == (5, 16) and got[4].shape == (5, 4)
    assert got[0].fake_mode is mode


def test_models_and_describe(client: Connection, tiny: TinyMLP) -> None:
    [info] = client.models()
    assert info["name"] == "tiny" and info["parameters"] == sum(
        p.numel() for p in tiny.parameters()
    )
    tree = client.describe("tiny").tree
    assert tree["cls"] == "TinyMLP" and list(tree["children"]) == [
        "layer1",
        "act",
        "layer2",
        "layer3",
    ]


def failing(op: str, target: str, *args) -> RunRequest:
    graph = Graph()
    h = graph.add("output", "layer1")
    graph.save(graph.add(op, target, (Ref(h.id), *args)).id)
    return RunRequest(graph, Batch((inputs(),), {}, 2))


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (failing("function", "operator.getitem", (slice(None), 99)), IndexError),
        (failing("method", "numpy"), OpNotAllowedError),
        (failing("python", "mine", "not code"), OpNotAllowedError),
    ],
    ids=["index", "method", "python"],
)
def test_a_node_that_fails_on_the_server(client: Connection, req, error) -> None:
    with pytest.raises(NodeFailure) as caught:
        client.submit("tiny", req).result()
    assert caught.value.node == 1 and type(caught.value.error) is error


def test_a_module_the_model_does_not_have(client: Connection) -> None:
    graph = Graph()
    graph.save(graph.add("output", "layer9").id)
    with pytest.raises(NodeFailure) as caught:
        client.submit("tiny", RunRequest(graph, Batch((inputs(),), {}, 2))).result()
    assert type(caught.value.error) is AttributeError and "layer9" in str(caught.value.error)


def test_a_model_the_server_does_not_serve(client: Connection) -> None:
    with pytest.raises(KeyError, match="does not serve a model 'huge'"):
        client.submit("huge", request(inputs())).result()


def test_limits_and_keys(tiny: TinyMLP) -> None:
    service = Service([ServedModel.wrap("tiny", tiny)], Keys({"k1": "alice"}), Limits(max_nodes=2))
    try:
        transport = InProcessTransport(service)
        good = Connection("inproc", "k1", transport=transport, timeout=30.0)
        with pytest.raises(LimitExceeded, match="--max-nodes"):
            good.submit("tiny", request(inputs())).result()
        bad = Connection("inproc", "nope", transport=InProcessTransport(service), timeout=30.0)
        with pytest.raises(PermissionError, match="API key"):
            bad.models()
    finally:
        service.shutdown(grace=5.0)


def test_two_threads_share_one_client(client: Connection, tiny: TinyMLP) -> None:
    xs = {scale: inputs(2 + int(scale), seed=int(scale)) for scale in (2.0, 3.0)}
    results: dict[float, list] = {scale: [] for scale in xs}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=30)

    def work(scale: float) -> None:
        try:
            barrier.wait()
            for _ in range(4):
                job = client.submit("tiny", request(xs[scale], scale))
                results[scale].append(job.result())
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(scale,)) for scale in xs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for scale, got in results.items():
        want = expected(tiny, xs[scale], scale)
        assert len(got) == 4
        for values in got:
            exact(values[4], want[4])
    assert client._mail == {}


def told_running(job: Any, within: float = 5.0) -> bool:
    """Whether ``job`` hears "running" within ``within`` s (a server tells a job so only once
    it has run a moment: ``child.RUNNING_AFTER``)."""
    end = time.monotonic() + within
    while job.status() is not JobState.RUNNING and time.monotonic() < end:
        time.sleep(0.005)
    return job.status() is JobState.RUNNING


def test_a_job_that_runs_a_while_is_told_so_and_a_quick_one_only_gets_its_result(
    monkeypatch,
) -> None:
    monkeypatch.setattr(worker, "RUNNING_AFTER", 0.5)  # "quick" with room for a slow machine
    gate = Gate().eval()
    service = Service([ServedModel.wrap("gate", gate)])
    try:
        client = Connection("inproc", None, transport=InProcessTransport(service), timeout=30.0)
        started = time.monotonic()
        slow = client.submit("gate", request(inputs()))
        assert told_running(slow, within=9.0) and time.monotonic() - started >= 0.5
        assert gate.entered.wait(10.0) and not gate.opened.is_set()
        gate.opened.set()
        assert set(slow.result()) == {0, 4}
        heard = []
        take = client.transport.recv
        client.transport.recv = lambda timeout: heard.append(take(timeout)) or heard[-1]
        quick = client.submit("gate", request(inputs()))  # the gate is open: at once
        assert set(quick.result()) == {0, 4}
        kinds = [m.decode_reply(frames).KIND for frames in heard if frames is not None]
        assert kinds == ["result"]
    finally:
        service.shutdown(grace=5.0)


def test_cancel_of_a_job_queued_behind_another() -> None:
    gate = Gate().eval()
    service = Service([ServedModel.wrap("gate", gate)])
    try:
        client = Connection("inproc", None, transport=InProcessTransport(service), timeout=30.0)
        running = client.submit("gate", request(inputs()))
        assert gate.entered.wait(10.0)
        queued = client.submit("gate", request(inputs()))
        assert queued.status() is JobState.QUEUED and queued.position == 1
        assert told_running(running)
        assert queued.cancel() is True
        assert queued.status() is JobState.CANCELLED
        started = time.monotonic()
        assert running.cancel() is False  # it has started: said at once, not after the run
        assert time.monotonic() - started < 5.0 and not gate.opened.is_set()
        gate.opened.set()
        assert set(running.result()) == {0, 4}
        with pytest.raises(RemoteError, match="cancelled"):
            queued.result()
    finally:
        gate.opened.set()
        service.shutdown(grace=5.0)


# -- the ZeroMQ transport ---------------------------------------------------------------------
@pytest.fixture
def router() -> Iterator[tuple[Any, str]]:
    context = zmq.Context.instance()
    socket = context.socket(zmq.ROUTER)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, f"tcp://127.0.0.1:{port}"
    socket.close(0)


def test_zmq_transport_waits_up_to_its_timeout_then_returns_nothing(router) -> None:
    socket, address = router
    transport = ZmqTransport(address)
    try:
        assert transport.recv(0.0) is None
        started = time.monotonic()
        assert transport.recv(0.2) is None
        assert 0.15 < time.monotonic() - started < 5.0
        transport.send([b"LZT\x01", b"hello"])
        assert socket.poll(5000)
        peer, *frames = socket.recv_multipart()
        assert frames == [b"LZT\x01", b"hello"]
        socket.send_multipart([peer, b"a", b"b"])
        got = transport.recv(5.0)  # a reply ends the wait at once
        assert [bytes(f.buffer) for f in got] == [b"a", b"b"]
        assert transport.recv(0.0) is None  # and the timeout changes back
    finally:
        transport.close()


def test_zmq_transport_sends_without_polling_when_the_socket_has_room(router) -> None:
    socket, address = router
    transport = ZmqTransport(address)
    try:

        def no_poll(*args: Any) -> int:
            raise AssertionError("a send with room polled first")

        transport._socket.poll = no_poll
        transport.send([b"LZT\x01", memoryview(bytes(range(200)) * 400)])  # over zmq's copy size
        assert socket.poll(5000)
        _, version, data = socket.recv_multipart()
        assert version == b"LZT\x01" and data == bytes(range(200)) * 400
    finally:
        transport.close()
