"""Tests for lazytensor/protocol/messages.py: every message kind, round trips and bad fields.

Each message is encoded to frames and decoded back with :func:`decode_request` or
:func:`decode_reply`; bad bodies are built by hand with :func:`codec.encode`, so they say what a
hostile or broken peer could.
"""

from __future__ import annotations

import pytest
import torch

from lazytensor.core import errors
from lazytensor.core.errors import (
    GraphError,
    LimitExceeded,
    NodeFailure,
    ProtocolError,
    RemoteError,
    RemoteOutOfMemory,
    RemoteTimeout,
    UnknownRequest,
)
from lazytensor.core.graph import EVERY_CALL, Batch, Graph, Ref
from lazytensor.protocol import codec
from lazytensor.protocol import messages as m


def graph() -> Graph:
    g = Graph()
    h = g.add("output", "layer1", call=EVERY_CALL, rows=(0, 2))
    scaled = g.add("function", "torch.mul", (Ref(h.id), g.constant(torch.full((2,), 3.0))))
    g.add("set_output", "layer1", (Ref(scaled.id),), {"k": (1, slice(None, 2))})
    g.save(scaled.id)
    return g


def batch() -> Batch:
    return Batch((torch.arange(6.0).reshape(2, 3),), {"attention_mask": torch.ones(2, 3)}, 2)


def run(**changes) -> m.Run:
    fields = dict(
        id="job-1", key="secret", model="tiny", graph=graph(), batch=batch(), stop_at=1, fake=True
    )
    return m.Run(**{**fields, **changes})


def assert_same_run(got: m.Run, want: m.Run) -> None:
    assert type(got) is m.Run
    assert (got.id, got.key, got.model, got.stop_at, got.fake) == (
        want.id,
        want.key,
        want.model,
        want.stop_at,
        want.fake,
    )
    assert got.graph.nodes == want.graph.nodes and got.graph.saved == want.graph.saved
    for a, b in zip(got.graph.constants, want.graph.constants, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (got.batch.size, got.batch.generate) == (want.batch.size, want.batch.generate)
    torch.testing.assert_close(got.batch.args[0], want.batch.args[0], rtol=0, atol=0)
    assert list(got.batch.kwargs) == list(want.batch.kwargs)


def frames(kind: str, **body) -> list:
    return codec.encode(kind, body)


def run_body(**changes) -> list:
    """The frames of :func:`run` with some body fields changed."""
    body = codec.decode(m.encode(run())).body
    return codec.encode("run", {**body, **changes})


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        m.ListModels("a1", None),
        m.ListModels(None, "key"),
        m.Describe("a2", "key", "llama"),
        m.Ack("a3", None),
        m.Cancel("a4", "key"),
        m.Fetch("a5", None),
    ],
    ids=["models", "models-no-id", "describe", "ack", "cancel", "fetch"],
)
def test_requests_round_trip(message: m.Request) -> None:
    got = m.decode_request(m.encode(message))
    assert got == message and type(got) is type(message)


def test_a_run_round_trips() -> None:
    want = run()
    assert_same_run(m.decode_request(m.encode(want)), want)
    plain = run(key=None, stop_at=None, fake=False, batch=Batch((), {}, 0, True))
    got = m.decode_request(m.encode(plain))
    assert got.stop_at is None and got.fake is False and got.batch.generate is True


def test_a_fetch_carries_its_run_under_its_own_id() -> None:
    got = m.decode_request(m.encode(m.Fetch("job-1", "secret", run())))
    assert type(got) is m.Fetch and got.id == "job-1"
    assert_same_run(got.request, run())


@pytest.mark.parametrize(
    "message",
    [
        m.Status("a", "received"),
        m.Status("a", "queued", 3),
        m.ModelList("a", [{"name": "tiny", "parameters": 10}]),
        m.Description("a", "tiny", {"cls": "MLP", "children": {}}, {"json": "{}"}),
        m.Failure("a", {"type": "IndexError", "message": "out of range", "node": 2, "hint": ""}),
        m.Failure(None, {"type": "ProtocolError", "message": "bad frames"}),
    ],
    ids=["status", "queued", "models", "description", "failure", "failure-no-id"],
)
def test_replies_round_trip(message: m.Message) -> None:
    got = m.decode_reply(m.encode(message))
    assert got == message and type(got) is type(message)


def test_a_result_round_trips_its_values() -> None:
    values = {0: torch.ones(2, 3), 4: (1, "x", None), 7: {"k": [torch.zeros(1)]}}
    got = m.decode_reply(m.encode(m.Result("a", values)))
    assert type(got) is m.Result and got.id == "a" and list(got.values) == [0, 4, 7]
    torch.testing.assert_close(got.values[0], values[0], rtol=0, atol=0)
    assert got.values[4] == (1, "x", None)
    torch.testing.assert_close(got.values[7]["k"][0], torch.zeros(1), rtol=0, atol=0)


