"""Wire round trips and bad input: every value and dtype survives, every malformed frame fails."""

from __future__ import annotations

import collections
import math
import pickle
from collections import OrderedDict

import msgpack
import pytest
import torch
import zmq

from lazytensor.core.errors import ProtocolError
from lazytensor.core.graph import EVERY_CALL, Const, Graph, Ref
from lazytensor.protocol.codec import Limits, Message, decode, encode
from lazytensor.protocol.messages import decode_graph, encode_graph
from lazytensor.protocol.values import MAGIC, PROTOCOL_VERSION, Record
from wire import wire


def roundtrip(value, **kwargs):
    return decode(encode("run", {"v": value}, **kwargs)).body["v"]


def raw_message(body, tensors=(), frames=(), kind="run", version=PROTOCOL_VERSION):
    """Frames built by hand, so a test can say anything a hostile peer could."""
    header = msgpack.packb({"kind": kind, "body": body, "tensors": list(tensors)})
    return [MAGIC + bytes([version]), header, *frames]


def ext(code, payload):
    return msgpack.ExtType(code, msgpack.packb(payload))


def as_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same_tensor(got, want):
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert as_bytes(got) == as_bytes(want)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        math.inf,
        "text ü",
        b"\x00\xffbytes",
        [1, "a", None],
        {"a": 1, 2: "b"},
        (),
        (1, (2, 3), [4]),
        slice(None),
        slice(1, -1, 2),
        slice(Ref(3), None, Ref(4)),
        Ellipsis,
        Ref(7),
        Const(2),
        torch.float32,
        torch.bfloat16,
        torch.device("cpu"),
        torch.device("cuda", 3),
        torch.Size([2, 0, 5]),
        torch.Size([]),
    ],
    ids=repr,
)
def test_value_round_trips(value):
    got = roundtrip(value)
    assert got == value
    assert type(got) is type(value)


def test_nan_round_trips():
    assert math.isnan(roundtrip(math.nan))


def test_nested_structures_keep_their_types():
    value = {"a": [(1, {"b": (slice(0, Ref(1)), ...)})], 3: {"c": [torch.Size([1]), None]}}
    assert roundtrip(value) == value
    inner = roundtrip(value)["a"][0]
    assert type(inner) is tuple and type(inner[1]["b"][0]) is slice


def test_message_fields():
    message = decode(encode("status", {}))
    assert message == Message("status", {}, PROTOCOL_VERSION)
    with pytest.raises(AttributeError):
        message.kind = "other"


@pytest.mark.parametrize("name", sorted(wire.DTYPES))
def test_every_dtype_round_trips_bit_exact(name):
    dtype = wire.DTYPES[name]
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (3 * 4 * dtype.itemsize,), dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    tensor = raw.view(dtype).reshape(3, 4)  # (3, 4), arbitrary bit patterns incl. NaNs
    assert_same_tensor(roundtrip(tensor), tensor)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(3.5),
        torch.tensor(7, dtype=torch.int16),
        torch.empty(0),
        torch.empty(2, 0, 3, dtype=torch.bfloat16),
        torch.arange(12.0).reshape(3, 4).T,  # (4, 3), non-contiguous
        torch.arange(20).reshape(4, 5)[1:3, ::2],  # (2, 3), offset and strided
        torch.tensor([1 + 2j, 3 - 4j]).conj(),  # lazy conjugate bit
        torch.ones(2, 2, requires_grad=True),
        torch.nn.Parameter(torch.ones(3)),
    ],
    ids=["0d-float", "0d-int16", "empty", "empty-bf16", "transposed", "strided", "conj", "grad",
         "parameter"],
)  # fmt: skip
def test_tensor_shapes_and_layouts_round_trip(tensor):
    got = roundtrip(tensor)
    assert torch.equal(got, tensor.detach().resolve_conj())
    assert got.is_contiguous() and not got.requires_grad and not got.is_conj()


