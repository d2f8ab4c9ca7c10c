"""Properties, checked on generated input: the wire round-trips any value and any graph, decoding
any bytes fails only with ProtocolError, structure keys see structure and only structure, and
the tree walker rebuilds every container as its own type.

Hypothesis draws the input; examples are few so the file stays fast. No example database is
kept (``database=None``); what Hypothesis still writes goes to ``.hypothesis/``, which git ignores.
"""

from __future__ import annotations

import collections
import functools
import keyword
import math
from collections import OrderedDict, defaultdict

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lazytensor.core import tree
from lazytensor.core.errors import ProtocolError
from lazytensor.core.graph import EVERY_CALL, OPS, Batch, Const, Graph, Node, Ref
from lazytensor.protocol import codec, messages, values
from lazytensor.protocol.values import DTYPES, VERSION_FRAME, Record

# A failing property makes Hypothesis write a patch (into .hypothesis/, ignored by git) with
# libcst, whose import warns; under ``filterwarnings = error`` that would hide the failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict:DeprecationWarning")

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- what the wire carries -------------------------------------------------------------------

INTS = st.integers(-(2**63), 2**64 - 1)  # what a msgpack integer holds
IDS = st.integers(0, 2**64 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
KEYS = st.one_of(st.text(max_size=5), INTS)
TYPE_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(
    lambda name: not keyword.iskeyword(name)
)
FIELD_NAMES = st.lists(
    st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,6}", fullmatch=True), unique=True, max_size=3
).map(lambda names: tuple(name for name in names if not keyword.iskeyword(name)))
BYTES = st.binary(max_size=64)
#: A record's field names, among them its own constructor's parameter names.
FIELD_KEYS = st.text(max_size=5) | st.sampled_from(["cls_name", "fields"])
DEVICES = st.sampled_from(
    [torch.device("cpu"), torch.device("cpu", 0), torch.device("cuda", 3), torch.device("meta")]
)
SIZES = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(torch.Size)
ALL_DTYPES = st.sampled_from(sorted(DTYPES.values(), key=str))


