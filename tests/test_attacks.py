"""A hostile user against a real server process: every attack of the shared-server issue.

One ``lazytensor serve`` process on loopback, with API keys and tight limits, takes each
attack from a raw ZeroMQ peer or a client, then must still answer a known-good request from
another user with exactly the values the local model computes (:func:`still_serves`). The
service-level tests (``test_service.py``) cover the same ground in more detail in-process;
these check that what holds in-process holds for the real server, its sockets and its worker
process.
"""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import torch
import zmq

from lazytensor.core.errors import LimitExceeded, RemoteTimeout, UnknownRequest
from lazytensor.core.graph import Ref
from lazytensor.frontend.served import Client
from servers import MODEL, Capture, ServerProcess
from wire import wire

PROMPT = ["Q: cheap\nA:"]
KEYS = {"alice": "alice-key", "bob": "bob-key", "carol": "carol#key"}
KEEP = 8  # --keep-results: finished results kept per user
LIMITS = (
    "--max-seconds", "2",
    "--max-memory", str(64 << 20),
    "--max-saved-bytes", str(4 << 20),
    "--max-request-bytes", str(8 << 20),
    "--max-header-bytes", str(2 << 20),
    "--max-batch", "16",
    "--max-nodes", "5000",
    "--keep-results", str(KEEP),
)  # fmt: skip


