"""Compiled replay (``trace(..., compile=...)``, ``generate(..., compile=...)``): equal to the
eager replay, reused across constant values, recompiled for a new structure, eager (with a
logged reason) when it cannot compile.

The compile backend here is a counting one that runs the graph dynamo captured as it is, so the
tests see every compilation and stay fast; ``benchmarks/bench_compiled.py`` times inductor.
"""

from __future__ import annotations

import logging

import pytest
import torch

import lazytensor as lt
from lazytensor.runtime import codegen, compiled

PROMPT = "The Eiffel Tower is in the city of"


class Counting:
    """A ``torch.compile`` backend that counts the graphs it is given and runs them as is."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def forcing(lm, values: torch.Tensor, compile, layer: int = 1) -> list[torch.Tensor]:
    with lm.trace(PROMPT, compile=compile):
        x = lm.model.layers[layer].mlp.down_proj.input
        x[:, -1, [3, 5]] = values  # a constant: the compiled function's input
        h = lm.model.layers[2].output[:, -1].save()
        logits = lm.output.logits.save()
    return [h, logits]


def test_compiled_replay_equals_eager_and_is_reused_across_constants(llama) -> None:
    backend = Counting()
    for value in (1.0, 2.0, -3.0, 7.5):
        values = torch.full((2,), value)
        want = forcing(llama, values, False)
        got = forcing(llama, values, backend)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    assert backend.graphs == 1  # compiled once, on the second run; constants are its inputs
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama._module.modules())


def test_numbers_assigned_into_tensors_are_inputs_too(llama) -> None:
    """``x[...] = 5.0`` then ``= 6.0``: one compilation, each run with its own number, and a
    number anywhere else (``h * 2.0``) still part of the structure."""
    backend = Counting()

    def sweep(value: float, scale: float, compile) -> list[torch.Tensor]:
        with llama.trace(PROMPT, compile=compile):
            llama.model.layers[1].mlp.down_proj.input[:, -1, [3, 5]] = value
            llama.model.layers[2].output[:, -1, 0] = -value
            h = (llama.model.layers[2].output[:, -1] * scale).save()
            logits = llama.output.logits.save()
        return [h, logits]

    for value in (1.0, 2.0, -3.0, 7.5, 1e-3):
        got, want = sweep(value, 2.0, backend), sweep(value, 2.0, False)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert backend.graphs == 1  # the second run compiled; the later values reused it
    for scale in (3.0, 3.0):
        for g, w in zip(sweep(4.0, scale, backend), sweep(4.0, scale, False), strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert backend.graphs == 2  # another multiplier is another structure


def test_a_new_structure_compiles_again(llama) -> None:
    backend = Counting()
    values = torch.full((2,), 4.0)
    for layer in (0, 0, 3, 3):
        got = forcing(llama, values, backend, layer)
        for g, w in zip(got, forcing(llama, values, False, layer), strict=True):
            torch.testing.assert_close(g, w)
    assert backend.graphs == 2


def test_reads_writes_and_invokes(llama) -> None:
    backend = Counting()

    def patch(compile):
        with llama.trace(compile=compile) as tracer:
            with tracer.invoke("The capital of France is"):
                h = llama.model.layers[1].output[:, -1]
            with tracer.invoke("The capital of Spain is"):
                llama.model.layers[1].output[:, -1] = h * 2 + 1
                out = llama.lm_head.output[:, -1].softmax(-1).save()
            with tracer.invoke():
                norm = llama.model.norm.output.norm(dim=-1).save()
        return out, norm

    want = patch(False)
    patch(backend)
    for g, w in zip(patch(backend), want, strict=True):
        torch.testing.assert_close(g, w)
    assert backend.graphs == 1


def test_what_cannot_compile_runs_eagerly_and_says_why(llama, caplog) -> None:
    backend = Counting()
    caplog.set_level(logging.INFO, logger="lazytensor")
    for _ in range(2):
        with llama.trace(PROMPT, compile=backend):
            h = lt.apply(lambda t: t * 2, llama.model.layers[0].output).save()
    with llama.trace(PROMPT):
        want = (llama.model.layers[0].output * 2).save()
    torch.testing.assert_close(h, want)
    assert "cannot be compiled" in caplog.text
    assert backend.graphs == 0


def test_compiling_after_a_number_of_runs(llama, monkeypatch) -> None:
    backend = Counting()
    monkeypatch.setattr(compiled, "AUTO_AFTER", 3)
    values = torch.full((2,), 2.0)
    with monkeypatch.context() as m:
        m.setattr(compiled, "_backend", lambda compile: backend)
        results = [forcing(llama, values, False) for _ in range(4)]
    assert backend.graphs == 1  # the third run recorded the schedule, the fourth compiled
    for got in results[1:]:
        for g, w in zip(got, results[0], strict=True):
            torch.testing.assert_close(g, w)


def test_a_materialization_stays_eager(llama) -> None:
    backend = Counting()
    with llama.trace(PROMPT, compile=backend):
        first = llama.model.layers[0].output[0, -1, 0].item()
        llama.output.logits.save()
    assert isinstance(first, float) and backend.graphs == 0


def test_no_text_of_a_graph_becomes_code(tmp_path) -> None:
    """A keyword name or a dict key that is Python source is refused, or stays data."""
    from lazytensor.core.graph import Graph, Ref
    from lazytensor.runtime.rows import Layout

    marker = tmp_path / "ran"
    evil = f"x=open({str(marker)!r}, 'w'), y"
    graph = Graph()
    graph.add("output", "layer")
    graph.add("function", "torch.add", (Ref(0), 1.0), {evil: 1})
    with pytest.raises(codegen.Unsupported, match="not a name"):
        codegen.code("moment", [0, 1], graph, Layout(1))
    graph = Graph()
    graph.add("output", "layer")
    graph.add("function", "operator.getitem", ({evil: Ref(0)}, evil))
    code = codegen.code("moment", [0, 1], graph, Layout(1))
    state = codegen.State()
    state.values, state.consts = {}, []
    code(state, torch.ones(2))
    torch.testing.assert_close(state.values[1], torch.ones(2))
    assert not marker.exists()


# -- generation ----------------------------------------------------------------------------------
GENERATE = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h"}


def steering(lm, arch: str, vector: torch.Tensor, compile, layer: int = 2) -> list:
    """Halve an MLP and steer at every step; values of the prompt step and of every step."""
    layers = lm.get(LAYERS[arch])
    with lm.generate(**GENERATE, compile=compile) as tracer:
        with tracer.invoke(PROMPT):
            start = layers[0].output[:, -1].save()  # the prompt step's, read at every step
            with tracer.all():
                layers[1].mlp.output[:] *= 0.5
                layers[layer].output[:, -1] += vector
                layers[layer].output[:, -1] += start
        with tracer.invoke("The capital of France is"):
            for _ in tracer.iter[1]:  # one step of one invoke
                layers[0].output[:] *= 2
        with tracer.invoke():
            logits = lm.lm_head.output.save()  # the prompt step's
            steps, streamed = [], []
            with tracer.all():
                steps.append(lm.lm_head.output[:, -1].save())  # one value per step
                streamed.append(lm.generator.streamer.output.save())
            each = [lm.lm_head.output[:, 0].save() for _ in tracer.iter[0:4]]  # a node per step
            tokens = tracer.result.save()
    return [tokens, logits, start, *steps, *streamed, *each]


def test_compiled_generation_equals_eager_and_is_reused_across_constants(lm, arch) -> None:
    backend = Counting()
    for value in (0.5, -1.0, 2.0):
        vector = torch.full((lm.config.hidden_size,), value)
        want = steering(lm, arch, vector, False)
        got = steering(lm, arch, vector, backend)
        assert len(got) == len(want) == 3 + 3 * GENERATE["max_new_tokens"]
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the tokens
        for g, w in zip(got[1:], want[1:], strict=True):
            torch.testing.assert_close(g, w)
    # compiled on the second run, once per kind of step: the prompt, step 1, steps 2 and 3
    assert backend.graphs == 3
    module = lm._module
    assert "forward" not in vars(module)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def halving(lm, layer: int, compile, tokens: int = 4) -> list:
    """Halve one MLP's output at every step; the tokens, and one value per step."""
    options = {**GENERATE, "max_new_tokens": tokens, "min_new_tokens": tokens}
    with lm.generate(PROMPT, **options, compile=compile) as tracer:
        steps = []
        with tracer.all():
            lm.model.layers[layer].mlp.output[:] *= 0.5
            steps.append(lm.model.layers[3].output[:, -1].save())
        tokens = tracer.result.save()
    return [tokens, *steps]