@st.composite
def tensors(draw: st.DrawFn, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small tensor of any travelling dtype holding arbitrary bits (NaNs, subnormals...)."""
    dtype = dtype or draw(ALL_DTYPES)
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    tensor = _from_bytes(draw(BYTES), dtype, shape)
    if tensor.dim() >= 2 and draw(st.booleans()):
        tensor = tensor.mT  # non-contiguous: the codec sends a contiguous copy
    if tensor.is_complex() and draw(st.booleans()):
        tensor = tensor.conj()  # a lazy conjugate bit: the codec resolves it
    return tensor


def _from_bytes(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` whose bytes are ``raw``, repeated or cut to fit."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = (raw or b"\x00") * (nbytes // max(len(raw), 1) + 1)
    data = torch.tensor(list(raw[:nbytes]), dtype=torch.uint8)  # (nbytes,)
    if dtype == torch.bool:
        data = data % 2
    return data.view(dtype).reshape(shape)


def named_tuples(items: st.SearchStrategy) -> st.SearchStrategy:
    """Named tuples of fresh classes (cached by name and fields) holding ``items``."""

    def build(name: str, fields: tuple[str, ...], drawn: list) -> tuple:
        fields = fields[: len(drawn)]
        return _named_tuple(name, fields)(*drawn[: len(fields)])

    return st.builds(build, TYPE_NAMES, FIELD_NAMES, st.lists(items, max_size=3))


@functools.cache
def _named_tuple(name: str, fields: tuple[str, ...]) -> type:
    return collections.namedtuple(name, fields)


def wire_values(
    refs: st.SearchStrategy = IDS,
    consts: st.SearchStrategy = IDS,
    *,
    with_tensors: bool = True,
    named: bool = True,
    more: tuple = (),
) -> st.SearchStrategy:
    """Any body value: leaves of every wire type, nested a few levels in every container.

    ``named=False`` leaves out named tuples and records; ``more`` adds container strategies
    (functions of the item strategy) the wire does not carry but the tree walker must.
    """
    ref = refs.map(Ref)
    bound = st.one_of(st.none(), INTS, ref)
    leaves = [
        st.none(),
        st.booleans(),
        INTS,
        FLOATS,
        st.text(max_size=8),
        st.binary(max_size=8),
        st.just(Ellipsis),
        ref,
        consts.map(Const),
        ALL_DTYPES,
        DEVICES,
        SIZES,
        st.builds(slice, bound, bound, bound),
    ]
    if with_tensors:
        leaves.append(tensors())

    def nest(items: st.SearchStrategy) -> st.SearchStrategy:
        containers = [
            st.lists(items, max_size=3),
            st.lists(items, max_size=3).map(tuple),
            st.dictionaries(KEYS, items, max_size=3),
            *(container(items) for container in more),
        ]
        if named:
            fields = st.dictionaries(FIELD_KEYS, items, max_size=3)
            containers += [named_tuples(items), st.builds(Record, st.text(max_size=6), fields)]
        return st.one_of(containers)

    return st.recursive(st.one_of(leaves), nest, max_leaves=8)


def same(got: object, want: object, *, strict: bool = False) -> bool:
    """Whether ``got`` is ``want``, container type by container type and bit for bit.

    Named tuples match by name and fields (the codec rebuilds them as fresh classes) unless
    ``strict``, which asks for the very same class; NaN matches NaN, ``-0.0`` is not ``0.0``.
    """
    if isinstance(want, torch.Tensor):
        return (
            isinstance(got, torch.Tensor)
            and (got.dtype, got.shape) == (want.dtype, want.shape)
            and _bytes(got) == _bytes(want)
        )
    if type(want) is float:
        if type(got) is not float:
            return False
        if math.isnan(want):
            return math.isnan(got)
        return got == want and math.copysign(1, got) == math.copysign(1, want)
    if _kind(got, strict) != _kind(want, strict):
        return False
    if isinstance(want, dict):
        return list(got) == list(want) and all(same(got[k], want[k], strict=strict) for k in want)
    if isinstance(want, slice):
        want, got = (want.start, want.stop, want.step), (got.start, got.stop, got.step)
    if isinstance(want, (tuple, list)):
        return len(got) == len(want) and all(same(g, w, strict=strict) for g, w in zip(got, want))
    return got == want


def _kind(value: object, strict: bool) -> object:
    cls = type(value)
    if isinstance(value, Record):
        return Record, value.cls_name
    if isinstance(value, defaultdict):
        return defaultdict, value.default_factory
    if issubclass(cls, tuple) and hasattr(cls, "_fields") and not strict:
        return "named tuple", cls.__name__, cls._fields
    return cls


def _bytes(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().resolve_conj().contiguous()
    return bytes(data.reshape(-1).view(torch.uint8).numpy())


# --- 1. any value round-trips ----------------------------------------------------------------


VALUES = wire_values()


@SETTINGS
@given(VALUES)
@example(_named_tuple("_Pair", ("a", "b"))(1, 2))  # once refused by the decoder
@example(_named_tuple("Empty", ())())  # once sent as a plain tuple
def test_any_value_round_trips(value: object) -> None:
    got = codec.decode(codec.encode("run", {"v": value})).body["v"]
    assert same(got, value)


@settings(SETTINGS, max_examples=50)
@given(st.text(max_size=6), st.lists(st.text(max_size=6), max_size=70), st.booleans())
def test_a_named_tuple_is_refused_on_encode_or_round_trips(
    name: str, fields: list[str], rename: bool
) -> None:
    """Whatever encode sends, the peer can rebuild: the refusal happens on this side."""
    try:
        cls = collections.namedtuple(name, fields, rename=rename)
    except ValueError:
        return  # not a named tuple Python can make
    value = cls(*range(len(cls._fields)))
    try:
        frames = codec.encode("run", {"v": value})
    except TypeError as exc:
        assert "named tuple" in str(exc)
        return
    got = codec.decode(frames).body["v"]
    assert same(got, value)


# --- 2. any graph round-trips ----------------------------------------------------------------


@functools.cache
def _arguments(n_refs: int, n_consts: int, named: bool = True) -> st.SearchStrategy:
    """Arguments of node ``n_refs``: refs to earlier nodes, consts in range, no bare tensors."""
    refs = st.integers(0, n_refs - 1) if n_refs else st.nothing()
    consts = st.integers(0, n_consts - 1) if n_consts else st.nothing()
    return wire_values(refs, consts, with_tensors=False, named=named)


ROWS = st.none() | st.lists(IDS, min_size=2, max_size=2).map(lambda pair: tuple(sorted(pair)))
CALLS = st.integers(EVERY_CALL, 2**64 - 1)


@st.composite
def graphs(draw: st.DrawFn, min_nodes: int = 0, named: bool = True) -> Graph:
    """A graph that could have been recorded: refs point back, consts and saved ids exist."""
    graph = Graph(constants=draw(st.lists(tensors(), max_size=3)))
    for i in range(draw(st.integers(min_nodes, 4))):
        arguments = _arguments(i, len(graph.constants), named)
        graph.add(
            draw(st.sampled_from(sorted(OPS))),
            draw(st.text(max_size=8)),
            tuple(draw(st.lists(arguments, max_size=2))),
            draw(st.dictionaries(st.text(max_size=5), arguments, max_size=2)),
            call=draw(CALLS),
            rows=draw(ROWS),
        )
    n = len(graph.nodes)
    graph.saved = [i for i in draw(st.lists(st.integers(0, 4), unique=True)) if i < n]
    return graph


@st.composite
def runs(draw: st.DrawFn) -> messages.Run:
    graph = draw(graphs())
    stop_at = draw(st.none() | st.integers(0, 4))
    batch = Batch(
        tuple(draw(st.lists(VALUES, max_size=2))),
        draw(st.dictionaries(st.text(max_size=5), VALUES, max_size=2)),
        draw(st.integers(0, 2**63 - 1)),
        draw(st.booleans()),
    )
    return messages.Run(
        id=draw(st.none() | st.text(min_size=1, max_size=8).filter(str.isprintable)),
        key=draw(st.none() | st.text(max_size=8)),
        model=draw(st.text(max_size=8)),
        graph=graph,
        batch=batch,
        stop_at=stop_at if stop_at is not None and stop_at < len(graph.nodes) else None,
        fake=draw(st.booleans()),
    )


def assert_same_graph(got: Graph, want: Graph) -> None:
    assert len(got.nodes) == len(want.nodes)
    for g, w in zip(got.nodes, want.nodes):
        assert (g.id, g.op, g.target, g.call, g.rows) == (w.id, w.op, w.target, w.call, w.rows)
        assert same(g.args, w.args) and same(g.kwargs, w.kwargs), (g, w)
    assert same(got.constants, want.constants)
    assert got.saved == want.saved


@settings(SETTINGS, max_examples=75)
@given(runs(), st.booleans())
def test_any_graph_round_trips_in_a_run_request(run: messages.Run, fetch: bool) -> None:
    request = messages.Fetch(run.id, run.key, run) if fetch else run
    got = messages.decode_request(messages.encode(request))
    if fetch:
        assert type(got) is messages.Fetch and got.id == run.id
        got = got.request
    assert type(got) is messages.Run
    fields = ("id", "key", "model", "stop_at", "fake")
    assert [getattr(got, f) for f in fields] == [getattr(run, f) for f in fields]
    assert_same_graph(got.graph, run.graph)
    assert same(got.batch.args, run.batch.args) and same(got.batch.kwargs, run.batch.kwargs)
    assert (got.batch.size, got.batch.generate) == (run.batch.size, run.batch.generate)


# --- 3. any bytes decode or fail with ProtocolError ------------------------------------------

#: Ints at the edges of what msgpack, int64, int8 device indices and shapes can hold (the
#: likeliest to break something first: Hypothesis draws early members more often).
EDGE_INTS = st.sampled_from(
    [2**63, 2**64 - 1, 0, -1, 128, 255, 300, 2**62, 2**63 - 1, -(2**63), 1, 2, 3, 2**16, 2**31]
)
NAMES = st.sampled_from(["cpu", "cuda", "meta", "Out", "_T", "float32", "bool", "x", "run"])


def msgpack_objects() -> st.SearchStrategy:
    """Any msgpack value, extension types with wire codes (and others) included."""
    leaves = st.one_of(
        st.none(), st.booleans(), INTS, EDGE_INTS, FLOATS, NAMES, st.text(max_size=6),
        st.binary(max_size=6), st.sampled_from(sorted(DTYPES)),
    )  # fmt: skip

    def nest(items: st.SearchStrategy) -> st.SearchStrategy:
        code = st.integers(0, 13) | st.integers(0, 127)
        return st.one_of(
            st.lists(items, max_size=4),
            st.dictionaries(st.one_of(KEYS, NAMES), items, max_size=3),
            st.builds(lambda c, p: msgpack.ExtType(c, msgpack.packb(p)), code, items),
            st.builds(msgpack.ExtType, code, st.binary(max_size=6)),
        )

    return st.recursive(leaves, nest, max_leaves=10)


MSGPACK = msgpack_objects()
#: An index into anything, taken modulo its length (one strategy, not one per length).
INDEX = st.integers(0, 255)


def _ext(code: int, payload: object) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(payload))


def _named_payload(name: object, fields: list, items: bytes) -> list:
    return [name, fields, list((items + bytes(len(fields)))[: len(fields)])]


#: A field of a wire payload: plausible, at an edge, or anything at all.
ODD = st.one_of(EDGE_INTS, NAMES, st.none(), MSGPACK)
REF_EXTS = EDGE_INTS.map(lambda i: _ext(values.REF, i))


def _payloads(code: int, *forms: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(forms).map(lambda payload: _ext(code, payload))


#: Each extension type of the table in lazytensor.protocol.codec, its payload of the right
#: form holding edge values, or of a wrong form. (Hypothesis soon tires of small choices and
#: favours deep ones, so each edge gets a branch of its own.)
WIRE_EXTS = st.one_of(
    _payloads(values.TUPLE, st.lists(ODD, max_size=3)),
    _payloads(
        values.SLICE,
        st.lists(st.none() | EDGE_INTS | REF_EXTS, min_size=3, max_size=3),
        st.lists(ODD, max_size=4),
    ),
    *(_payloads(code, EDGE_INTS, ODD) for code in (values.REF, values.CONST, values.TENSOR)),
    _payloads(values.DTYPE, st.sampled_from(sorted(DTYPES)), ODD),
    _payloads(values.DEVICE, st.tuples(NAMES, st.none() | EDGE_INTS).map(list), st.lists(ODD)),
    _payloads(values.SIZE, st.lists(EDGE_INTS, min_size=1, max_size=3), st.lists(ODD)),
    _payloads(values.RECORD, st.tuples(ODD, st.dictionaries(KEYS | NAMES, ODD)).map(list)),
    _payloads(
        values.NAMED,
        st.builds(_named_payload, TYPE_NAMES | ODD, st.lists(ODD, min_size=1, max_size=3), BYTES),
    ),
)


@st.composite
def tensor_specs(draw: st.DrawFn) -> tuple[dict, bytes]:
    """A header's tensor entry and its frame: consistent or not, with edge-case shapes."""
    name = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(st.lists(EDGE_INTS, max_size=4))
    nbytes = math.prod(shape) * DTYPES[name].itemsize
    if 0 <= nbytes <= 64 and draw(st.booleans()):
        frame = (draw(BYTES) + bytes(nbytes))[:nbytes]
    else:
        nbytes, frame = draw(INTS), draw(st.binary(max_size=8))
    return {"dtype": name, "shape": shape, "nbytes": nbytes}, frame


KINDS = st.sampled_from(sorted({*messages.REQUESTS, *messages.REPLIES})) | st.text(max_size=5)


@st.composite
def hostile_values(draw: st.DrawFn) -> list[bytes]:
    """A well-formed header whose body holds a nearly right extension value, first."""
    first = draw(WIRE_EXTS)  # decoded first, before anything else can fail
    body = {"v": first, **draw(st.dictionaries(NAMES, WIRE_EXTS | MSGPACK, max_size=3))}
    return _frames(body, kind=draw(KINDS))


@st.composite
def hostile_tensors(draw: st.DrawFn) -> list[bytes]:
    """A well-formed header with one tensor whose entry is nearly right."""
    spec, frame = draw(tensor_specs() | st.tuples(MSGPACK, BYTES))
    return _frames({"v": _ext(values.TENSOR, 0)}, [spec], [frame], kind=draw(KINDS))


def _frames(body: dict, specs: list = (), frames: list = (), kind: str = "run") -> list[bytes]:
    header = {"kind": kind, "body": body, "tensors": list(specs)}
    return [VERSION_FRAME, msgpack.packb(header), *frames]


HOSTILE = hostile_values() | hostile_tensors()
VALID_FRAMES = st.one_of(
    runs(),
    st.builds(messages.Result, st.none(), st.dictionaries(IDS, VALUES, max_size=2)),
    st.builds(messages.Status, st.none(), st.text(max_size=5), st.none() | IDS),
    st.builds(messages.Failure, st.none(), st.dictionaries(st.text(max_size=5), INTS)),
).map(lambda message: [bytes(f) for f in messages.encode(message)])


def _replace_nth(obj: object, n: list[int], new: object) -> object:
    """``obj`` with its ``n[0]``-th node (pre-order, into extension payloads) set to ``new``."""
    n[0] -= 1
    if n[0] < 0:
        return new
    if isinstance(obj, list):
        return [_replace_nth(x, n, new) for x in obj]
    if isinstance(obj, dict):
        return {k: _replace_nth(x, n, new) for k, x in obj.items()}
    if isinstance(obj, msgpack.ExtType) and 1 <= obj.code <= 11:
        try:
            inner = msgpack.unpackb(obj.data, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            return obj  # a payload that is not msgpack is a leaf here
        return msgpack.ExtType(obj.code, msgpack.packb(_replace_nth(inner, n, new)))
    return obj


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    """Valid frames with one to three edits: bytes, frames, or a node of the header's tree."""
    frames = draw(VALID_FRAMES | HOSTILE)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["flip", "cut", "grow", "splice", "frames", "subtree"]))
        i = draw(INDEX) % len(frames)
        frame = frames[i]
        at = draw(INDEX) % (len(frame) + 1)
        if how == "flip" and frame:
            at = min(at, len(frame) - 1)
            frame = frame[:at] + bytes([frame[at] ^ draw(st.integers(1, 255))]) + frame[at + 1 :]
        elif how == "cut":
            frame = frame[:at]
        elif how == "grow":
            frame = frame + draw(st.binary(min_size=1, max_size=16))
        elif how == "splice":
            frame = frame[:at] + draw(st.binary(min_size=1, max_size=8)) + frame[at:]
        elif how == "frames":
            j = draw(INDEX) % len(frames)
            edit = draw(st.sampled_from(["swap", "drop", "copy"]))
            if edit == "swap":
                frames[i], frames[j] = frames[j], frames[i]
            elif edit == "drop" and len(frames) > 1:
                del frames[i]
            else:
                frames.insert(j, frame)
            continue
        elif how == "subtree" and len(frames) > 1:
            try:
                header = msgpack.unpackb(frames[1], strict_map_key=False)
            except (ValueError, TypeError, msgpack.UnpackException):
                continue  # an earlier edit broke the header: nothing to walk
            n = [draw(st.integers(0, 40))]
            frames[1] = msgpack.packb(_replace_nth(header, n, draw(MSGPACK)))
            continue
        frames[i] = frame
    return frames


