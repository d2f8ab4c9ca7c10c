"""Compiled replay (``trace(..., compile=...)``): equal to the eager replay, reused across
constant values, recompiled for a new structure, eager (with a logged reason) when it cannot
compile.

The compile backend here is a counting one that runs the graph dynamo captured as it is, so the
tests see every compilation and stay fast; ``benchmarks/bench_compiled.py`` times inductor.
"""

from __future__ import annotations

import logging

import pytest
import torch

import lazytensor as lt
from lazytensor.runtime import compiled

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
        with llama.generate(PROMPT, max_new_tokens=2, do_sample=False, compile=backend):
            llama.model.layers[0].output[:] *= 0.5
    assert "generation runs eagerly" in caplog.text
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
    with pytest.raises(compiled.Unsupported, match="not a name"):
        compiled._code("moment", [0, 1], graph, Layout(1))
    graph = Graph()
    graph.add("output", "layer")
    graph.add("function", "operator.getitem", ({evil: Ref(0)}, evil))
    code = compiled._code("moment", [0, 1], graph, Layout(1))
    state = compiled._State()
    state.values, state.consts = {}, []
    code(state, torch.ones(2))
    torch.testing.assert_close(state.values[1], torch.ones(2))
    assert not marker.exists()