def test_decoded_tensor_is_writable_and_owns_its_memory():
    source = torch.arange(4, dtype=torch.float32)
    frames = [bytes(f) for f in encode("run", {"t": source})]  # read-only frames
    got = decode(frames).body["t"]
    got.add_(1)
    assert got.tolist() == [1.0, 2.0, 3.0, 4.0]

    mutable = [bytearray(f) for f in frames]
    got = decode(mutable).body["t"]
    mutable[2][:] = bytes(len(mutable[2]))
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_tensor_sent_twice_travels_once():
    tensor = torch.ones(3)
    frames = encode("run", {"a": tensor, "b": [tensor]})
    assert len(frames) == 3
    body = decode(frames).body
    assert body["a"] is body["b"][0]


def test_encode_does_not_copy_tensor_memory():
    tensor = torch.zeros(1 << 22)  # 16 MiB
    frames = encode("run", {"t": tensor})
    frame = frames[2]
    assert isinstance(frame, memoryview) and frame.readonly
    assert frame.nbytes == tensor.nbytes
    assert frame.obj.__array_interface__["data"][0] == tensor.data_ptr()
    tensor[0] = 1.0  # the frame sees the change: it is the tensor's memory
    assert bytes(frame[:4]) == as_bytes(torch.tensor([1.0]))


def test_zmq_frames_round_trip_over_a_socket():
    tensor = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        receiver.bind("inproc://wire-test")
        sender.connect("inproc://wire-test")
        sender.send_multipart(encode("run", {"t": tensor, "i": (0, ...)}), copy=False)
        frames = receiver.recv_multipart(copy=False)
        assert all(isinstance(f, zmq.Frame) for f in frames)
        body = decode(frames).body
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
        context.term()
    assert torch.equal(body["t"], tensor) and body["i"] == (0, ...)


class Received:
    """Shaped like a received ``zmq.Frame``: its bytes are a writable ``.buffer``."""

    def __init__(self, data: bytearray, offset: int = 0) -> None:
        self.buffer = memoryview(data)[offset:]


def address(buffer) -> int:
    return torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()


def test_a_received_frame_is_adopted_and_an_unaligned_one_copied():
    tensor = torch.arange(6, dtype=torch.float64)
    version, header, data = encode("result", {"t": tensor})
    aligned = Received(bytearray(data))
    got = decode([version, header, aligned]).body["t"]
    assert got.data_ptr() == address(aligned.buffer)  # no copy: the tensor is the frame
    assert torch.equal(got, tensor)

    unaligned = Received(bytearray(1) + bytearray(data), offset=1)
    assert address(unaligned.buffer) % 8
    got = decode([version, header, unaligned]).body["t"]
    assert got.data_ptr() != address(unaligned.buffer) and got.data_ptr() % 8 == 0
    assert torch.equal(got, tensor)


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()), ids=str)
def test_a_copied_tensor_is_aligned_to_its_elements(dtype):
    tensor = torch.zeros(3, 5, dtype=dtype)
    got = decode([bytes(f) for f in encode("result", {"t": tensor})]).body["t"]
    assert got.dtype == dtype and got.shape == (3, 5)
    assert got.data_ptr() % min(dtype.itemsize, 16) == 0 and got.is_contiguous()


@pytest.mark.parametrize(
    ("value", "fits"),
    [
        ([[[]]], True),
        ([[[1]]], False),
        ([[{}]], True),
        ([[{"x": 1}]], False),
        ({"a": {"b": 1}}, True),
        ({"a": {"b": {"c": 1}}}, False),
        ((1,), True),
        (((1,),), True),
        ((((1,),),), False),
    ],
    ids=repr,
)
def test_the_depth_limit_counts_every_level_including_plain_leaves(value, fits):
    limits = Limits(max_depth=3)  # body 0, "v" 1: a leaf at depth 4 is one too deep
    if fits:
        assert decode(encode("run", {"v": value}, limits=limits), limits=limits).body["v"] == value
        return
    with pytest.raises(ValueError, match="max_depth"):
        encode("run", {"v": value}, limits=limits)
    with pytest.raises(ProtocolError, match="max_depth"):
        decode(encode("run", {"v": value}), limits=limits)


# --- records ---------------------------------------------------------------------------------