def test_a_new_generation_structure_compiles_again(llama) -> None:
    backend = Counting()
    want = {layer: halving(llama, layer, False, tokens=1) for layer in (1, 2)}
    for layer in (1, 1, 2, 2):
        for g, w in zip(halving(llama, layer, backend, tokens=1), want[layer], strict=True):
            torch.testing.assert_close(g, w)
    assert backend.graphs == 2  # two programs of one kind of step (one token: the prompt's)


def test_compiled_generation_with_aot_eager(llama) -> None:
    want = halving(llama, 2, False)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(3):
        for g, w in zip(halving(llama, 2, "aot_eager"), want, strict=True):
            torch.testing.assert_close(g, w)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2


def test_steps_of_one_kind_share_a_compilation_with_their_own_nodes_and_constants(llama) -> None:
    """``for step in tracer.iter[0:4]``: a node (and a vector) per step, one compiled decoding
    step for them all."""
    backend = Counting()

    def run(vectors: list, compile) -> list:
        with llama.generate(PROMPT, **GENERATE, compile=compile) as tracer:
            logits = [None] * 4
            for step in tracer.iter[0:4]:
                llama.model.layers[2].output[:, -1] += vectors[step]
                logits[step] = llama.lm_head.output[:, -1].save()
        return logits

    for scale in (1.0, 2.0, 3.0):
        vectors = [torch.full((llama.config.hidden_size,), scale * s) for s in range(4)]
        for g, w in zip(run(vectors, backend), run(vectors, False), strict=True):
            torch.testing.assert_close(g, w)
    assert backend.graphs == 2  # the prompt step, and every decoding step