def assert_only_protocol_errors(frames: list[bytes]) -> None:
    """Each decoder accepts ``frames`` or raises ProtocolError: nothing else escapes."""
    for decode in (codec.decode, messages.decode_request, messages.decode_reply):
        try:
            decode(frames)
        except ProtocolError:
            pass


@settings(SETTINGS, max_examples=200)
@given(mutated())
def test_mutated_messages_fail_only_with_protocol_error(frames: list[bytes]) -> None:
    assert_only_protocol_errors(frames)


@settings(SETTINGS, max_examples=150)
@given(HOSTILE)
# What these properties found once (each raised TypeError or ValueError, or built a wrong value):
@example(_frames({"v": _ext(values.SIZE, [2**63])}))
@example(_frames({"v": _ext(values.NAMED, ["T", [[1]], [2]])}))  # an unhashable field name
@example(_frames({"v": 0}, [{"dtype": "float32", "shape": [0, 2**64 - 1], "nbytes": 0}], [b""]))
@example(_frames({"v": 0}, [{"dtype": "int8", "shape": [0, 2**62, 2], "nbytes": 0}], [b""]))
def test_hostile_headers_fail_only_with_protocol_error(frames: list[bytes]) -> None:
    assert_only_protocol_errors(frames)


def test_a_device_index_torch_cannot_hold_is_refused() -> None:
    """torch keeps a device index in 8 bits: ``cuda:300`` would arrive as ``cuda:44``."""
    assert codec.decode(_frames({"v": _ext(values.DEVICE, ["cuda", 127])})).body["v"].index == 127
    for index in (128, 255, 300):
        with pytest.raises(ProtocolError, match="device"):
            codec.decode(_frames({"v": _ext(values.DEVICE, ["cuda", index])}))


