"""tracer.cache() and tracer.stop(), and the forward ending once nothing later is needed.

Every cached value is checked against the same value kept by a hand-written forward hook on
the same model and inputs, here and on a server (in process, over a socket, through a handle).
The early end is checked with counting hooks: the modules after the last one a graph needs
never run, and what the graph kept equals a full forward's.
"""

from __future__ import annotations

import pickle

import pytest
import torch

import lazytensor as lt
from handmade import capture, counting, forward, hooked
from lazytensor.core.errors import OpNotAllowedError
from lazytensor.core.graph import Graph, Ref
from lazytensor.protocol.messages import decode_graph, encode_graph
from lazytensor_server.service import _check_node

SENTENCES = ["Q: cheap\nA:", "Q: big\nA:", "Q: fast\nA:"]
LAYERS = [f"model.layers.{i}" for i in range(4)]


def reference(lm: lt.LanguageModel, paths, prompts=SENTENCES, inputs=False) -> dict:
    """Each path's outputs (and inputs) on ``prompts``, kept by hand-written hooks."""
    kept: dict = {}
    forward(lm, prompts, *capture(lm._module, paths, kept, inputs=inputs))
    return kept


def tensors(value):
    """The tensors of a module's output (a model output also holds a key-value cache object)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
    return value


# -- cache ------------------------------------------------------------------------------------
def test_cache_of_chosen_modules_equals_hooks(where, local_llama):
    model, remote = where
    with model.trace(SENTENCES, remote=remote) as tracer:
        cache = tracer.cache(modules=[model.model.layers[2], "model.layers.3"], include_inputs=True)
    want = reference(local_llama, ["model.layers.2", "model.layers.3"], inputs=True)
    assert list(cache) == ["model.layers.2", "model.layers.3"]
    for i in (2, 3):
        entry = cache[f"model.layers.{i}"]
        assert isinstance(entry.output, torch.Tensor)  # real tensors after the trace
        torch.testing.assert_close(entry.output, want[f"model.layers.{i}"][0])
        torch.testing.assert_close(entry.input, want[f"model.layers.{i}:in"][0])
        torch.testing.assert_close(entry.inputs[0][0], want[f"model.layers.{i}:in"][0])
    # both spellings, negative indexes too
    assert cache.model.layers[2].output is cache["model.layers.2"].output
    assert cache.model.layers[-1].output is cache["model.layers.3"].output


def test_cache_of_every_module_equals_hooks(local_llama, inproc_client):
    called = {
        p for p, m in local_llama._module.named_modules() if not isinstance(m, torch.nn.ModuleList)
    }
    want = reference(local_llama, sorted(called))
    for remote in (False, inproc_client):
        with local_llama.trace(SENTENCES, remote=remote) as tracer:
            cache = tracer.cache()
        assert set(cache) == set(want)  # every module the forward called, root ("") included
        for path, outputs in want.items():
            torch.testing.assert_close(tensors(cache[path].output), tensors(outputs[0]))
        torch.testing.assert_close(cache.output.logits, want[""][0].logits)


def test_cache_of_a_module_the_forward_skips_leaves_it_out(gpt2):
    """GPT-2's attention dropout is never called (sdpa): the every-module cache leaves it out,
    while naming it explicitly is an error at the user's line."""
    with gpt2.trace("Hello world") as tracer:
        cache = tracer.cache()
    assert "transformer.h.0.attn.attn_dropout" not in cache
    assert "transformer.h.0.attn" in cache
    with pytest.raises(lt.GraphError, match=r"test_cache.py:\d+ .*never called"):
        with gpt2.trace("Hello world") as tracer:
            tracer.cache(modules=["transformer.h.0.attn.attn_dropout"])


def test_cache_in_generation_holds_one_value_per_step(where, local_llama):
    model, remote = where
    options = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    with model.generate("Hello world", remote=remote, **options) as tracer:
        cache = tracer.cache(modules=["model.layers.1"])
        tokens = tracer.result.save()
    kept: dict = {}
    with torch.no_grad(), hooked(*capture(local_llama._module, ["model.layers.1"], kept)):
        want_tokens = local_llama.generate("Hello world", trace=False, **options)
    steps = cache["model.layers.1"].output
    assert isinstance(steps, list) and len(steps) == 3
    torch.testing.assert_close(steps, kept["model.layers.1"])
    torch.testing.assert_close(tokens, want_tokens)


def test_cache_pickles_and_holds_no_trace(local_llama):
    with local_llama.trace("Hello world") as tracer:
        cache = tracer.cache(modules=["model.layers.0"])
    again = pickle.loads(pickle.dumps(cache))
    torch.testing.assert_close(again["model.layers.0"].output, cache.model.layers[0].output)


# -- the forward ends early -------------------------------------------------------------------
def test_forward_ends_after_the_last_module_the_graph_needs(local_llama):
    full = reference(local_llama, LAYERS)
    with counting(local_llama._module) as calls:
        with local_llama.trace(SENTENCES) as tracer:
            cache = tracer.cache(modules=LAYERS[:2])
    assert calls["model.layers.1"] == 1
    assert calls["model.layers.2"] == calls["model.layers.3"] == calls["lm_head"] == 0
    for path in LAYERS[:2]:
        torch.testing.assert_close(cache[path].output, full[path][0])


def test_forward_ends_early_on_a_server(local_llama, inproc_client, served_llama):
    full = reference(local_llama, LAYERS)
    with counting(served_llama.module) as calls:  # the server's own copy of the model
        with local_llama.trace(SENTENCES, remote=inproc_client):
            h = local_llama.model.layers[1].output.save()
    assert calls["model.layers.1"] == 1 and calls["model.layers.2"] == calls["lm_head"] == 0
    torch.testing.assert_close(h, full["model.layers.1"][0])