@pytest.fixture(scope="module")
def server(llama_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    keys = tmp / "keys.txt"
    keys.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    process = ServerProcess(llama_path, tmp / "server.log", "--api-keys", str(keys), *LIMITS)
    try:
        process.wait_ready(KEYS["alice"])
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def want(local_llama) -> torch.Tensor:
    with local_llama.trace(PROMPT):
        logits = good(local_llama)
    return logits


def good(model):
    model.model.layers[1].mlp.down_proj.input[:, -1, [7]] = 5.0
    return model.output.logits[:, -1].save()


@pytest.fixture
def still_serves(server, local_llama, want):
    """Run the known-good trace as carol (whose key holds a '#') and compare bitwise."""

    def check() -> None:
        client = Client(server.address, KEYS["carol"], timeout=60.0)
        try:
            with local_llama.trace(PROMPT, remote=client):
                logits = good(local_llama)
        finally:
            client.close()
        assert torch.equal(logits, want)

    return check


@pytest.fixture
def client(server):
    made: list[Client] = []

    def make(user: str = "bob") -> Client:
        made.append(Client(server.address, KEYS[user], timeout=60.0))
        return made[-1]

    yield make
    for one in made:
        one.close()


class Raw:
    """A raw DEALER peer: sends any frames, reads the server's replies."""

    def __init__(self, address: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def send(self, frames: list) -> None:
        self.socket.send_multipart(frames)

    def reply(self, request_id: str | None = None, timeout: float = 30.0) -> wire.Message:
        """The next reply that is not a status (for ``request_id`` if given)."""
        end = time.monotonic() + timeout
        while self.socket.poll(max(0, int((end - time.monotonic()) * 1000))):
            message = wire.decode(self.socket.recv_multipart())
            if message.kind != "status" and request_id in (None, message.body.get("id")):
                return message
        raise TimeoutError("no reply from the server")

    def error(self, frames: list, type_name: str, *fragments: str) -> dict:
        self.send(frames)
        reply = self.reply()
        assert reply.kind == "error", reply.body
        assert reply.body["type"] == type_name, reply.body
        for fragment in fragments:
            assert fragment in reply.body["message"], reply.body["message"]
        return reply.body

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def raw(server):
    peers: list[Raw] = []

    def make() -> Raw:
        peers.append(Raw(server.address))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


def body_of(model, user: str = "bob", build=good, **options) -> dict:
    """The request body a client of ``user`` sends for the trace ``build(model)``."""
    capture = Capture()
    sender = Client("capture", KEYS[user], transport=capture)
    with model.trace(PROMPT, remote=sender, blocking=False, **options):
        build(model)
    return wire.decode(capture.sent[-1]).body


def frames_of(body: dict, kind: str = "run") -> list[bytes]:
    return [bytes(f) for f in wire.encode(kind, body)]


# -- 1. isolation ------------------------------------------------------------------------------
def test_memory_another_user_freed_never_reaches_a_client(client, local_llama, still_serves):
    with local_llama.trace(PROMPT, remote=client("alice")):
        local_llama.output.logits.save()  # leaves freed memory behind in the worker
    with local_llama.trace(PROMPT, remote=client("bob")):
        empty = torch.empty(65536).save()
        like = torch.empty_like(local_llama.output.logits).save()
        new = local_llama.output.logits.new_empty(3, 4096).save()
    for value in (empty, like, new):
        assert not value.any(), "an op handed out memory it did not write"
    still_serves()


def test_results_belong_to_their_owner(raw, local_llama, want, still_serves):
    alice, bob = raw(), raw()
    body = body_of(local_llama, "alice")
    alice.send(frames_of(body))
    mine = alice.reply(body["id"])
    assert mine.kind == "result"
    for kind in ("fetch", "ack", "cancel"):  # bob names alice's id
        bob.send(frames_of({"id": body["id"], "key": KEYS["bob"]}, kind))
    fetched = bob.reply(body["id"])
    assert fetched.kind == "error" and fetched.body["type"] == UnknownRequest.__name__
    replay = body_of(local_llama, "bob", build=lambda lm: lm.model.layers[0].output[0].save())
    replay["id"] = body["id"]  # bob replays alice's id with his own graph: he runs his own
    bob.send(frames_of(replay))
    (value,) = bob.reply(body["id"]).body["values"].values()
    with local_llama.trace(PROMPT):
        hidden = local_llama.model.layers[0].output[0].save()
    assert torch.equal(value, hidden)
    alice.send(frames_of({"id": body["id"], "key": KEYS["alice"]}, "fetch"))  # still hers
    (kept,) = alice.reply(body["id"]).body["values"].values()
    assert torch.equal(kept, want)
    still_serves()


def test_one_users_many_results_never_evict_anothers(raw, local_llama, want, still_serves):
    alice, bob = raw(), raw()
    body = body_of(local_llama, "alice")
    alice.send(frames_of(body))
    assert alice.reply(body["id"]).kind == "result"
    ids = []
    for _ in range(KEEP + 4):
        flood = body_of(local_llama, "bob", build=lambda lm: lm.output.logits[:, -1, :4].save())
        bob.send(frames_of(flood))
        ids.append(flood["id"])
    for request_id in ids:
        assert bob.reply(request_id).kind == "result"
    alice.send(frames_of({"id": body["id"], "key": KEYS["alice"]}, "fetch"))
    (kept,) = alice.reply(body["id"]).body["values"].values()
    assert torch.equal(kept, want)
    bob.send(frames_of({"id": ids[0], "key": KEYS["bob"]}, "fetch"))  # bob's oldest: evicted
    assert bob.reply(ids[0]).body["type"] == UnknownRequest.__name__
    still_serves()


# -- 2. no request stalls the server ---------------------------------------------------------
def test_an_op_that_never_returns_is_refused(client, local_llama, still_serves):
    with pytest.raises(LimitExceeded):
        with local_llama.trace(PROMPT, remote=client()):
            local_llama.output.logits  # noqa: B018
            torch.nn.functional.max_pool1d(torch.ones(2, 3), 2**62).save()
    still_serves()


def test_python_integer_arithmetic_is_bounded(raw, local_llama, still_serves):
    import operator

    body = body_of(local_llama, build=lambda lm: lm.output.logits[:, -1, :2].save())
    nodes = body["graph"]["nodes"]
    nodes.append([len(nodes), "function", "operator.pow", (3, 2 * 10**7), {}, 0, None])
    body["graph"]["saved"].append(len(nodes) - 1)
    started = time.monotonic()
    raw().error(frames_of(body), "LimitExceeded")
    assert time.monotonic() - started < 2.0
    assert operator.pow(3, 5) == 243  # the op itself is allowed, its size is not
    still_serves()


def test_a_long_op_is_stopped_at_the_time_limit(client, local_llama, still_serves):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="--max-seconds"):
        with local_llama.trace(PROMPT, remote=client()):
            local_llama.output.logits  # noqa: B018
            big = torch.ones(2048, 2048)  # 16 MiB: within --max-memory
            for _ in range(60):  # a teraflop: seconds on any CPU
                big = big @ big
            big.sum().save()
    assert time.monotonic() - started < 2 + 1 + 8  # the limit, the kill's slack, a restart
    still_serves()


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.ones(2**28),
        lambda: torch.ones(1, 1).expand(2**14, 2**14).contiguous(),
        lambda: torch.ones(2**10).repeat(2**18),
        lambda: torch.arange(2**28),
    ],
    ids=["ones", "expand-contiguous", "repeat", "arange"],
)
def test_a_request_over_the_memory_limit_is_refused_before_it_allocates(
    make, client, local_llama, still_serves
):
    with pytest.raises(LimitExceeded, match="--max-memory"):
        with local_llama.trace(PROMPT, remote=client()):
            local_llama.output.logits  # noqa: B018
            make().sum().save()
    still_serves()


