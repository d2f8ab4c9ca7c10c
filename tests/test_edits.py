"""envoy.skip(...) and model.edit(): checked against the same change made with plain hooks.

A skipped module must really not run: counting hooks on it and on every module inside it see
no call, here and on a server. Edits must apply to every later trace of the edited wrapper
(and of nothing else), also when the trace runs on a server, since they travel as graph nodes.
"""

from __future__ import annotations

import pytest
import torch

import lazytensor as lt
from handmade import counting, forward, hooked
from lazytensor.core.errors import OpNotAllowedError
from lazytensor.core.graph import Graph
from lazytensor_server.service import _check_node

SENTENCES = ["Q: cheap\nA:", "Q: big\nA:", "Q: fast\nA:"]
MLP = "model.layers.1.mlp"


def module_of(model, remote, local_llama, served_llama) -> torch.nn.Module:
    """The module a run of ``model`` really uses: the local one, or the server's."""
    return local_llama._module if model is local_llama and not remote else served_llama.module


def doubled_input(module, args, output):
    return args[0] * 2  # the hand-written skip: output = 2 * input


def zeroed(module, args, output):
    return torch.zeros_like(output)


# -- skip -------------------------------------------------------------------------------------
def test_skip_with_a_value_computed_from_the_input(where, local_llama, served_llama, request):
    model, remote = where
    counted = request.node.callspec.params["where"] != "process"  # else another process ran it
    with counting(module_of(model, remote, local_llama, served_llama)) as calls:
        with model.trace(SENTENCES, remote=remote):
            mlp = model.model.layers[1].mlp
            mlp.skip(mlp.input * 2)
            out = mlp.output.save()
            logits = model.output.logits.save()
    if counted:
        assert calls[MLP] == 1  # the call happened (its hooks fire) ...
        inside = [p for p in calls if p.startswith(MLP + ".")]
        assert inside == []  # ... but nothing inside the MLP ran
    hf_mlp = local_llama._module.get_submodule(MLP)
    kept: list = []
    want = forward(
        local_llama,
        SENTENCES,
        (hf_mlp, "post", doubled_input),
        (hf_mlp, "post", lambda m, a, o: kept.append(o)),
    )
    torch.testing.assert_close(logits, want)
    torch.testing.assert_close(out, kept[0])


def test_skipped_module_forward_never_executes(local_llama):
    hf_mlp = local_llama._module.get_submodule(MLP)
    ran = []
    original = type(hf_mlp).forward

    def counted(self, *args, **kwargs):
        ran.append(1)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(hf_mlp), "forward", counted)
        with local_llama.trace("Hello world"):
            local_llama.model.layers[1].mlp.skip(torch.zeros(1, 2, 64))
            h = local_llama.model.layers[1].output.save()
            local_llama.output.logits.save()  # the whole forward runs
        assert len(ran) == 3  # the three other layers' MLPs ran; layer 1's did not
    assert "forward" not in hf_mlp.__dict__  # the stand-in is gone after the run
    want = forward(local_llama, "Hello world", (hf_mlp, "post", zeroed))
    with local_llama.trace("Hello world"):
        local_llama.model.layers[1].mlp.output = torch.zeros(1, 2, 64)
        logits = local_llama.output.logits.save()
    torch.testing.assert_close(logits, want)
    assert h.shape == (1, 2, 64)


def test_skip_outside_a_trace_is_an_error(local_llama):
    with pytest.raises(lt.TraceError, match=r"\.skip\(\) of module 'model.layers.1.mlp'.*no trace"):
        local_llama.model.layers[1].mlp.skip(torch.zeros(1))


def test_skip_of_the_root_is_an_error(local_llama):
    with pytest.raises(lt.TraceError, match="root module cannot be skipped"):
        with local_llama.trace("Hello"):
            local_llama.skip(torch.zeros(1))


def test_skip_inside_one_invoke_is_refused(local_llama):
    with pytest.raises(lt.GraphError, match=r"test_edits.py:\d+ .*some rows only"):
        with local_llama.trace() as tracer:
            with tracer.invoke("Hello"):
                local_llama.model.layers[1].mlp.skip(torch.zeros(1, 1, 64))
            with tracer.invoke("World"):
                local_llama.model.layers[1].output.save()


def test_server_refuses_a_skip_of_the_root(served_llama):
    graph = Graph()
    graph.add("skip", "", (0.0,))
    with pytest.raises(OpNotAllowedError, match="skip of '' refused"):
        _check_node(graph.nodes[0], served_llama, trusted=False)
    graph.add("skip", "model.layerz", (0.0,))
    with pytest.raises(AttributeError, match="no module 'model.layerz'"):
        _check_node(graph.nodes[1], served_llama, trusted=False)