def test_forward_runs_whole_when_the_output_is_needed(local_llama):
    with counting(local_llama._module) as calls:
        with local_llama.trace(SENTENCES):
            local_llama.model.layers[1].output[:] = 0
            logits = local_llama.output.logits.save()
    assert calls["lm_head"] == 1
    zeroed = forward(local_llama, SENTENCES, (local_llama._module.model.layers[1], "post", _zero))
    torch.testing.assert_close(logits, zeroed)


def _zero(module, args, output):
    output[:] = 0


def test_generation_with_repeating_edits_runs_every_step(local_llama):
    with local_llama.generate("Hello", max_new_tokens=3, min_new_tokens=3) as tracer:
        with tracer.all():
            local_llama.model.layers[0].output[:] *= 1.0
    with counting(local_llama._module) as calls:
        with local_llama.generate("Hello", max_new_tokens=3, min_new_tokens=3) as tracer:
            with tracer.all():
                local_llama.model.layers[0].mlp.output[:] *= 1.0
    assert calls["lm_head"] == 3  # a node that repeats waits for every step: no early end


# -- tracer.stop() ----------------------------------------------------------------------------
def test_stop_ends_the_forward_where_it_is_recorded(where, local_llama, served_llama, request):
    model, remote = where
    counted = request.node.callspec.params["where"] != "process"  # else another process ran it
    full = reference(local_llama, LAYERS)
    module = local_llama._module if model is local_llama and not remote else served_llama.module
    with counting(module) as calls:
        with model.trace(SENTENCES, remote=remote) as tracer:
            h = model.model.layers[0].output.save()
            tracer.stop()
    assert not counted or (calls["model.layers.0"] == 1 and calls["model.layers.1"] == 0)
    torch.testing.assert_close(h, full["model.layers.0"][0])


def test_stop_ends_a_generation(local_llama):
    with counting(local_llama._module) as calls:
        with local_llama.generate("Hello", max_new_tokens=4) as tracer:
            cache = tracer.cache(modules=["model.layers.0"])  # every step, so no early end
            tracer.stop()
    assert len(cache["model.layers.0"].output) == 1  # the first step, then the stop
    assert calls["model.layers.0"] == 1 and calls["lm_head"] == 0


def test_stop_first_runs_no_forward(local_llama):
    with counting(local_llama._module) as calls:
        with local_llama.trace("Hello") as tracer:
            tracer.stop()
    assert sum(calls.values()) == 0


def test_stop_node_reads_what_came_before_and_crosses_the_wire(local_llama):
    graph = _recorded_stop(local_llama)
    stop = graph.nodes[-1]
    assert stop.op == "stop" and stop.target == ""
    assert stop.args == (Ref(graph.nodes[-2].id),)  # the sink: everything else is before it
    back = decode_graph(encode_graph(graph), graph.constants)
    assert back.nodes[-1].op == "stop" and back.nodes[-1].args == stop.args


class _Leave(Exception):
    pass


def _recorded_stop(lm: lt.LanguageModel) -> Graph:
    tracer = lm.trace("Hello")
    try:
        with tracer:
            h = lm.model.layers[0].output * 2
            h.save()
            tracer.stop()
            raise _Leave
    except _Leave:
        pass
    return tracer.graph


def test_server_refuses_a_stop_with_a_target(served_llama):
    graph = Graph()
    graph.add("stop", "model.layers.0", ())
    with pytest.raises(OpNotAllowedError, match="no target"):
        _check_node(graph.nodes[0], served_llama, trusted=False)


# -- bad input --------------------------------------------------------------------------------
def test_unknown_module_in_cache_is_a_clear_error(local_llama):
    with pytest.raises(AttributeError, match=r"tracer.cache\(modules=...\).*did you mean 'layers'"):
        with local_llama.trace("Hello") as tracer:
            tracer.cache(modules=["model.layerz.3"])
    with pytest.raises(TypeError, match="not a module"):
        with local_llama.trace("Hello") as tracer:
            tracer.cache(modules=["lm_head.weight"])
    with pytest.raises(TypeError, match="envoys"):
        with local_llama.trace("Hello") as tracer:
            tracer.cache(modules=[3])


def test_another_models_module_is_refused(local_llama, gpt2):
    with pytest.raises(lt.TraceError, match="another model"):
        with local_llama.trace("Hello") as tracer:
            tracer.cache(modules=[gpt2.transformer.h[0]])


def test_reading_what_the_cache_does_not_hold(local_llama):
    with local_llama.trace("Hello") as tracer:
        cache = tracer.cache(modules=["model.layers.0"])
    with pytest.raises(KeyError, match="'model.layers.1' is not in this cache"):
        _ = cache.model.layers[1].output
    with pytest.raises(AttributeError, match="include_inputs=True"):
        _ = cache["model.layers.0"].input


def test_recording_after_stop_is_an_error(local_llama):
    with pytest.raises(
        lt.TraceError, match=r"test_cache.py:\d+ .*after tracer.stop\(\) \(at .*test_cache.py:\d+"
    ):
        with local_llama.trace("Hello") as tracer:
            tracer.stop()
            local_llama.model.layers[0].output.save()


def test_a_value_computed_later_is_still_a_failure(local_llama):
    with pytest.raises(lt.GraphError, match="computed later"):
        with local_llama.trace("Hello") as tracer:
            tracer.cache(modules=["model.layers.0"])
            local_llama.model.layers[0].output = local_llama.model.layers[2].output