def test_huge_python_values_are_refused(raw, local_llama, still_serves):
    peer = raw()
    for target, args in (("operator.lshift", (1, 2**32)), ("operator.mul", ("a", 2**29))):
        body = body_of(local_llama, build=lambda lm: lm.output.logits[:, -1, :2].save())
        nodes = body["graph"]["nodes"]
        nodes.append([len(nodes), "function", target, args, {}, 0, None])
        body["graph"]["saved"].append(len(nodes) - 1)
        peer.error(frames_of(body), "LimitExceeded")
    still_serves()


def test_a_heavy_header_does_not_stall_other_users(raw, server, still_serves):
    pad = [[]] * (1 << 20)  # a million empty arrays, under --max-header-bytes
    frames = frames_of({"id": "heavy", "key": KEYS["bob"], "pad": pad}, kind="models")
    attacker = raw()
    attacker.send(frames)
    started = time.monotonic()
    still_serves()  # served meanwhile, not after the attacker's header
    assert time.monotonic() - started < 5.0
    attacker.reply(timeout=30)  # it is answered too, whatever it gets


def test_no_work_is_done_before_the_key_is_checked(raw, still_serves):
    pad = [[]] * (1 << 20)
    frames = frames_of({"id": "x", "pad": pad, "key": "wrong"}, kind="models")
    started = time.monotonic()
    raw().error(frames, "PermissionError", "invalid or missing API key")
    assert time.monotonic() - started < 1.0
    still_serves()


def test_a_graph_over_the_node_limit_is_refused(raw, local_llama, still_serves):
    def many(lm):
        h = lm.output.logits[:, -1, :2]
        for _ in range(2600):  # two nodes each: over --max-nodes 5000
            h = h * 1.0 + 0.0
        h.save()

    raw().error(frames_of(body_of(local_llama, build=many)), "LimitExceeded", "--max-nodes")
    still_serves()


def test_an_oversized_message_is_dropped_before_it_is_buffered(raw, still_serves):
    attacker = raw()
    attacker.send([b"LZT\x01", msgpack.packb({"kind": "models"}), bytes(16 << 20)])  # 16 MiB
    still_serves()
    assert not attacker.socket.poll(500)  # the peer was dropped, not answered


def test_the_batch_limit_counts_the_rows_that_run(raw, client, local_llama, still_serves):
    body = body_of(local_llama)
    body["batch"]["size"] = 1
    body["batch"]["kwargs"]["input_ids"] = body["batch"]["kwargs"]["input_ids"].repeat(64, 1)
    raw().error(frames_of(body), "ProtocolError", "claims 1 rows")
    with pytest.raises(LimitExceeded, match="--max-batch"):
        with local_llama.generate(PROMPT, remote=client(), max_new_tokens=2, num_beams=32):
            local_llama.output.save()
    still_serves()