@settings(SETTINGS, max_examples=100)
@given(
    st.one_of(
        st.lists(st.binary(max_size=32), max_size=4),
        st.lists(st.binary(max_size=32), max_size=3).map(lambda rest: [VERSION_FRAME, *rest]),
        MSGPACK.map(lambda header: [VERSION_FRAME, msgpack.packb(header)]),
    )
)
def test_random_bytes_fail_only_with_protocol_error(frames: list[bytes]) -> None:
    assert_only_protocol_errors(frames)


# --- 4. structure keys -----------------------------------------------------------------------


def _with(graph: Graph, node: Node | None = None, constants: list | None = None) -> Graph:
    """``graph`` with fresh nodes (so their cached keys are computed anew), ``node`` put in
    place of the node with its id, and ``constants`` in place of its constants."""
    nodes = [Node(n.id, n.op, n.target, n.args, n.kwargs, n.call, n.rows) for n in graph.nodes]
    if node is not None:
        nodes[node.id] = node
    return Graph(nodes, graph.constants if constants is None else constants, list(graph.saved))


@settings(SETTINGS, max_examples=50)
@given(graphs(), st.data())
def test_structure_key_ignores_constant_values(graph: Graph, data: st.DataObject) -> None:
    fresh = [_from_bytes(data.draw(BYTES), t.dtype, list(t.shape)) for t in graph.constants]
    assert _with(graph, constants=fresh).structure_key() == graph.structure_key()