def test_requests_and_replies_are_decoded_by_their_own_side() -> None:
    assert type(m.decode_request(m.encode(m.ListModels("a")))) is m.ListModels
    assert type(m.decode_reply(m.encode(m.ModelList("a", [])))) is m.ModelList  # same kind
    with pytest.raises(ProtocolError, match="unknown request kind 'status'"):
        m.decode_request(m.encode(m.Status("a", "queued")))
    with pytest.raises(ProtocolError, match="unknown reply kind 'run'"):
        m.decode_reply(m.encode(run()))


# -- malformed fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id",
    [5, 1.5, True, ["a"], {"a": 1}, "", "x" * (m.MAX_ID_LENGTH + 1), "a\nb", "tab\there", "\x00"],
    ids=["int", "float", "bool", "list", "dict", "empty", "long", "newline", "tab", "nul"],
)
@pytest.mark.parametrize("kind", ["models", "describe", "ack", "cancel", "fetch", "run"])
def test_bad_request_ids_are_protocol_errors(kind: str, request_id) -> None:
    if kind == "run":
        bad = run_body(id=request_id)
    else:
        bad = frames(kind, id=request_id)
    with pytest.raises(ProtocolError, match="request id"):
        m.decode_request(bad)


def test_the_longest_printable_id_is_accepted() -> None:
    longest = "é" * m.MAX_ID_LENGTH
    assert m.decode_request(frames("ack", id=longest)).id == longest


@pytest.mark.parametrize("key", [5, ["k"], b"k"], ids=["int", "list", "bytes"])
def test_a_bad_api_key_is_a_protocol_error(key) -> None:
    with pytest.raises(ProtocolError, match="API key"):
        m.decode_request(frames("models", id="a", key=key))


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"args": {}, "kwargs": {}, "size": 1},
        {"args": [], "kwargs": [], "size": 1},
        {"args": [], "kwargs": {}, "size": "1"},
        {"args": [], "kwargs": {}, "size": True},
        {"args": [], "kwargs": {}, "size": -1},
        {"args": [], "kwargs": {1: 2}, "size": 1},
        {"args": [], "kwargs": {}, "size": 1, "generate": 1},
    ],
    ids=[
        "none",
        "list",
        "args",
        "kwargs",
        "size-str",
        "size-bool",
        "size-negative",
        "kwarg-name",
        "generate",
    ],
)
def test_a_bad_batch_is_a_protocol_error(bad) -> None:
    with pytest.raises(ProtocolError, match="batch"):
        m.decode_request(run_body(batch=bad))


@pytest.mark.parametrize(
    "stop_at", [-1, 3, 99, "1", 1.0, True, [1]], ids=["neg", "len", "far", "str", "f", "b", "l"]
)
def test_a_stop_at_that_names_no_node_is_a_protocol_error(stop_at) -> None:
    with pytest.raises(ProtocolError, match="stop_at"):
        m.decode_request(run_body(stop_at=stop_at))


@pytest.mark.parametrize(
    "changes",
    [{"model": 5}, {"model": None}, {"fake": 1}, {"fake": "yes"}],
    ids=["model-int", "model-none", "fake-int", "fake-str"],
)
def test_a_bad_model_or_fake_flag_is_a_protocol_error(changes) -> None:
    with pytest.raises(ProtocolError, match="model or fake flag"):
        m.decode_request(run_body(**changes))


def test_a_run_without_a_graph_or_batch_is_a_protocol_error() -> None:
    body = codec.decode(m.encode(run())).body
    for missing in ("graph", "batch"):
        partial = {k: v for k, v in body.items() if k != missing}
        with pytest.raises(ProtocolError):
            m.decode_request(codec.encode("run", partial))