def test_record_access():
    logits = torch.ones(2)
    rec = Record("CausalLMOutput", {"loss": None, "logits": logits, "hidden": (1, 2)})
    assert rec.logits is logits and rec["logits"] is logits and rec.loss is None
    assert rec[0] is logits and rec[1] == (1, 2) and rec[-1] == (1, 2)
    assert rec[:1] == (logits,) and rec.to_tuple() == (logits, (1, 2))
    assert rec.cls_name == "CausalLMOutput" and list(rec) == ["loss", "logits", "hidden"]
    with pytest.raises(AttributeError, match="'missing'.*loss"):
        _ = rec.missing
    with pytest.raises(KeyError):
        rec["missing"]


def test_record_round_trips_with_tensors():
    rec = Record("Output", {"logits": torch.arange(3.0), "past": (torch.ones(1),), "x": None})
    got = roundtrip(rec)
    assert isinstance(got, Record) and got.cls_name == "Output"
    assert list(got) == ["logits", "past", "x"] and got.x is None
    assert torch.equal(got.logits, rec.logits) and torch.equal(got[1][0], torch.ones(1))


class FakeModelOutput(OrderedDict):
    """Shaped like Hugging Face's ModelOutput: an OrderedDict with ``to_tuple``."""

    def to_tuple(self):
        return tuple(self.values())


class TupleLike:
    """Not a Mapping, but has ``keys``, ``to_tuple`` and string indexing."""

    def keys(self):
        return ["a"]

    def to_tuple(self):
        return (1,)

    def __getitem__(self, key):
        return {"a": 1}[key]


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (FakeModelOutput(logits=torch.zeros(1), loss=None), "FakeModelOutput"),
        (OrderedDict(a=1), "OrderedDict"),
        (TupleLike(), "TupleLike"),
    ],
)
def test_mappings_and_model_outputs_travel_as_records(value, name):
    got = roundtrip(value)
    assert isinstance(got, Record) and got.cls_name == name
    assert list(got) == list(value.keys())


# --- graphs ----------------------------------------------------------------------------------


def sample_graph() -> Graph:
    graph = Graph()
    steer = graph.constant(torch.randn(4))
    graph.add("output", "model.layers.0", call=2, rows=(0, 3))
    graph.add("method", "__getitem__", (Ref(0), (slice(None), slice(Ref(0), None), ...)))
    graph.add("function", "torch.add", (Ref(1), steer), {"alpha": 0.5, "dtype": torch.float32})
    graph.add("set_output", "model.layers.0", (Ref(2),), call=EVERY_CALL)
    graph.add("getattr", "shape", (Ref(0),))
    graph.add("result", "")
    graph.save(2)
    graph.save(4)
    return graph


def send_graph(data):
    return decode(encode("run", {"graph": data})).body["graph"]


def test_graph_round_trips_node_by_node():
    graph = sample_graph()
    got = decode_graph(send_graph(encode_graph(graph)))
    assert len(got.nodes) == len(graph.nodes)
    for mine, theirs in zip(graph.nodes, got.nodes, strict=True):
        assert theirs.id == mine.id and theirs.op == mine.op and theirs.target == mine.target
        assert theirs.args == mine.args and type(theirs.args) is tuple
        assert theirs.kwargs == mine.kwargs
        assert theirs.call == mine.call and theirs.rows == mine.rows
    assert got.saved == graph.saved and got.sites == [None] * len(graph.nodes)
    assert torch.equal(got.constants[0], graph.constants[0])
    assert got.structure_key() == graph.structure_key()


def test_decode_graph_takes_constants_from_the_caller():
    data = send_graph(encode_graph(sample_graph()))
    fresh = [torch.zeros(4)]
    assert decode_graph(data, fresh).constants[0] is fresh[0]
    with pytest.raises(ProtocolError, match="constant 0"):
        decode_graph(data, [])


def broken(edit):
    data = encode_graph(sample_graph())
    edit(data)
    return data