def _count_leaves(value: object) -> int:
    return sum(1 for _ in tree.leaves(value))


def _replace_leaf(value: object, k: int, new: object) -> object:
    count = iter(range(_count_leaves(value)))
    return tree.map(lambda leaf: new if next(count) == k else leaf, value)


@settings(SETTINGS, max_examples=100)
@given(graphs(min_nodes=1, named=False), st.data())
def test_structure_key_changes_exactly_when_a_node_does(graph: Graph, data: st.DataObject) -> None:
    """Change one field of one node (or one leaf deep in its arguments): the key changes
    exactly when the node is no longer the same, type for type (1, 1.0 and True differ)."""
    node = graph.nodes[data.draw(INDEX) % len(graph.nodes)]
    arguments = _arguments(node.id, len(graph.constants), named=False)
    fields = {"op": node.op, "target": node.target, "args": node.args, "kwargs": node.kwargs,
              "call": node.call, "rows": node.rows}  # fmt: skip
    changes = {
        "op": st.sampled_from(sorted(OPS)),
        "target": st.text(max_size=8),
        "args": st.lists(arguments, max_size=3).map(tuple),
        "kwargs": st.dictionaries(st.text(max_size=5), arguments, max_size=2),
        "call": CALLS,
        "rows": ROWS,
    }
    what = data.draw(st.sampled_from([*changes, "leaf"]))
    if what == "leaf" and _count_leaves(node.args):
        k = data.draw(INDEX) % _count_leaves(node.args)
        fields["args"] = _replace_leaf(node.args, k, data.draw(arguments))
    else:
        what = "args" if what == "leaf" else what
        fields[what] = data.draw(changes[what])
    other = Node(node.id, **fields)
    unchanged = (
        (other.op, other.target, other.call, other.rows)
        == (node.op, node.target, node.call, node.rows)
        and same(other.args, node.args)
        and same(other.kwargs, node.kwargs)
    )
    changed_key = _with(graph, other).structure_key() != graph.structure_key()
    assert changed_key == (not unchanged)