def test_a_fetch_with_a_malformed_run_is_a_protocol_error() -> None:
    body = codec.decode(m.encode(run())).body
    with pytest.raises(ProtocolError, match="stop_at"):
        m.decode_request(frames("fetch", id="a", request={**body, "stop_at": 50}))


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        ("describe", {"id": "a", "model": 5}, "'model' of a 'describe'"),
        ("status", {"id": 5, "state": "queued"}, "id of a 'status'"),
        ("status", {"id": "a", "state": ["queued"]}, "'state' of a 'status'"),
        ("status", {"id": "a", "state": "queued", "position": "1"}, "queue position"),
        ("status", {"id": "a", "state": "queued", "position": 1.0}, "queue position"),
        ("models", {"id": "a", "models": {"name": "x"}}, "'models' of a 'models'"),
        ("description", {"id": "a", "model": "x", "tree": []}, "'tree' of a 'description'"),
        ("description", {"id": "a", "tokenizer": "x"}, "'tokenizer' of a 'description'"),
        ("result", {"id": "a", "values": [1]}, "result's values"),
        ("result", {"id": "a", "values": {"0": 1}}, "result's values"),
        ("result", {"id": ["a"], "values": {}}, "id of a 'result'"),
        ("error", {"id": 7, "type": "ValueError"}, "id of a 'error'"),
    ],
    ids=[
        "describe-model",
        "status-id",
        "status-state",
        "status-position",
        "status-position-float",
        "models-list",
        "description-tree",
        "description-tokenizer",
        "result-values",
        "result-keys",
        "result-id",
        "error-id",
    ],
)
def test_bad_fields_are_protocol_errors(kind: str, body: dict, match: str) -> None:
    decode = m.decode_request if kind == "describe" else m.decode_reply
    with pytest.raises(ProtocolError, match=match):
        decode(frames(kind, **body))


def test_missing_fields_take_their_defaults() -> None:
    assert m.decode_reply(frames("models", id="a")) == m.ModelList("a", [])
    assert m.decode_reply(frames("description")) == m.Description(None, "", {}, {})
    assert m.decode_reply(frames("status", id="a")) == m.Status("a", "", None)
    assert m.decode_request(frames("describe", id="a")) == m.Describe("a", None, "")


def test_unknown_kinds_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="unknown request kind 'shutdown'"):
        m.decode_request(frames("shutdown", id="a"))
    with pytest.raises(ProtocolError, match="unknown reply kind 'shutdown'"):
        m.decode_reply(frames("shutdown", id="a"))


# -- failures as exceptions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "cls", "also"),
    [
        (TimeoutError("slow"), RemoteTimeout, TimeoutError),
        (RemoteTimeout("slow"), RemoteTimeout, TimeoutError),
        (MemoryError("full"), RemoteOutOfMemory, MemoryError),
        (LimitExceeded("too big"), LimitExceeded, RemoteError),
        (UnknownRequest("who?"), UnknownRequest, KeyError),
        (IndexError("out of range"), IndexError, IndexError),
        (PermissionError("bad key"), PermissionError, OSError),
        (ProtocolError("bad frames"), ProtocolError, errors.LazytensorError),
        (OSError("disk"), RemoteError, errors.LazytensorError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_failure_exception_maps_to_the_clients_types(raised, cls, also) -> None:
    reply = m.decode_reply(m.encode(m.Failure.of("a", raised)))
    exc = reply.exception()
    assert type(exc) is cls and isinstance(exc, also)
    assert str(raised) in str(exc)


def test_a_failure_naming_a_node_is_a_node_failure() -> None:
    failure = NodeFailure(3, IndexError("index 9 is out of bounds"), "check the index")
    reply = m.decode_reply(m.encode(m.Failure.of("a", failure)))
    assert reply.error["node"] == 3
    exc = reply.exception()
    assert type(exc) is NodeFailure and exc.node == 3 and exc.hint == "check the index"
    assert type(exc.error) is IndexError and "index 9" in str(exc.error)


def test_a_node_failure_of_a_memory_error_keeps_its_meaning() -> None:
    failure = NodeFailure(1, MemoryError("no room"))
    exc = m.decode_reply(m.encode(m.Failure.of("a", failure))).exception()
    assert type(exc) is NodeFailure and type(exc.error) is RemoteOutOfMemory


@pytest.mark.parametrize(
    "error",
    [{}, {"type": "SystemExit", "message": "bye"}, {"type": 5}, {"node": "3", "type": "KeyError"}],
    ids=["empty", "unlisted-type", "bad-type", "bad-node"],
)
def test_odd_failures_still_become_exceptions(error) -> None:
    exc = m.decode_reply(m.encode(m.Failure("a", error))).exception()
    assert isinstance(exc, Exception) and not isinstance(exc, NodeFailure)
    assert type(exc) in (RemoteError, KeyError)
    assert str(exc)


def test_graph_errors_keep_their_type() -> None:
    exc = m.Failure.of("a", GraphError("never ran")).exception()
    assert type(exc) is GraphError and str(exc) == "never ran"


def test_a_request_may_acknowledge_earlier_results():
    run = m.Run("b", "key", "llama", acks=("a", "c"))
    assert m.decode_request(m.encode(run)).acks == ("a", "c")
    assert "acks" not in m.Run("b", "key", "llama").body()  # sent only when there are any
    for acks in (("x\n",), tuple(str(i) for i in range(m.MAX_ACKS + 1)), "abc"):
        body = {**m.Run("b", "key", "llama").body(), "acks": acks}
        with pytest.raises(ProtocolError):
            m.Run.from_body(body)