def set_node(index, field, value):
    return lambda data: data["nodes"][index].__setitem__(field, value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (set_node(1, 3, (Ref(2),)), "reads node 2"),
        (set_node(1, 3, (slice(Ref(5), None),)), "reads node 5"),
        (set_node(1, 4, {"x": [{"y": Ref(1)}]}), "reads node 1"),
        (set_node(2, 3, (Const(1),)), "constant 1"),
        (set_node(0, 1, "exec"), "op is 'exec'"),
        (set_node(0, 1, ["output"]), "op"),
        (set_node(0, 2, 3), "target"),
        (set_node(0, 0, 1), "id"),
        (set_node(0, 3, [1]), "args"),
        (set_node(0, 4, {1: 2}), "kwargs"),
        (set_node(0, 5, "0"), "call"),
        (set_node(0, 5, -2), "call"),
        (set_node(0, 6, (3, 1)), "rows"),
        (set_node(0, 6, (-1, 1)), "rows"),
        (set_node(0, 6, (0, 1, 2)), "rows"),
        (lambda d: d["nodes"][0].pop(), "node 0"),
        (lambda d: d["nodes"].reverse(), "id"),
        (lambda d: d.__setitem__("saved", [6]), "saved"),
        (lambda d: d.__setitem__("saved", "0"), "saved"),
        (lambda d: d.__setitem__("constants", [1.0]), "constants"),
        (lambda d: d.pop("nodes"), "graph"),
    ],
)
def test_decode_graph_rejects_graphs_that_could_not_have_been_recorded(edit, match):
    with pytest.raises(ProtocolError, match=match):
        decode_graph(send_graph(broken(edit)))


def test_decode_graph_rejects_a_non_dict():
    with pytest.raises(ProtocolError, match="graph"):
        decode_graph([1, 2])


# --- bad input on decode ---------------------------------------------------------------------


def float_frames():
    return encode("run", {"t": torch.arange(4, dtype=torch.float32)})


def with_spec(**changes):
    spec = {"dtype": "float32", "shape": [4], "nbytes": 16, **changes}
    return raw_message({"t": ext(wire.TENSOR, 0)}, [spec], [bytes(16)])


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "empty message"),
        ([MAGIC + bytes([PROTOCOL_VERSION])], "no header"),
        ([b"ZMQ\x01", b""], "not a lazytensor message"),
        ([b"LZ", b""], "not a lazytensor message"),
        ([MAGIC + bytes([PROTOCOL_VERSION, 0]), b""], "version frame"),
        ([MAGIC + bytes([PROTOCOL_VERSION]), 12], "frame 1 is a int"),
        (float_frames()[:2] + [bytes(16), bytes(16)], "expected 3 frames"),
        (float_frames()[:2], "expected 3 frames"),
        ([*float_frames()[:2], bytes(12)], "frame has 12"),
        (with_spec(nbytes=32), "claims 32 bytes"),
        (with_spec(shape=[5]), "needs 20"),
        (with_spec(dtype="object"), "dtype is 'object'"),
        (with_spec(dtype="torch.float32"), "dtype"),
        (with_spec(shape=[-4]), "non-negative"),
        (with_spec(shape=[True, 4]), "non-negative"),
        (with_spec(shape=4), "shape"),
        (with_spec(shape=[1] * 65), "at most 64"),
        (with_spec(extra=1), "header"),
        (raw_message({}, [[1, 2]], [b""]), "tensor 0"),
        (raw_message({"t": ext(wire.TENSOR, 1)}, [], []), "extension 9"),
    ],
)
def test_malformed_frames_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def test_truncated_header_raises_protocol_error():
    frames = encode("run", {"text": "x" * 100, "t": torch.ones(2)})
    for cut in (1, 10, len(frames[1]) - 1):
        with pytest.raises(ProtocolError, match="not valid msgpack"):
            decode([frames[0], frames[1][:cut], *frames[2:]])