# -- edits ------------------------------------------------------------------------------------
def test_edit_applies_to_every_later_trace_of_the_edited_model(where, local_llama):
    model, remote = where
    with model.edit() as (tracer, edited):
        edited.model.layers[0].mlp.output[:] = 0
    assert isinstance(tracer, lt.Trace) and edited is not model
    assert edited._module is model._module  # the same module: no weights copied
    want = forward(
        local_llama, SENTENCES, (local_llama._module.model.layers[0].mlp, "post", zeroed)
    )
    clean = forward(local_llama, SENTENCES)
    for _ in range(2):
        with edited.trace(SENTENCES, remote=remote):
            logits = edited.output.logits.save()
        torch.testing.assert_close(logits, want)
    with model.trace(SENTENCES, remote=remote):
        untouched = model.output.logits.save()
    torch.testing.assert_close(untouched, clean)


def test_edit_nodes_come_first_in_each_trace(local_llama):
    with local_llama.edit() as (_, edited):
        edited.model.layers[0].mlp.output[:] = 0
    tracer = edited.trace("Hello")
    with tracer:
        edited.model.layers[2].output.save()
    ops = [n.op for n in tracer.graph.nodes]
    assert ops[0] == "output" and tracer.graph.nodes[0].target == "model.layers.0.mlp"
    assert ops[-1] == "output" and tracer.graph.nodes[-1].target == "model.layers.2"


def test_inplace_edit_yields_the_model_and_clear_edits_drops_it(local_llama):
    model = lt.LanguageModel(local_llama._module, tokenizer=local_llama.tokenizer)
    with model.edit(inplace=True) as (tracer, edited):
        model.model.layers[0].mlp.output[:] = 0
    assert edited is model and isinstance(tracer, lt.Trace)
    want = forward(local_llama, "Hello", (local_llama._module.model.layers[0].mlp, "post", zeroed))
    assert torch.equal(model.trace("Hello", trace=False).logits, want)  # trace=False too
    model.clear_edits()
    with model.trace("Hello"):
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, forward(local_llama, "Hello"))


def test_later_edits_add_to_earlier_ones(local_llama):
    with local_llama.edit() as (_, once):
        once.model.layers[0].mlp.output[:] = 0
    with once.edit() as (_, twice):
        twice.model.layers[2].mlp.output[:] = 0
    hf = local_llama._module.model.layers
    want = forward(local_llama, "Hello", (hf[0].mlp, "post", zeroed), (hf[2].mlp, "post", zeroed))
    with twice.trace("Hello"):
        logits = twice.output.logits.save()
    torch.testing.assert_close(logits, want)


def test_edit_with_a_skip_on_a_remote_handle(served_handle, local_llama, served_llama):
    with served_handle.edit() as (_, edited):
        mlp = edited.model.layers[1].mlp
        mlp.skip(mlp.input * 2)
    with counting(served_llama.module) as calls:
        with edited.trace(SENTENCES):
            logits = edited.output.logits.save()
    assert not [p for p in calls if p.startswith(MLP + ".")]
    hf_mlp = local_llama._module.get_submodule(MLP)
    torch.testing.assert_close(
        logits, forward(local_llama, SENTENCES, (hf_mlp, "post", doubled_input))
    )


def test_edit_at_every_generation_step(local_llama):
    options = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    with local_llama.edit() as (tracer, edited):
        with tracer.all():
            edited.model.layers[0].mlp.output[:] = 0
    with edited.generate("Hello", **options) as tracer:
        tokens = tracer.result.save()
    hf_mlp = local_llama._module.model.layers[0].mlp
    with torch.no_grad(), hooked((hf_mlp, "post", zeroed)):
        want = local_llama.generate("Hello", trace=False, **options)
    torch.testing.assert_close(tokens, want)


def test_saving_or_inputs_inside_an_edit_is_an_error(local_llama):
    with pytest.raises(lt.TraceError, match=r"saved inside an edit \(at .*test_edits.py:\d+"):
        with local_llama.edit() as (_, edited):
            edited.model.layers[0].output.save()
    with pytest.raises(lt.TraceError, match="an edit takes no inputs"):
        with local_llama.edit() as (tracer, edited):
            with tracer.invoke("Hello"):
                edited.model.layers[0].output[:] = 0
    with pytest.raises(lt.TraceError, match="stop"):
        with local_llama.edit() as (tracer, edited):
            tracer.stop()