# -- 3. smaller holes --------------------------------------------------------------------------
def test_a_key_with_a_hash_is_whole(raw, local_llama, still_serves):
    body = body_of(local_llama, "carol")
    body["key"] = "carol"  # the part before '#' is not a key
    raw().error(frames_of(body), "PermissionError", "invalid or missing API key")
    still_serves()  # as carol, with her whole key


def test_request_ids_cannot_forge_or_flood_the_log(raw, server, local_llama, still_serves):
    peer = raw()
    for request_id in ("a\nforged 2026 lazytensor.server request done", "x" * (1 << 20)):
        body = body_of(local_llama)
        body["id"] = request_id
        peer.send(frames_of(body))
        peer.reply(timeout=30)
    still_serves()
    log = server.log()
    assert "\nforged" not in log and "x" * 1024 not in log


def test_inputs_cannot_be_smuggled_past_the_allow_list(raw, local_llama, still_serves):
    peer = raw()
    body = body_of(local_llama)
    body["batch"]["args"] = [body["batch"]["kwargs"]["input_ids"]] * 2  # (input_ids, labels)
    peer.error(frames_of(body), "OpNotAllowedError", "keyword inputs only")
    body = body_of(local_llama)
    body["batch"]["kwargs"]["output_hidden_states"] = True
    peer.error(frames_of(body), "OpNotAllowedError", "output_hidden_states")
    still_serves()


def test_models_reveals_no_path_on_disk(client, llama_path, still_serves):
    (info,) = client().models()
    assert info["name"] == MODEL and str(llama_path) not in repr(info)
    still_serves()


def test_many_users_at_once_each_get_their_own_results(server, local_llama, still_serves):
    def trace(lm, neuron):
        lm.model.layers[1].mlp.down_proj.input[:, -1, [neuron]] = 5.0
        return lm.output.logits[:, -1].save()

    wants = {}
    for neuron in range(6):
        with local_llama.trace(PROMPT):
            wants[neuron] = trace(local_llama, neuron)
    got, failures = {}, []

    def user(neuron: int) -> None:
        one = Client(server.address, KEYS["bob" if neuron % 2 else "alice"], timeout=60.0)
        try:
            for _ in range(3):
                with local_llama.trace(PROMPT, remote=one):
                    got[neuron] = trace(local_llama, neuron)
                assert torch.equal(got[neuron], wants[neuron])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            one.close()

    threads = [threading.Thread(target=user, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    still_serves()


def test_a_stop_in_a_sessions_own_code_is_answered_and_harmless(raw, local_llama, still_serves):
    """A session whose code between traces holds a ``stop`` node (no client records one
    there): the executor's internal stop ends that code, and must never escape to the
    server's worker as the BaseException it is; the reply names what never ran."""
    capture = Capture()
    sender = Client("capture", KEYS["bob"], transport=capture, timeout=0.2)
    with pytest.raises(RemoteTimeout):  # nothing answers the capture: the request is kept
        with local_llama.session(remote=sender):
            with local_llama.trace(PROMPT):
                h = local_llama.model.layers[0].output.save()
            (h * 2).save()
    body = wire.decode(capture.sent[-1]).body
    code = body["segments"][1]["graph"]  # the session's own code: a carry, then h * 2
    code["nodes"].insert(1, [1, "stop", "", (Ref(0),), {}, 0, None])
    code["nodes"][2][0] = 2
    code["nodes"][2][3] = (Ref(0), 2)
    code["saved"] = [2]
    peer = raw()
    peer.send(frames_of(body))
    reply = peer.reply(body["id"])
    assert reply.kind == "error", reply.body
    assert "never ran" in reply.body["message"], reply.body
    still_serves()