@settings(SETTINGS, max_examples=50)
@given(graphs(min_nodes=1), st.data())
def test_structure_key_sees_constant_shapes_and_dtypes(graph: Graph, data: st.DataObject) -> None:
    if not graph.constants:
        return
    i = data.draw(INDEX) % len(graph.constants)
    constants = list(graph.constants)
    constants[i] = data.draw(tensors())
    old, new = graph.constants[i], constants[i]
    changed_key = _with(graph, constants=constants).structure_key() != graph.structure_key()
    assert changed_key == ((old.shape, old.dtype) != (new.shape, new.dtype))


def _named_key(value: object) -> tuple:
    graph = Graph()
    graph.add("function", "f", (value,))
    return graph.structure_key()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (Record("Out", {"x": 1}), Record("Other", {"x": 1})),
        (_named_tuple("P", ("x",))(1), _named_tuple("P", ("y",))(1)),
    ],
    ids=["record-name", "named-tuple-fields"],
)
def test_structure_key_sees_record_names_and_named_tuple_fields(a: object, b: object) -> None:
    """Graphs whose arguments differ in a record's name or a named tuple's fields travel
    differently, so their keys differ too."""
    assert _named_key(a) != _named_key(b)


# --- 5. the tree walker ----------------------------------------------------------------------


