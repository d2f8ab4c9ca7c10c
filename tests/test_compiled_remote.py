"""Compiled replay on a server (``lazytensor serve --compile``), with the ``aot_eager``
backend (seconds to compile on a CPU): remote compiled runs equal local eager ones, a program is
reused across constant values and made again for a new structure, a server that does not
compile (or not with the backend asked for) runs eagerly and says so, a bad backend name is
refused, and a compile that overruns ``--max-seconds`` is stopped without stopping the server.

The module shares two servers: ``lazytensor serve --compile aot_eager,eager`` in its own
process, and a service on loopback whose jobs run in a worker process (the same code the server
process runs them with) with a time limit shorter than compiling a graph of thousands of copies
takes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import pytest
import torch

from lazytensor.backends import client as client_module
from lazytensor.backends.transport import InProcessTransport
from lazytensor.core.errors import ProtocolError, RemoteTimeout
from lazytensor.core.graph import Batch, Graph, Node, Ref
from lazytensor.frontend.served import Client
from lazytensor.protocol import codec
from lazytensor.protocol import messages as m
from lazytensor_server import app, compiling
from lazytensor_server.limits import Limits
from lazytensor_server.runner import Job
from lazytensor_server.service import Service
from servers import MODEL, embedded, server_process

PROMPT = "The Eiffel Tower is in the city of"
COMPILED = "compiled a program with"
#: The tight server's --max-seconds: running :func:`copying` eagerly takes well under it
#: (about 0.2 s), compiling it many times more (8-20 ms a node, more than MAX_SECONDS + 1 s).
MAX_SECONDS = 2
COPIES = 2000


class Noting(Client):
    """A client that keeps its last job, whose reply holds the server's ``note``."""

    def submit(self, model, request):
        self.last = super().submit(model, request)
        return self.last

    def note(self) -> str:
        return self.last.wait().note  # the reply it already has


@pytest.fixture(scope="module")
def compiling_server(llama_path, tmp_path_factory):
    """``lazytensor serve --compile aot_eager,eager`` in its own process, default limits."""
    log = tmp_path_factory.mktemp("compiled") / "server.log"
    with server_process(llama_path, log, "--compile", "aot_eager,eager") as server:
        client = Noting(server.address, timeout=60.0)
        yield server, client
        client.close()


@pytest.fixture(scope="module")
def tight_server(served_llama):
    """A server on loopback whose jobs run in a worker process (as ``lazytensor serve``'s do),
    compiling with aot_eager under a time limit that the graph of :func:`copying` takes
    longer to compile: its service, and a client."""
    limits = Limits(compile=("aot_eager",), max_seconds=MAX_SECONDS)
    service = Service([served_llama], limits=limits, isolate=True)
    with embedded(service) as app:
        client = Noting(app.endpoint, timeout=60.0)
        yield service, client
        client.close()


def forcing(lm, remote, compile, values, layer: int = 1) -> tuple[list, str]:
    """Force two MLP neurons to ``values`` (a constant): the saved values and the server's note."""
    with lm.trace(PROMPT, remote=remote, compile=compile):
        x = lm.model.layers[layer].mlp.down_proj.input
        x[:, -1, [3, 5]] = values
        h = lm.model.layers[2].output[:, -1].save()
        logits = lm.output.logits.save()
    return [h, logits], remote.note() if remote else ""


def steering(lm, remote, compile, vector) -> tuple[list, str]:
    """Add ``vector`` to layer 1's output."""
    with lm.trace(PROMPT, remote=remote, compile=compile):
        lm.model.layers[1].output = lm.model.layers[1].output + vector
        logits = lm.output.logits.save()
    return [logits], remote.note() if remote else ""


def halving(lm, remote, compile, scale: torch.Tensor) -> tuple[list, str]:
    """Generate 4 tokens, scaling layer 1's MLP output by ``scale`` (a constant) at every
    step: the tokens and layer 3's last position at each step, and the server's note."""
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with lm.generate(PROMPT, remote=remote, compile=compile, **options) as tracer:
        steps = []
        with tracer.all():
            lm.model.layers[1].mlp.output[:] *= scale
            steps.append(lm.model.layers[3].output[:, -1].save())
        tokens = tracer.result.save()
    return [tokens, *steps], remote.note() if remote else ""