def test_version_mismatch_names_both_versions():
    frames = encode("run", {"x": 1})
    frames[0] = MAGIC + bytes([2])
    with pytest.raises(ProtocolError, match=r"peer speaks lazytensor protocol 2.* speaks 1: upgr"):
        decode(frames)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (msgpack.packb([1, 2]), "the header"),
        (msgpack.packb({"kind": "run", "body": {}}), "the header"),
        (msgpack.packb({"kind": 1, "body": {}, "tensors": []}), "str kind"),
        (msgpack.packb({"kind": "run", "body": [], "tensors": []}), "dict body"),
        (msgpack.packb({"kind": "run", "body": {}, "tensors": []}) + b"\x00", "msgpack"),
        (b"\x91" * 5000 + b"\xc0", "msgpack|max_depth"),
    ],
)
def test_malformed_headers_raise_protocol_error(header, match):
    with pytest.raises(ProtocolError, match=match):
        decode([MAGIC + bytes([PROTOCOL_VERSION]), header])


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (ext(99, None), "extension code is 99"),
        (ext(0, None), "extension code is 0"),
        (msgpack.ExtType(wire.TUPLE, b"\xc1"), "not valid msgpack"),
        (ext(wire.TUPLE, {"a": 1}), "extension 1"),
        (ext(wire.SLICE, [1, 2]), "extension 2"),
        (ext(wire.SLICE, [1.5, None, None]), "slice bound"),
        (ext(wire.SLICE, [ext(wire.CONST, 0), None, None]), "slice bound"),
        (ext(wire.ELLIPSIS, 0), "extension 3"),
        (ext(wire.REF, -1), "extension 4"),
        (ext(wire.REF, True), "extension 4"),
        (ext(wire.CONST, "0"), "extension 5"),
        (ext(wire.DTYPE, "float128"), "extension 6"),
        (ext(wire.DTYPE, "qint8"), "extension 6"),
        (ext(wire.DEVICE, ["nosuchdevice", None]), "device"),
        (ext(wire.DEVICE, ["cuda:0", 1]), "device"),
        (ext(wire.DEVICE, ["cuda", -1]), "device"),
        (ext(wire.SIZE, [1, "2"]), "extension 8"),
        (ext(wire.TENSOR, 0), "extension 9"),
        (ext(wire.RECORD, ["Out", {1: 2}]), "extension 10"),
        (ext(wire.RECORD, [None, {}]), "extension 10"),
        (msgpack.Timestamp(0), "a value"),
        ({1.5: "float key"}, "dict key"),
        ({True: "bool key"}, "dict key"),
    ],
    ids=repr,
)
def test_malformed_values_raise_protocol_error(value, match):
    with pytest.raises(ProtocolError, match=match):
        decode(raw_message({"v": value}))


def test_bool_tensor_bytes_must_be_zero_or_one():
    spec = {"dtype": "bool", "shape": [2], "nbytes": 2}
    with pytest.raises(ProtocolError, match="bool"):
        decode(raw_message({"t": ext(wire.TENSOR, 0)}, [spec], [b"\x01\x02"]))


def nested_list(depth):
    value = None
    for _ in range(depth):
        value = [value]
    return value


def nested_tuple(depth):
    value = None
    for _ in range(depth):
        value = (value,)
    return value


def test_too_deep_nesting_is_refused_on_both_sides():
    assert roundtrip(nested_tuple(63)) == nested_tuple(63)
    with pytest.raises(ValueError, match="max_depth=64"):
        encode("run", {"v": nested_tuple(64)})
    deep = encode("run", {"v": nested_tuple(100)}, limits=Limits(max_depth=200))
    with pytest.raises(ProtocolError, match="max_depth"):
        decode(deep)
    with pytest.raises(ProtocolError, match="max_depth"):
        decode(raw_message({"v": nested_list(100)}))
    assert decode(deep, limits=Limits(max_depth=200)).body["v"] == nested_tuple(100)


def test_a_cycle_is_refused_on_encode():
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="max_depth"):
        encode("run", {"v": cycle})


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (Limits(max_frames=2), r"Limits.max_frames: its frame count is 3, the maximum is 2"),
        (Limits(max_header_bytes=10), r"Limits.max_header_bytes: .* the maximum is 10"),
        (Limits(max_total_bytes=100), r"Limits.max_total_bytes: .* is 1\d\d\d, the maximum is 100"),
    ],
)
def test_limits_are_enforced_naming_the_limit_value_and_maximum(limits, match):
    frames = encode("run", {"t": torch.zeros(256)})
    with pytest.raises(ProtocolError, match=match):
        decode(frames, limits=limits)
    with pytest.raises(ValueError, match=match):
        encode("run", {"t": torch.zeros(256)}, limits=limits)