class Bag(dict):
    """A plain dict subclass."""


class Items(list):
    """A plain list subclass."""


MORE_CONTAINERS = (
    lambda items: st.dictionaries(st.text(max_size=5), items, max_size=3).map(OrderedDict),
    lambda items: st.dictionaries(KEYS, items, max_size=3).map(Bag),
    lambda items: st.lists(items, max_size=3).map(Items),
    lambda items: st.tuples(items, items).map(torch.return_types.topk),
    lambda items: st.dictionaries(KEYS, items, max_size=3).map(lambda d: defaultdict(list, d)),
)


def _children(value: object) -> list | None:
    """The items of a container, written out by hand; ``None`` for a leaf."""
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, slice):
        return [value.start, value.stop, value.step]
    if isinstance(value, (tuple, list)):
        return list(value)
    return None


def flatten(value: object) -> list:
    """The leaves of ``value`` in order: what tree.leaves must list."""
    items = _children(value)
    return [value] if items is None else [leaf for item in items for leaf in flatten(item)]


def _identical(got: list, want: list) -> bool:
    return len(got) == len(want) and all(g is w for g, w in zip(got, want))


@settings(SETTINGS, max_examples=150)
@given(wire_values(more=MORE_CONTAINERS))
def test_tree_map_rebuilds_every_container_as_its_type(value: object) -> None:
    seen: list = []
    out = tree.map(lambda leaf: seen.append(leaf) or leaf, value)
    assert same(out, value, strict=True)
    want = flatten(value)
    assert _identical(list(tree.leaves(value)), want)
    assert _identical(seen, want)  # map visits leaves in the same order
    assert _identical(flatten(out), want)

    count = iter(range(len(want)))
    numbered = tree.map(lambda leaf: next(count), value)
    assert flatten(numbered) == list(range(len(want)))
    assert _skeleton(numbered) == _skeleton(value)


def _skeleton(value: object) -> object:
    """The containers of ``value`` (type, keys, a record's name), its leaves blanked out."""
    items = _children(value)
    if items is None:
        return None
    keys = tuple(value) if isinstance(value, dict) else ()
    return _kind(value, strict=True), keys, [_skeleton(item) for item in items]


@pytest.mark.parametrize(
    "value",
    [Record("Out", {"cls_name": 1}), Record("Out", {"cls_name": "A", "fields": None}),
     defaultdict(list, {"a": 1})],
    ids=["record-cls_name", "record-fields", "defaultdict"],
)  # fmt: skip
def test_tree_map_keeps_mappings_whose_fields_name_constructor_arguments(value: dict) -> None:
    """Such a mapping is copied, not rebuilt through its constructor: ``Record(**fields)`` or
    ``defaultdict(**fields)`` would succeed and build the wrong mapping."""
    assert same(tree.map(lambda leaf: leaf, value), value, strict=True)