def copying(lm, remote, compile) -> tuple[list, str]:
    """Copy layer 1's output :data:`COPIES` times: cheap to run, slow to compile."""
    with lm.trace(PROMPT, remote=remote, compile=compile):
        h = lm.model.layers[1].output
        for _ in range(COPIES):
            h = h.clone()
        lm.model.layers[1].output = h
        logits = lm.output.logits.save()
    return [logits], remote.note() if remote else ""


def assert_equal(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_compiled_runs_equal_local_eager_and_reuse_the_program(local_llama, compiling_server):
    server, client = compiling_server
    notes = []
    for value in (1.0, 2.0, -3.0, 7.5):  # a new constant each run: the same program
        values = torch.full((2,), value)
        got, note = forcing(local_llama, client, "aot_eager", values)
        assert_equal(got, forcing(local_llama, False, False, values)[0])
        notes.append(note)
    assert notes == [compiling._FIRST, "", "", ""]  # eager once (the schedule), then compiled
    assert server.log().count(COMPILED) == 1


def test_a_new_structure_gets_a_new_program(local_llama, compiling_server):
    server, client = compiling_server
    before = server.log().count(COMPILED)
    notes = []
    for value in (0.5, -1.0, 2.0):  # steering: a structure the first test did not run
        vector = torch.full((64,), value)
        got, note = steering(local_llama, client, True, vector)  # True: the first, aot_eager
        assert_equal(got, steering(local_llama, False, False, vector)[0])
        notes.append(note)
    assert notes == [compiling._FIRST, "", ""]
    assert server.log().count(COMPILED) == before + 1


def test_a_generation_compiles_on_the_server_and_equals_local_eager(local_llama, compiling_server):
    """An edit at every step: the first run is eager (its schedule), the next ones compiled,
    with a new constant each time; tokens and every step's value equal a local eager run's."""
    server, client = compiling_server
    before = server.log().count(COMPILED)
    notes = []
    for scale in map(torch.tensor, (0.5, 0.25, 2.0)):  # new constants, one program
        got, note = halving(local_llama, client, "aot_eager", scale)
        want = halving(local_llama, False, False, scale)[0]
        assert len(got) == len(want) == 1 + 4
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the tokens
        assert_equal(got[1:], want[1:])
        notes.append(note)
    assert notes == [compiling._FIRST, "", ""]
    assert server.log().count(COMPILED) == before + 1


def test_an_error_in_a_run_that_asked_to_compile_names_the_users_line(
    local_llama, compiling_server
):
    client = compiling_server[1]
    for _ in range(2):  # the first run fails: there is no program to run the second
        with pytest.raises(IndexError, match=r"test_compiled_remote.py:\d+.*out of bounds"):
            with local_llama.trace(PROMPT, remote=client, compile=True):
                local_llama.model.layers[1].output[:, 99].save()


def test_a_backend_the_server_does_not_offer_runs_eagerly_and_says_so(
    local_llama, compiling_server
):
    values = torch.full((2,), 3.0)
    got, note = forcing(local_llama, compiling_server[1], "inductor", values)
    assert_equal(got, forcing(local_llama, False, False, values)[0])
    assert note == "ran eagerly: this server compiles with aot_eager, eager only, not inductor"


def test_a_bad_backend_name_is_a_protocol_error_and_the_server_survives(
    local_llama, compiling_server
):
    client = compiling_server[1]
    with pytest.raises(ProtocolError, match="compile='os.system' names no backend"):
        forcing(local_llama, client, "os.system", torch.ones(2))
    values = torch.full((2,), -2.0)
    got, _ = forcing(local_llama, client, False, values)
    assert_equal(got, forcing(local_llama, False, False, values)[0])


def test_a_server_without_the_flag_runs_eagerly_and_the_client_is_told(
    local_llama, llama_service, caplog, monkeypatch
):
    monkeypatch.setattr(client_module, "_told", set())  # notes logged by earlier tests
    client = Noting("inproc", transport=InProcessTransport(llama_service), timeout=60.0)
    values = torch.full((2,), 1.5)
    want = forcing(local_llama, False, False, values)[0]
    with caplog.at_level(logging.INFO, logger="lazytensor"):
        for _ in range(2):  # the client logs a note once
            got, note = forcing(local_llama, client, True, values)
            assert_equal(got, want)
            assert note == f"ran eagerly: {compiling._NOT_SERVED}"
    said = [r for r in caplog.records if "does not compile" in r.getMessage()]
    assert [(r.name, r.levelno) for r in said] == [("lazytensor", logging.INFO)]


def test_a_compile_past_the_time_limit_is_stopped_and_the_server_keeps_serving(
    local_llama, tight_server
):
    service, client = tight_server
    values = torch.full((2,), 4.0)
    want = forcing(local_llama, False, False, values)[0]
    assert_equal(forcing(local_llama, client, False, values)[0], want)  # a warm worker
    got, note = copying(local_llama, client, True)  # eager: records the schedule
    assert_equal(got, copying(local_llama, False, False)[0])
    assert note == compiling._FIRST
    started = time.monotonic()
    with pytest.raises(RemoteTimeout, match="--max-seconds"):  # compiling takes longer
        copying(local_llama, client, True)
    assert time.monotonic() - started < MAX_SECONDS + 5  # killed 1 s past, not after compiling
    assert service.workers[MODEL].child.restarts == 1
    assert_equal(forcing(local_llama, client, False, values)[0], want)  # a fresh worker


# -- the wire, the flags and the rules, without a server process -------------------------------
@pytest.mark.parametrize("wish", [True, "inductor", "aot_eager", "eager"])
def test_a_compile_wish_round_trips(wish) -> None:
    run = m.Run("r1", None, MODEL, compile=wish)
    assert m.decode_request(m.encode(run)).compile == wish
    assert "compile" not in m.Run("r1", None, MODEL).body()  # False: not sent


@pytest.mark.parametrize("bad", ["os.system", "Inductor", "", None, 1, ["eager"], "x" * 10_000])
def test_a_bad_compile_wish_is_a_protocol_error(bad) -> None:
    frames = m.encode(m.Run("r1", None, MODEL, compile=bad))
    with pytest.raises(ProtocolError, match="names no backend") as caught:
        m.decode_request(frames)
    assert len(str(caught.value)) < 300  # a long value is not echoed whole


def test_a_note_round_trips_and_a_bad_one_is_refused() -> None:
    assert m.decode_reply(m.encode(m.Result("r1", {0: 1}, "why"))).note == "why"
    assert "note" not in m.Result("r1", {}).body()
    for bad in (3, "x" * (m.MAX_NOTE + 1)):
        frames = codec.encode("result", {"id": "r1", "values": {}, "note": bad})
        with pytest.raises(ProtocolError, match="note"):
            m.decode_reply(frames)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--compile", "os.system"], "give distinct backends from inductor, aot_eager, eager"),
        (["--compile", "eager,eager"], "give distinct backends"),
        (["--compile-after", "3"], "--compile BACKENDS to compile with"),
        (["--compile", "eager", "--compile-after", "-1"], "N >= 0"),
        (["--compile", "eager", "--workers", "thread"], "--compile needs --workers process"),
    ],
)
def test_bad_compile_flags_stop_the_server_before_it_starts(flags, says, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        app.main(["no-such-model", *flags])
    assert stopped.value.code == 2
    assert says in capsys.readouterr().err


def test_a_server_on_worker_threads_runs_eagerly_and_says_why(local_llama, served_llama) -> None:
    service = Service([served_llama], limits=Limits(compile=("aot_eager",)))
    try:
        client = Noting("inproc", transport=InProcessTransport(service), timeout=60.0)
        values = torch.full((2,), 0.5)
        got, note = forcing(local_llama, client, True, values)
    finally:
        service.shutdown(grace=5.0)
    assert_equal(got, forcing(local_llama, False, False, values)[0])
    assert note == "ran eagerly: this server compiles only in worker processes (--workers process)"


def test_what_runs_eagerly_on_a_server() -> None:
    def job(*nodes, **fields):
        graph = Graph([Node(i, *node) for i, node in enumerate(nodes)], [], [], [])
        made = Job("r1", None, MODEL, graph, Batch(size=1), None, False, 0, shapes_known=True)
        return replace(made, **fields)

    read = ("output", "model.layers.0", (), {}, 0, None)
    assert compiling.refusal(job(read)) is None
    assert "plain runs" in compiling.refusal(job(read, stop_at=0))
    every_step = ("output", "model.layers.0", (), {}, -1, None)
    assert compiling.refusal(job(every_step, batch=Batch(size=1, generate=True))) is None
    assert "cannot be compiled" in compiling.refusal(job(every_step))  # a forward runs once
    assert "python node" in compiling.refusal(job(read, ("python", "f", (), {}, 0, None)))
    assert "cannot be compiled" in compiling.refusal(job(("output", "model", (), {}, 1, None)))
    keyword = ("function", "torch.add", (), {"ｖ": 1}, 0, None)
    assert "plain name" in compiling.refusal(job(keyword))
    assert "shape depends" in compiling.refusal(job(read, shapes_known=False))
    alone = Job("r1", None, MODEL, Graph(), Batch(), None, False, 0, compile=True)
    assert compiling.shared_note(alone, Limits(), 2).endswith("(its operator did not start it "
                                                              "with --compile)")  # fmt: skip
    assert "with 2 other requests" in compiling.shared_note(alone, Limits(compile=("eager",)), 3)


def test_compile_after_n_runs_compiles_what_no_one_asked_to(monkeypatch) -> None:
    asked = []

    def run(module, graph, batch, backend):  # stands for compiled.PROGRAMS.run
        asked.append(backend)
        return {0: backend}

    monkeypatch.setattr(compiling.compiled.PROGRAMS, "run", run)
    compiler = compiling.Compiler(Limits(compile=("eager", "aot_eager"), compile_after=3))
    compiler.killable = True
    graph = Graph([Node(0, "output", "model.layers.0", (), {}, 0, None)], [], [0], [None])
    job = Job("r1", None, MODEL, graph, Batch(size=1), None, False, 0, shapes_known=True)
    module = torch.nn.Linear(2, 2)
    got = [compiler.run(module, replace(job)) for _ in range(4)]
    assert got == [None, None, {0: "eager"}, {0: "eager"}]  # from the 3rd run: the first backend
    wished = replace(job, graph=Graph(graph.nodes, [], [], [None]), compile="aot_eager")
    assert compiler.run(module, wished) == {0: "aot_eager"}  # asked: at once
    assert wished.note == compiling._FIRST
    assert asked == ["eager", "eager", "aot_eager"]


def test_compile_after_counts_runs_that_assign_other_numbers_as_one_structure(monkeypatch) -> None:
    """``x[..] = v`` for a sweep of ``v`` is one compiled program (the number is its input),
    so ``--compile-after`` counts the sweep's runs together."""
    monkeypatch.setattr(compiling.compiled.PROGRAMS, "run", lambda *args: {0: "compiled"})
    compiler = compiling.Compiler(Limits(compile=("eager",), compile_after=3))
    compiler.killable = True
    module = torch.nn.Linear(2, 2)

    def job(value: float) -> Job:
        read = Node(0, "output", "model.layers.0", (), {}, 0, None)
        nodes = [read, Node(1, "function", "operator.setitem", (Ref(0), 0, value), {}, 0, None)]
        graph = Graph(nodes, [], [0], [None, None])
        return Job("r1", None, MODEL, graph, Batch(size=1), None, False, 0, shapes_known=True)

    got = [compiler.run(module, job(v)) for v in (1.0, 2.0, -3.5, 4.25)]
    assert got == [None, None, {0: "compiled"}, {0: "compiled"}]
    other = Node(1, "function", "operator.setitem", (Ref(0), 1, 1.0), {}, 0, None)  # index 1
    changed = replace(job(1.0), graph=Graph([job(1.0).graph.nodes[0], other], [], [0], [None] * 2))
    assert compiler.run(module, changed) is None  # another structure: its own count