class Exploit:
    """Unpickling this would call ``_pwned``: proof that pickle ran."""

    def __reduce__(self):
        return (_pwned, ())


CALLS: list[str] = []


def _pwned():
    CALLS.append("unpickled")


def test_pickle_payloads_are_never_executed(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the wire called pickle")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    payload = pickle.dumps(Exploit())
    body = decode(raw_message({"p": payload})).body
    assert body["p"] == payload  # plain bytes, nothing more

    spec = {"dtype": "uint8", "shape": [len(payload)], "nbytes": len(payload)}
    tensor = decode(raw_message({"t": ext(wire.TENSOR, 0)}, [spec], [payload])).body["t"]
    assert as_bytes(tensor) == payload

    for frames in (
        [MAGIC + bytes([PROTOCOL_VERSION]), payload],
        raw_message({"p": msgpack.ExtType(wire.RECORD, payload)}),
        raw_message({"p": msgpack.ExtType(wire.TUPLE, payload)}),
        [payload, payload],
    ):
        with pytest.raises(ProtocolError):
            decode(frames)
    assert CALLS == []


# --- bad input on encode ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (object(), "cannot send a object.*supported: None, bool"),
        ({1, 2}, "cannot send a set"),
        (lambda: 0, "cannot send a function"),
        (torch.complex32, "dtype torch.complex32 cannot travel"),
        (torch.zeros(2, dtype=torch.float8_e4m3fnuz), "dtype torch.float8_e4m3fnuz"),
        (torch.eye(2).to_sparse(), "sparse"),
        (torch.empty(2, device="meta"), "meta"),
        ({(1, 2): 3}, "dict key is a tuple"),
        ({True: 3}, "dict key is a bool"),
        (slice(1.5), "slice bound is a float"),
        (Ref("0"), "expected an int"),
        (OrderedDict({1: 2}), "key 1; records need str"),
    ],
    ids=repr,
)
def test_unsupported_values_raise_type_error(value, match):
    with pytest.raises(TypeError, match=match):
        encode("run", {"v": value})


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_ints_beyond_64_bits_raise_value_error(value):
    with pytest.raises(ValueError, match="outside"):
        encode("run", {"v": value})


@pytest.mark.parametrize(("kind", "body"), [(1, {}), ("run", []), ("run", Record("R", {}))])
def test_encode_needs_a_str_kind_and_a_plain_dict_body(kind, body):
    with pytest.raises(TypeError, match="str kind and a dict body"):
        encode(kind, body)


def test_named_tuples_keep_their_field_names():
    result = torch.arange(6.0).topk(2)  # torch.return_types.topk
    point = collections.namedtuple("Point", "x y")(1, torch.ones(2))
    body = wire.decode(wire.encode("x", {"r": result, "p": point})).body
    assert torch.equal(body["r"].values, result.values)
    assert torch.equal(body["r"].indices, result.indices)
    assert body["p"].x == 1 and torch.equal(body["p"].y, point.y)
    values, indices = body["r"]
    assert torch.equal(indices, result.indices)


@pytest.mark.parametrize("fields", [["__class__"], ["import"], ["a", "a"], ["x y"]])
def test_named_tuple_fields_must_be_plain_identifiers(fields):
    payload = msgpack.packb(["T", fields, [1] * len(fields)])
    header = msgpack.packb({"kind": "x", "body": msgpack.ExtType(11, payload), "tensors": []})
    with pytest.raises(ProtocolError):
        wire.decode([wire.VERSION_FRAME, header])


def test_a_contiguous_tensor_with_an_odd_stride_travels():
    # x[:, 0] of a (1, L) tensor is "contiguous" with stride (L,): its bytes need one copy.
    for tensor in (
        torch.arange(12.0).reshape(1, 12)[:, 0],
        torch.arange(12.0).reshape(1, 12)[:, :1],
    ):
        (back,) = decode(encode("result", {"t": tensor})).body.values()
        assert torch.equal(back, tensor)
