"""The service on bad input: every bad request gets a clear error, and the next one still works.

Requests here are raw frames handed to :meth:`Service.handle`, as a hostile or buggy peer
could send them: they start from the exact frames a client builds for a real trace
(:class:`servers.Capture`), then break one thing. After each refusal the same service runs a
correct request and must return the values the local model computes.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import msgpack
import pytest
import torch

from lazytensor.core.errors import LimitExceeded
from lazytensor.core.graph import Ref
from lazytensor.frontend.served import Client, in_process
from lazytensor.protocol.values import MAGIC, PROTOCOL_VERSION, VERSION_FRAME
from lazytensor_server.auth import Keys
from lazytensor_server.limits import Limits
from lazytensor_server.service import Service
from servers import MODEL, Capture
from wire import wire

PROMPTS = ["Q: cheap\nA:", "Q: big\nA:"]


def record(model):
    """A trace with a function, a method and a getattr node, and a point write."""
    x = model.model.layers[1].mlp.down_proj.input  # (B, T, neurons)
    x[:, -1, [7]] = 5.0  # function node: operator.setitem
    logits = model.output.logits  # getattr node: logits
    return logits[:, -1].softmax(-1).save()  # method node: softmax


#: The token the test client sends as its key on an open server: it owns the client's results.
TOKEN = "test-client-token"


def request(model, key=None, generate=None, build=record) -> dict:
    """The body a client sends to run ``build`` on ``PROMPTS`` (a fresh id each time)."""
    capture = Capture()
    client = Client("capture", TOKEN if key is None else key, transport=capture)
    if generate is None:
        trace = model.trace(PROMPTS, remote=client, blocking=False)
    else:
        trace = model.generate(PROMPTS, remote=client, blocking=False, **generate)
    with trace:
        build(model)
    return wire.decode(capture.sent[-1]).body


def frames_of(body: dict, kind: str = "run") -> list[bytes]:
    return [bytes(f) for f in wire.encode(kind, body)]


class Peer:
    """One peer of a service, sending raw frames and collecting the decoded replies."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.replies: queue.Queue[wire.Message] = queue.Queue()

    def send(self, frames: list, timeout: float = 30.0) -> None:
        """Hand ``frames`` to the service; fail, not hang, if it does not return."""
        thread = threading.Thread(
            target=self.service.handle, args=(self, frames, self._reply), daemon=True
        )
        thread.start()
        thread.join(timeout)
        assert not thread.is_alive(), "the service hangs on this request"

    def _reply(self, peer: object, frames: list) -> None:  # from a worker thread too
        if peer is self:
            self.replies.put(wire.decode(frames))

    def answer(self, request_id: str | None = None, timeout: float = 30.0) -> wire.Message:
        """The next reply that is not a status (for ``request_id`` only, if given)."""
        end = time.monotonic() + timeout
        while True:
            message = self.replies.get(timeout=max(0.0, end - time.monotonic()))
            if message.kind != "status" and request_id in (None, message.body.get("id")):
                return message

    def error(self, frames: list, type_name: str, *fragments: str) -> dict:
        """Send ``frames``; expect an error of ``type_name`` whose message has ``fragments``."""
        self.send(frames)
        reply = self.answer()
        assert reply.kind == "error", reply
        assert reply.body["type"] == type_name, reply.body
        for fragment in fragments:
            assert fragment in reply.body["message"], reply.body["message"]
        return reply.body


@pytest.fixture
def make_service(served_llama):
    """Build services over the shared model; each is shut down after the test."""
    made: list[Service] = []

    def make(**kwargs) -> Service:
        service = Service([served_llama], **kwargs)
        made.append(service)
        return service

    yield make
    for service in made:
        service.shutdown(grace=5.0)


@pytest.fixture(scope="module")
def expected(local_llama) -> torch.Tensor:
    with local_llama.trace(PROMPTS):
        probs = record(local_llama)
    return probs


@pytest.fixture
def still_serves(local_llama, expected):
    """Check that a peer's service runs a correct request and returns the local values."""

    def check(peer: Peer, key: str | None = None) -> None:
        body = request(local_llama, key)
        peer.send(frames_of(body))
        reply = peer.answer()
        assert reply.kind == "result", reply.body
        assert reply.body["id"] == body["id"]
        (saved,) = body["graph"]["saved"]
        assert torch.equal(reply.body["values"][saved], expected)

    return check