def test_generation_that_cannot_compile_runs_eagerly_and_says_why(llama, caplog) -> None:
    backend = Counting()
    caplog.set_level(logging.INFO, logger="lazytensor")
    for compile in (backend, backend, False):
        with llama.generate(PROMPT, **GENERATE, compile=compile) as tracer:
            with tracer.all():
                doubled = lt.apply(lambda t: t * 2, llama.model.layers[0].output[:, -1]).save()
        if compile is backend:
            got = doubled
    torch.testing.assert_close(got, doubled, rtol=0, atol=0)
    assert "(python" in caplog.text and "cannot be compiled" in caplog.text
    assert backend.graphs == 0


def test_compiled_generation_stopped_early_gives_what_eager_gives(llama) -> None:
    """A generation shorter than its first run: shorter lists, and steps that never ran."""
    backend = Counting()

    def run(prompt: str, compile) -> tuple:
        options = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": 315}
        with llama.generate(prompt, **options, compile=compile) as tracer:
            steps = []
            with tracer.all():
                llama.model.layers[1].mlp.output[:] *= 0.5
                steps.append(llama.lm_head.output[:, -1].save())
            for _ in tracer.iter[3]:
                late = llama.model.layers[2].output[:, -1].save()
        return steps, late

    run("The capital of Italy is Rome and the", backend)  # 4 steps: records the schedule
    got = run("The Colosseum is in Rome. The capital", backend)  # 8 tokens too; stops at 2
    want = run("The Colosseum is in Rome. The capital", False)
    assert len(got[0]) == len(want[0]) == 2
    assert backend.graphs == 2  # the kinds of the steps that ran: the prompt's, step 1's
    torch.testing.assert_close(got[0], want[0])
    with pytest.raises(lt.TraceError, match="at step 3 never ran: generation stopped after 2"):
        _ = got[1].shape


def test_a_backend_that_fails_leaves_the_generation_eager(llama, caplog) -> None:
    calls = []

    def failing(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        calls.append(gm)
        raise RuntimeError("this backend cannot compile")

    caplog.set_level(logging.INFO, logger="lazytensor")
    want = halving(llama, 1, False)
    for _ in range(3):
        for g, w in zip(halving(llama, 1, failing), want, strict=True):
            torch.testing.assert_close(g, w)
    assert "torch.compile failed (BackendCompilerFailed)" in caplog.text
    assert len(calls) == 1  # tried once, on the second run; eager from then on
    assert "forward" not in vars(llama._module)


def test_a_program_holds_no_values_between_runs(tiny_mlp) -> None:
    """A compiled program's shared state is emptied after each run: a server's worker keeps
    up to 64 programs, and none may keep a job's intermediate values alive."""
    net = lt.Model(tiny_mlp)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        with net.trace(x, compile="aot_eager"):
            doubled = (net.layer2.output * 2.0).save()
    programs = [p for p in compiled.PROGRAMS.programs.values() if isinstance(p, compiled.Program)]
    assert programs and all(not p.state.values and not p.state.consts for p in programs)
    torch.testing.assert_close(doubled, tiny_mlp.layer2(tiny_mlp.act(tiny_mlp.layer1(x))) * 2.0)


@pytest.mark.parametrize("kind", ["trace", "generation"])
def test_a_program_that_fails_when_it_runs_leaves_its_structure_eager(llama, caplog, kind) -> None:
    """A backend whose compiled code raises at run time (as CUDA graphs did on a GPU, reading
    memory that a later replay had overwritten): that run is replayed eagerly, and so are the
    structure's later runs, each equal to the eager replay; the reason is logged once (a reason
    is logged once per process: each kind has its own)."""
    compiled_calls = []

    def breaks_when_run(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        def run(*args):
            compiled_calls.append(len(args))
            raise RuntimeError(f"{kind}: accessing memory that a later replay overwrote")

        return run

    caplog.set_level(logging.INFO, logger="lazytensor")
    values = torch.full((2,), 3.0)
    experiment = (lambda c: forcing(llama, values, c)) if kind == "trace" else (
        lambda c: halving(llama, 1, c))  # fmt: skip
    want = experiment(False)
    for _ in range(4):
        for g, w in zip(experiment(breaks_when_run), want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert len(compiled_calls) == 1  # the second run tried the program; eager from then on
    assert caplog.text.count("the compiled program failed (RuntimeError") == 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama._module.modules())
    assert "forward" not in vars(llama._module)  # a generation's step function is gone too