def nodes_where(body: dict, op: str) -> list[list]:
    return [node for node in body["graph"]["nodes"] if node[1] == op]


# -- the wire -----------------------------------------------------------------------------------


def test_a_correct_request_reports_its_progress(make_service, local_llama, expected):
    """A job still running a moment after it started is told so; one that finishes sooner
    hears only its result (a status then would slow the forward it reports on)."""
    peer = Peer(make_service())
    body = request(local_llama)
    peer.send(frames_of(body))
    messages = [peer.replies.get(timeout=30)]
    while messages[-1].kind == "status":
        messages.append(peer.replies.get(timeout=30))
    states = [m.body["state"] for m in messages[:-1]]
    assert set(states) <= {"queued", "running"} and states[-1:] in ([], ["running"])
    assert all(m.body["id"] == body["id"] for m in messages)
    (saved,) = body["graph"]["saved"]
    assert torch.equal(messages[-1].body["values"][saved], expected)


def test_malformed_and_truncated_frames(make_service, local_llama, still_serves):
    peer = Peer(make_service())
    good = frames_of(request(local_llama))
    assert len(good) > 2  # the batch's token ids travel as tensor frames
    header = good[1]
    not_a_header = msgpack.packb([1, 2, 3])
    cases = [
        ([], "empty message"),
        ([b"GET / HTTP/1.1"], "not a lazytensor message"),
        ([VERSION_FRAME], "no header frame"),
        ([VERSION_FRAME, b"\xc1"], "not valid msgpack"),
        ([VERSION_FRAME, header[: len(header) // 2], *good[2:]], "not valid msgpack"),
        ([VERSION_FRAME, not_a_header, *good[2:]], "the header is"),
        (good[:-1], "header describes"),  # a tensor frame missing
        ([*good, b"extra"], "header describes"),
        ([*good[:-1], good[-1][:-1]], "bytes"),  # a tensor frame cut short
    ]
    for frames, fragment in cases:
        peer.error(frames, "ProtocolError", fragment)
        still_serves(peer)


def test_a_refused_request_is_answered_under_its_id(make_service, local_llama):
    """Even when the frames do not decode, the error carries the id the client waits on."""
    peer = Peer(make_service())
    body = request(local_llama)
    good = frames_of(body)
    reply = peer.error([*good[:-1], good[-1][:-1]], "ProtocolError")
    assert reply["id"] == body["id"]


def test_wrong_protocol_version_names_both(make_service, still_serves, local_llama):
    peer = Peer(make_service())
    frames = frames_of(request(local_llama))
    frames[0] = MAGIC + bytes([PROTOCOL_VERSION + 1])
    peer.error(
        frames,
        "ProtocolError",
        f"protocol {PROTOCOL_VERSION + 1}",
        f"this side speaks {PROTOCOL_VERSION}",
    )
    still_serves(peer)


def test_unknown_request_kind(make_service, still_serves):
    peer = Peer(make_service())
    peer.error(
        frames_of({"id": "x"}, kind="shell"), "ProtocolError", "unknown request kind 'shell'"
    )
    still_serves(peer)


def test_tensor_header_whose_byte_length_lies(make_service, local_llama, still_serves):
    peer = Peer(make_service())
    frames = frames_of(request(local_llama))
    header = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
    spec = header["tensors"][0]
    for nbytes, frame in (
        (spec["nbytes"] + 8, frames[2]),  # the header lies, the frame is right
        (spec["nbytes"] + 8, frames[2] + bytes(8)),  # both agree, the shape does not
        (-1, frames[2]),
    ):
        lying = msgpack.packb(
            {**header, "tensors": [{**spec, "nbytes": nbytes}, *header["tensors"][1:]]}
        )
        peer.error(
            [frames[0], lying, frame, *frames[3:]], "ProtocolError", f"claims {nbytes} bytes"
        )
        still_serves(peer)


def test_oversized_request(make_service, local_llama, expected):
    service = make_service(limits=Limits(max_request_bytes=20_000))
    peer = Peer(service)
    big = torch.zeros(100, 64)  # 25,600 bytes, sent as a graph constant

    def build(model):
        return (model.model.layers[0].output[0] @ big.T).save()

    body = request(local_llama, build=build)
    reply = peer.error(frames_of(body), "LimitExceeded", "--max-request-bytes", "20,000")
    assert reply["id"] == body["id"]
    client = in_process(service, timeout=10.0)
    with pytest.raises(LimitExceeded, match="--max-request-bytes"):
        with local_llama.trace(PROMPTS, remote=client):
            build(local_llama)
    with local_llama.trace(PROMPTS, remote=client):
        probs = record(local_llama)
    assert torch.equal(probs, expected)


# -- the graph ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["torch.load", "torch.from_file", "builtins.eval", "os.system"])
def test_unknown_function_is_refused(target, make_service, local_llama, still_serves):
    peer = Peer(make_service())
    body = request(local_llama)
    node = nodes_where(body, "function")[0]
    node[2] = target
    reply = peer.error(frames_of(body), "OpNotAllowedError", repr(target), "allow-list")
    assert reply["node"] == node[0]
    still_serves(peer)


@pytest.mark.parametrize(
    ("op", "target", "fragment"),
    [
        ("method", "__class__", "tensor method '__class__'"),
        ("method", "untyped_storage", "tensor method 'untyped_storage'"),
        ("method", "data_ptr", "tensor method 'data_ptr'"),
        ("getattr", "_modules", "attribute '_modules'"),
        ("getattr", "__class__", "attribute '__class__'"),
        ("getattr", "__dict__", "attribute '__dict__'"),
    ],
)
def test_forbidden_method_or_attribute(
    op, target, fragment, make_service, local_llama, still_serves
):
    peer = Peer(make_service())
    body = request(local_llama)
    node = nodes_where(body, op)[0]
    node[2] = target
    reply = peer.error(frames_of(body), "OpNotAllowedError", fragment)
    assert reply["node"] == node[0]
    still_serves(peer)


def test_unknown_op_is_refused(make_service, local_llama, still_serves):
    peer = Peer(make_service())
    body = request(local_llama)
    nodes_where(body, "method")[0][1] = "eval"
    peer.error(frames_of(body), "ProtocolError", "'eval'")
    still_serves(peer)


def test_user_functions_are_refused_unless_trusted(make_service, local_llama, still_serves):
    peer = Peer(make_service())
    body = request(local_llama)
    node = nodes_where(body, "method")[0]
    node[1], node[2] = "python", "builtins.print"
    node[3] = (b"not even a pickle", *node[3])
    peer.error(frames_of(body), "OpNotAllowedError", "--trusted-clients")
    still_serves(peer)


def test_out_arguments_are_refused(make_service, local_llama, still_serves):
    peer = Peer(make_service())
    body = request(local_llama)
    node = nodes_where(body, "method")[0]
    node[4] = {**node[4], "out": node[3][0]}  # write into its own first argument
    peer.error(frames_of(body), "OpNotAllowedError", "out=")
    still_serves(peer)


@pytest.mark.parametrize(
    "path", ["model.layers.99.mlp", "model.layers.1.mlp.down_proj.weight", "model.nowhere"]
)
def test_module_path_that_does_not_exist(path, make_service, local_llama, still_serves):
    peer = Peer(make_service())
    body = request(local_llama)
    point = next(n for n in body["graph"]["nodes"] if n[1] == "input")
    point[2] = path
    reply = peer.error(frames_of(body), "AttributeError", f"has no module {path!r}")
    assert reply["node"] == point[0]
    still_serves(peer)


def test_a_reference_to_a_later_node_is_refused(make_service, local_llama, still_serves):
    peer = Peer(make_service())
    body = request(local_llama)
    node = nodes_where(body, "method")[0]
    node[3] = (Ref(len(body["graph"]["nodes"]) + 5), *node[3][1:])
    peer.error(frames_of(body), "ProtocolError", "not recorded before it")
    still_serves(peer)


# -- limits ---------------------------------------------------------------------------------------


def test_too_many_nodes(make_service, local_llama, still_serves):
    peer = Peer(make_service(limits=Limits(max_nodes=3)))
    body = request(local_llama)
    assert len(body["graph"]["nodes"]) > 3
    peer.error(frames_of(body), "LimitExceeded", "graph nodes", "--max-nodes")

    def small(model):
        return model.output.logits.save()  # 2 nodes

    peer.send(frames_of(request(local_llama, build=small)))
    assert peer.answer().kind == "result"


def test_too_many_generation_steps(make_service, local_llama):
    peer = Peer(make_service(limits=Limits(max_new_tokens=3)))

    def steps(model):
        return model.lm_head.output.save()

    too_many = request(local_llama, generate={"max_new_tokens": 4, "do_sample": False}, build=steps)
    peer.error(frames_of(too_many), "LimitExceeded", "generation steps", "--max-new-tokens")
    fine = request(local_llama, generate={"max_new_tokens": 3, "do_sample": False}, build=steps)
    peer.send(frames_of(fine))
    assert peer.answer().kind == "result"


@pytest.mark.parametrize("name", ["custom_generate", "trust_remote_code", "generation_config"])
def test_forbidden_model_input(name, make_service, local_llama, still_serves):
    peer = Peer(make_service())
    body = request(local_llama)
    body["batch"]["kwargs"][name] = "anything"
    peer.error(frames_of(body), "OpNotAllowedError", f"model input {name!r} is not accepted")
    still_serves(peer)


def test_saved_bytes_limit(make_service, local_llama):
    service = make_service(limits=Limits(max_saved_bytes=1_000))
    peer = Peer(service)
    peer.error(frames_of(request(local_llama)), "LimitExceeded", "saved bytes", "--max-saved-bytes")

    def little(model):
        return model.output.logits[:, -1, :4].save()  # 32 bytes

    peer.send(frames_of(request(local_llama, build=little)))
    assert peer.answer().kind == "result"


def test_wall_time_limit(make_service, local_llama, still_serves):
    service = make_service(limits=Limits(max_seconds=1e-6))
    peer = Peer(service)
    peer.error(frames_of(request(local_llama)), "RemoteTimeout", "--max-seconds")
    # The worker survived and its deadline hook is gone: with a sane limit it runs again.
    worker = service.workers[MODEL]
    worker.limits = dataclasses.replace(worker.limits, max_seconds=300.0)
    still_serves(peer)


def test_wall_time_limit_stops_generation_between_steps(make_service, local_llama):
    """A generation whose graph hooks nothing is still stopped, at its next decoding step."""
    service = make_service(limits=Limits(max_seconds=1e-6))
    client = in_process(service, timeout=30.0)
    with pytest.raises(TimeoutError, match="--max-seconds"):
        with local_llama.generate(PROMPTS, max_new_tokens=3, remote=client) as tracer:
            tracer.result.save()


# -- keys -----------------------------------------------------------------------------------------


def test_api_keys(make_service, local_llama, still_serves):
    peer = Peer(make_service(keys=Keys({"s3cret": "alice"})))
    for key in ("wrong", None, "", "s3cre", "s3cret "):
        body = request(local_llama, key=key)
        reply = peer.error(frames_of(body), "PermissionError", "invalid or missing API key")
        assert reply["id"] == body["id"]
        peer.error(frames_of({"id": "m", "key": key}, kind="models"), "PermissionError")
    still_serves(peer, key="s3cret")


def test_a_client_with_a_wrong_key_gets_permission_error(make_service):
    service = make_service(keys=Keys({"s3cret": "alice"}))
    with pytest.raises(PermissionError, match="invalid or missing API key"):
        in_process(service, api_key="nope", timeout=10.0).models()
    (info,) = in_process(service, api_key="s3cret", timeout=10.0).models()
    assert info["name"] == MODEL


# -- request ids: retries, fetch, expiry ----------------------------------------------------------


def test_the_same_request_twice_runs_once(make_service, local_llama, expected):
    service = make_service()
    worker = service.workers[MODEL]
    peer = Peer(service)
    body = request(local_llama)
    frames = frames_of(body)
    (saved,) = body["graph"]["saved"]
    peer.send(frames)
    peer.send(frames)  # a retry while the first is queued or running
    first = peer.answer(body["id"])
    assert first.kind == "result" and torch.equal(first.body["values"][saved], expected)
    peer.send(frames)  # a retry after it finished: the kept result
    again = peer.answer(body["id"])
    assert again.kind == "result" and torch.equal(again.body["values"][saved], expected)
    # A different request behind them in the queue: had a retry run, it would have run first.
    other = request(local_llama)
    peer.send(frames_of(other))
    assert peer.answer(other["id"]).kind == "result"
    assert worker.served_count == 2


def test_fetch_returns_the_kept_result(make_service, local_llama, expected):
    service = make_service()
    peer = Peer(service)
    body = request(local_llama)
    peer.send(frames_of(body))
    assert peer.answer().kind == "result"
    count = service.workers[MODEL].served_count
    other = Peer(service)  # e.g. the same client, reconnected with a new identity
    other.send(frames_of({"id": body["id"], "key": body["key"]}, kind="fetch"))
    reply = other.answer()
    assert reply.kind == "result"
    (saved,) = body["graph"]["saved"]
    assert torch.equal(reply.body["values"][saved], expected)
    assert service.workers[MODEL].served_count == count
    other.error(
        frames_of({"id": "never-sent", "key": None}, kind="fetch"), "UnknownRequest", "never-sent"
    )


def test_results_expire(make_service, local_llama, still_serves):
    ttl = 0.2
    service = make_service(ttl=ttl)
    peer = Peer(service)
    body = request(local_llama)
    peer.send(frames_of(body))
    assert peer.answer().kind == "result"
    # The service stamps a result before it sends it, so once ttl has passed since the answer
    # came it has passed for the result too, however slowly this machine runs: no race.
    time.sleep(ttl + 0.1)
    reply = peer.error(
        frames_of({"id": body["id"], "key": TOKEN}, kind="fetch"),
        "UnknownRequest",
        f"no request {body['id']!r} is running or kept",
        "kept 0.2 s",
    )
    assert reply["message"].startswith("no request")  # not a KeyError's quoted repr
    still_serves(peer)


def test_kept_results_are_bounded(make_service, local_llama):
    service = make_service(keep=2)
    peer = Peer(service)
    ids = []
    for _ in range(3):
        body = request(local_llama)
        peer.send(frames_of(body))
        assert peer.answer().kind == "result"
        ids.append(body["id"])
    peer.error(frames_of({"id": ids[0], "key": TOKEN}, kind="fetch"), "UnknownRequest")
    for kept in ids[1:]:
        peer.send(frames_of({"id": kept, "key": TOKEN}, kind="fetch"))
        assert peer.answer().kind == "result"


# -- isolation between users --------------------------------------------------------------------
def _run_as(peer: Peer, local_llama, key: str) -> dict:
    body = request(local_llama, key=key)
    peer.send(frames_of(body))
    assert peer.answer(body["id"]).kind == "result"
    return body


def test_results_belong_to_their_key(make_service, local_llama, expected):
    service = make_service(keys=Keys({"alice-key": "alice", "bob-key": "bob"}))
    alice, bob = Peer(service), Peer(service)
    body = _run_as(alice, local_llama, "alice-key")
    (saved,) = body["graph"]["saved"]
    steal = {"id": body["id"], "key": "bob-key"}
    bob.error(frames_of(steal, kind="fetch"), "UnknownRequest")  # not even told it exists
    bob.send(frames_of(steal, kind="ack"))  # an ack of someone else's id drops nothing
    bob.send(frames_of(steal, kind="cancel"))
    # bob replays alice's id with his own graph: it runs his graph, never returns her values
    own = request(local_llama, key="bob-key", build=lambda lm: lm.output.logits.save())
    own["id"] = body["id"]
    bob.send(frames_of(own))
    reply = bob.answer(body["id"])
    assert reply.kind == "result" and list(reply.body["values"]) == own["graph"]["saved"]
    alice.send(frames_of({"id": body["id"], "key": "alice-key"}, kind="fetch"))
    mine = alice.answer(body["id"])
    assert torch.equal(mine.body["values"][saved], expected)


def test_kept_results_are_bounded_per_user(make_service, local_llama):
    service = make_service(keep=2, keys=Keys({"alice-key": "alice", "bob-key": "bob"}))
    alice, bob = Peer(service), Peer(service)
    body = _run_as(alice, local_llama, "alice-key")
    for _ in range(4):  # bob's many requests evict only bob's own results
        _run_as(bob, local_llama, "bob-key")
    alice.send(frames_of({"id": body["id"], "key": "alice-key"}, kind="fetch"))
    assert alice.answer(body["id"]).kind == "result"


def test_uninitialized_memory_never_reaches_a_client(inproc_client, local_llama):
    with local_llama.trace("Hello world", remote=inproc_client):
        local_llama.output.logits.save()  # leaves freed memory behind on the server
    with local_llama.trace("Hello world", remote=inproc_client):
        empty = torch.empty(65536).save()
        like = torch.empty_like(local_llama.output.logits).save()
        new = local_llama.output.logits.new_empty(3, 4096).save()
    for value in (empty, like, new):
        assert not value.any(), "an op handed out memory it did not write"


def test_a_key_may_contain_a_hash(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# operators' keys\nalice:abc#def\n")
    keys = Keys.from_file(path)
    assert keys.name_of("abc#def") == "alice" and keys.name_of("abc") is None


def test_models_does_not_reveal_paths(inproc_client, llama_path):
    (info,) = inproc_client.models()
    assert str(llama_path) not in repr(info)


def test_serve_help_and_options_in_any_order():
    import subprocess
    import sys

    shown = subprocess.run(
        [sys.executable, "-m", "lazytensor", "serve", "--help"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "--max-seconds" in shown.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "lazytensor", "serve", "--port", "0", "--max-nodes", "x", "m"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and "--max-nodes" in wrong.stderr  # parsed by the server


def test_the_batch_limit_counts_the_rows_that_run(make_service, local_llama, still_serves):
    from lazytensor_server.limits import Limits

    peer = Peer(make_service(limits=Limits(max_batch=8)))
    body = request(local_llama, generate={"max_new_tokens": 2, "num_beams": 5})
    peer.error(frames_of(body), "LimitExceeded", "--max-batch")  # 2 prompts x 5 beams
    body = request(local_llama)
    body["batch"]["size"] = 1  # claims 1 row, holds 2
    peer.error(frames_of(body), "ProtocolError", "claims 1 rows")
    still_serves(peer)


def test_inputs_cannot_be_smuggled_past_the_allow_list(make_service, local_llama, still_serves):
    peer = Peer(make_service())
    body = request(local_llama)
    body["batch"]["args"] = [body["batch"]["kwargs"]["input_ids"]] * 2  # (input_ids, labels)
    peer.error(frames_of(body), "OpNotAllowedError", "keyword inputs only")
    body = request(local_llama, build=lambda lm: lm.output.save())
    node = body["graph"]["nodes"][0]
    rewrite = [len(body["graph"]["nodes"]), "set_inputs", "", (((), {"x": True}),), {}, 0, None]
    body["graph"]["nodes"].insert(0, rewrite)
    for i, n in enumerate(body["graph"]["nodes"]):
        n[0] = i
    assert node[1] == "output"
    peer.error(frames_of(body), "OpNotAllowedError", "rewrite the model's own inputs")
    still_serves(peer)


def test_a_huge_header_is_refused_before_it_is_decoded(make_service, still_serves):
    peer = Peer(make_service())
    frames = frames_of({"id": "big", "key": TOKEN, "pad": [[]] * (9 << 20)})  # 9 MiB of arrays
    started = time.monotonic()
    peer.error(frames, "ProtocolError", "max_header_bytes")
    assert time.monotonic() - started < 2.0  # refused by its size, not after unpacking it
    still_serves(peer)


def test_no_work_before_the_key_is_checked(make_service):
    peer = Peer(make_service(keys=Keys({"s3cret": "alice"})))
    pad = [[]] * (7 << 20)  # 7 MiB of empty arrays, just under the header limit
    frames = frames_of({"id": "x", "pad": pad, "key": "wrong"}, kind="models")
    started = time.monotonic()
    peer.error(frames, "PermissionError", "invalid or missing API key")
    assert time.monotonic() - started < 1.0  # refused by the key, the header never built


def test_owners_take_turns():
    from lazytensor_server.scheduler import FairQueue

    class J:
        def __init__(self, owner, n):
            self.owner, self.n = owner, n

    q = FairQueue()
    positions = [q.put(J("greedy", i)) for i in range(5)]
    assert positions == [0, 1, 2, 3, 4]
    assert q.put(J("polite", 0)) == 1  # after at most one of greedy's
    q.close()  # get() hands out what is left, then None
    order = [(job.owner, job.n) for job in iter(q.get, None)]
    assert order == [("greedy", 0), ("polite", 0)] + [("greedy", i) for i in range(1, 5)]


def test_a_keys_weight_is_its_share_of_turns():
    from lazytensor_server.scheduler import FairQueue

    class J:
        def __init__(self, owner, n, weight):
            self.owner, self.n, self.weight = owner, n, weight

    q = FairQueue()
    for i in range(12):
        q.put(J("double", i, 2.0))
        q.put(J("single", i, 1.0))
        q.put(J("half", i, 0.5))
    q.close()
    order = [job.owner for job in iter(q.get, None)][:14]
    # per round of turns: two of double's, one of single's, one of half's every other round
    assert order[:7] == ["double", "double", "single", "double", "double", "single", "half"]
    assert [order.count(o) for o in ("double", "single", "half")] == [8, 4, 2]


def test_the_key_file_weight_reaches_the_job(tmp_path, served_llama, local_llama):
    from lazytensor.protocol.messages import decode_request
    from lazytensor_server.auth import Keys

    path = tmp_path / "keys"
    path.write_text("alice:a-key weight=3\nbob:b-key\n")
    service = Service([served_llama], Keys.from_file(path))
    try:
        run = decode_request(frames_of(request(local_llama, "a-key")))
        assert service._job(run, ("key", "alice"), served_llama, 0).weight == 3.0
        assert service._job(run, ("key", "bob"), served_llama, 0).weight == 1.0
    finally:
        service.shutdown(grace=5.0)


def test_metrics_count_requests_refusals_and_time(make_service, local_llama, still_serves):
    from lazytensor_server.metrics import Metrics

    metrics = Metrics()
    peer = Peer(make_service(metrics=metrics))
    still_serves(peer)
    peer.error(frames_of({"id": "x", "key": TOKEN}, kind="shell"), "ProtocolError")
    text = metrics.text()
    assert 'lazytensor_requests_total{kind="result",outcome="result"}' not in text
    assert 'lazytensor_requests_total{kind="run",outcome="result"} 1.0' in text
    assert 'lazytensor_refused_total{reason="ProtocolError"} 1.0' in text
    assert 'lazytensor_queue_depth{model="llama"} 0.0' in text
    assert 'lazytensor_run_seconds_count{model="llama"} 1.0' in text
    assert 'lazytensor_batch_rows_count{model="llama"} 1.0' in text


def test_queue_positions_are_streamed():
    """Whenever a forward starts, each waiting job whose place moved is told its new one."""
    from types import SimpleNamespace

    from lazytensor_server.scheduler import FairQueue
    from lazytensor_server.worker import Worker

    class J:
        def __init__(self, owner, n):
            self.owner, self.id, self.position = owner, f"{owner}-{n}", None

    told: list = []
    worker = SimpleNamespace(queue=FairQueue(), done=lambda job, msg: told.append(msg))
    for i in range(2):
        for owner in ("a", "b", "c"):
            worker.queue.put(J(owner, i))
    Worker._tell_positions(worker)  # a forward starts: six jobs wait behind it
    assert [(m.id, m.state, m.position) for m in told] == [
        ("a-0", "queued", 1), ("b-0", "queued", 2), ("c-0", "queued", 3),
        ("a-1", "queued", 4), ("b-1", "queued", 5), ("c-1", "queued", 6),
    ]  # fmt: skip
    told.clear()
    worker.queue.get()  # a-0 starts
    Worker._tell_positions(worker)
    assert [(m.id, m.position) for m in told] == [("b-0", 1), ("c-0", 2), ("a-1", 3),
                                                   ("b-1", 4), ("c-1", 5)]  # fmt: skip
    told.clear()
    Worker._tell_positions(worker)  # nothing moved: nothing is said
    assert told == []


def test_results_are_acknowledged_with_the_next_request(make_service, local_llama):
    """A client's small results are forgotten by the server once its next request says it
    received them (no separate ack message); a large result is acknowledged at once."""
    service = make_service()
    client = in_process(service, timeout=30.0)
    sent: list = []
    send = client.transport.send
    client.transport.send = lambda frames: sent.append(wire.decode(frames)) or send(frames)

    def run(build) -> tuple:
        with local_llama.trace(PROMPTS, remote=client, blocking=False) as tracer:
            build(local_llama).save()
        tracer.job.result()
        return ("token", client.token), tracer.job.id

    first = run(lambda lm: lm.output.logits[:, -1, :4])
    assert service.results.get(first) is not None  # received, not yet acknowledged
    second = run(lambda lm: lm.output.logits[:, -1, :4])
    assert sent[-1].kind == "run" and list(sent[-1].body["acks"]) == [first[1]]
    assert service.results.get(first) is None and "ack" not in [s.kind for s in sent]
    large = run(lambda lm: lm.output.logits.repeat(1, 1, 128))  # 2 x T x 128 vocabs: > 1 MiB
    assert sent[-1].kind == "ack"  # sent at once, with the acknowledgement still pending
    assert service.results.get(large) is None and service.results.get(second) is None
