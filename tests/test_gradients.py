"""Gradients inside a trace: ``loss.backward()``, ``h.grad`` reads and writes, weights' grads.

Every value is checked against the same backward pass written by hand with forward hooks and
``retain_grad``/tensor hooks on the same model, and every remote run against the local one.
"""

from __future__ import annotations

import pytest
import torch

import lazytensor as lt
from lazytensor.core.errors import GraphError, TraceError
from servers import MODEL

PROMPT = "The Eiffel Tower is in the city of"
TARGET = 7


def tokens(lm: lt.LanguageModel, text=PROMPT) -> dict:
    return dict(lm.tokenizer(text, return_tensors="pt", padding=True))


def reference(lm, layer: int, *, zero_at: int | None = None, upstream: int | None = None):
    """By hand: the loss's gradient at ``layers[layer]``'s output (and, when ``zero_at`` zeroes
    the gradient at that layer, at ``layers[upstream]``), with ``retain_grad`` and hooks."""
    model, kept = lm._module, {}
    handles = []
    for index in {layer, zero_at, upstream} - {None}:

        def keep(module, args, output, index=index):
            output.retain_grad()
            kept[index] = output
            if index == zero_at:
                output.register_hook(lambda g: g * 0)

        handles.append(model.model.layers[index].register_forward_hook(keep))
    try:
        out = model(**tokens(lm))
        out.logits[0, -1].log_softmax(-1)[TARGET].backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return {i: t.grad for i, t in kept.items()}


def test_reading_a_gradient_equals_a_hand_written_backward(llama: lt.LanguageModel) -> None:
    with llama.trace(PROMPT):
        h = llama.model.layers[2].output
        loss = llama.output.logits[0, -1].log_softmax(-1)[TARGET]
        with loss.backward():
            grad = h.grad.save()
    llama._module.zero_grad(set_to_none=True)
    assert isinstance(grad, torch.Tensor)
    torch.testing.assert_close(grad, reference(llama, 2)[2])


def test_gpt2_gradient(gpt2: lt.LanguageModel) -> None:
    with gpt2.trace(PROMPT):
        h = gpt2.transformer.h[1].output
        loss = gpt2.output.logits[0, -1].log_softmax(-1)[TARGET]
        with loss.backward():
            grad = h.grad.save()
    gpt2._module.zero_grad(set_to_none=True)
    model, kept = gpt2._module, {}

    def keep(module, args, output):
        output.retain_grad()
        kept["h"] = output

    handle = model.transformer.h[1].register_forward_hook(keep)
    try:
        model(**tokens(gpt2)).logits[0, -1].log_softmax(-1)[TARGET].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grad, kept["h"].grad)


def test_replacing_a_gradient_changes_everything_upstream(llama: lt.LanguageModel) -> None:
    with llama.trace(PROMPT):
        early = llama.model.layers[0].output
        late = llama.model.layers[2].output
        loss = llama.output.logits[0, -1].log_softmax(-1)[TARGET]
        with loss.backward():
            seen = late.grad.save()  # what reached it, before the write
            late.grad = late.grad * 0
            upstream = early.grad.save()
    llama._module.zero_grad(set_to_none=True)
    want = reference(llama, 2, zero_at=2, upstream=0)
    torch.testing.assert_close(seen, reference(llama, 2)[2])
    torch.testing.assert_close(upstream, want[0])
    assert upstream.abs().sum() == 0  # all of layer 0's gradient flows through layer 2


def test_two_backward_passes_in_one_trace(llama: lt.LanguageModel) -> None:
    with llama.trace(PROMPT):
        h = llama.model.layers[1].output
        logits = llama.output.logits[0, -1].log_softmax(-1)
        with logits[TARGET].backward(retain_graph=True):
            first = h.grad.clone().save()
        with logits[TARGET + 1].backward():
            second = h.grad.clone().save()
    llama._module.zero_grad(set_to_none=True)
    model, kept = llama._module, {}
    handle = model.model.layers[1].register_forward_hook(lambda m, a, o: kept.update(h=o))
    try:
        out = model(**tokens(llama)).logits[0, -1].log_softmax(-1)
    finally:
        handle.remove()
    (want_first,) = torch.autograd.grad(out[TARGET], kept["h"], retain_graph=True)
    (want_second,) = torch.autograd.grad(out[TARGET + 1], kept["h"])
    torch.testing.assert_close(first, want_first)
    torch.testing.assert_close(second, want_second)
    assert not torch.allclose(first, second)


def test_a_weights_gradient(llama: lt.LanguageModel) -> None:
    with llama.trace(PROMPT):
        loss = llama.output.logits[0, -1].log_softmax(-1)[TARGET]
        with loss.backward():
            grad = llama.lm_head.weight.grad.save()
    model = llama._module
    model.zero_grad(set_to_none=True)
    model(**tokens(llama)).logits[0, -1].log_softmax(-1)[TARGET].backward()
    want = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grad, want)


def test_frozen_weights_still_give_activation_gradients(llama_path) -> None:
    """With every weight frozen nothing requires grad; the read value is made to."""
    lm = lt.LanguageModel(llama_path)
    lm._module.requires_grad_(False)
    with lm.trace(PROMPT):
        h = lm.model.layers[2].output
        loss = lm.output.logits[0, -1].log_softmax(-1)[TARGET]
        with loss.backward():
            grad = h.grad.save()
    assert all(p.grad is None and not p.requires_grad for p in lm._module.parameters())
    unfrozen = lt.LanguageModel(llama_path)
    torch.testing.assert_close(grad, reference(unfrozen, 2)[2])


def test_a_forward_only_trace_stays_without_grad(llama: lt.LanguageModel) -> None:
    with llama.trace(PROMPT):
        logits = llama.output.logits.save()
    assert not logits.requires_grad and logits.grad_fn is None


def test_grad_outside_a_backward_block_is_an_error(llama: lt.LanguageModel) -> None:
    with pytest.raises(TraceError, match=r"test_gradients.py:\d+.*loss.backward"):
        with llama.trace(PROMPT):
            llama.model.layers[0].output.grad.save()


def test_a_gradient_that_never_arrives_names_the_line(llama: lt.LanguageModel) -> None:
    with pytest.raises(GraphError, match=r"test_gradients.py:\d+.*no gradient reached"):
        with llama.trace(PROMPT):
            h = llama.model.layers[1].output
            piece = h[:, -1] * 2  # computed from h, but not what the model went on with
            loss = llama.output.logits[0, -1].sum()
            with loss.backward():
                piece.grad.save()
    llama._module.zero_grad(set_to_none=True)


def test_weights_are_read_only_in_a_trace(llama: lt.LanguageModel) -> None:
    before = llama._module.lm_head.weight.detach().clone()
    for write, error, match in (
        (lambda w: w.__setitem__(0, 0.0), GraphError, "read-only"),
        (lambda w: w.mul_(0), GraphError, "read-only"),
        (lambda w: w.detach().zero_(), GraphError, "read-only"),
        (lambda w: w.data.zero_(), AttributeError, "no attribute 'data'"),
    ):
        with pytest.raises(error, match=match):
            with llama.trace(PROMPT):
                write(llama.lm_head.weight)
                llama.output.logits.save()
    assert torch.equal(llama._module.lm_head.weight, before)


def test_a_weight_can_be_read_and_used(llama: lt.LanguageModel) -> None:
    with llama.trace(PROMPT):
        h = llama.model.norm.output[0, -1]
        lens = (h @ llama.lm_head.weight.T).save()
        logits = llama.output.logits[0, -1].save()
    torch.testing.assert_close(lens, logits)


def gradients(model, remote) -> list[torch.Tensor]:
    with model.trace(PROMPT, remote=remote):
        early = model.model.layers[0].output
        late = model.model.layers[2].output
        loss = model.output.logits[0, -1].log_softmax(-1)[TARGET]
        with loss.backward():
            seen = late.grad.save()
            late.grad = late.grad * 0.5
            up = early.grad.save()
            weight = model.lm_head.weight.grad.save()
    return [seen, up, weight]


@pytest.mark.parametrize("how", ["inproc", "socket", "process"])
def test_remote_gradients_equal_local(how, local_llama, served_llama, request) -> None:
    client = request.getfixturevalue(f"{how}_client")
    want = gradients(local_llama, False)
    local_llama._module.zero_grad(set_to_none=True)
    got = gradients(local_llama, client)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    weights = served_llama.module.parameters()
    assert all(p.grad is None for p in weights)  # the server's weights got nothing


def test_a_served_handle_reads_gradients(inproc_client, local_llama) -> None:
    handle = inproc_client.model(MODEL)
    want = gradients(local_llama, False)
    local_llama._module.zero_grad(set_to_none=True)
    for g, w in zip(gradients(handle, False), want, strict=True):
        torch.testing.assert_close(g, w)


def test_each_invoke_reads_the_gradient_of_its_rows(llama: lt.LanguageModel) -> None:
    """Two invokes, one backward pass over both: each reads and rewrites its own rows."""
    prompts = ["Paris is in France", "Rome is in Italy"]
    with llama.trace() as tracer:
        with tracer.invoke(prompts[0]):
            first = llama.model.layers[2].output
        with tracer.invoke(prompts[1]):
            second = llama.model.layers[2].output
            early = llama.model.layers[0].output
        with tracer.invoke():
            loss = llama.output.logits[:, -1].log_softmax(-1)[:, TARGET].sum()
        with loss.backward():
            g_first = first.grad.save()
            g_second = second.grad.save()
            first.grad = first.grad * 0  # only row 0 of layer 2's gradient
            g_early = early.grad.save()
    model, kept = llama._module, {}

    def keep(module, args, output, index):
        output.retain_grad()
        kept[index] = output
        if index == 2:
            output.register_hook(lambda g: kept.update(arrived=g.clone()))
            output.register_hook(lambda g: torch.cat([g[:1] * 0, g[1:]]))

    handles = [model.model.layers[i].register_forward_hook(
        lambda m, a, o, i=i: keep(m, a, o, i)) for i in (0, 2)]  # fmt: skip
    try:
        inputs = dict(llama.tokenizer(prompts, return_tensors="pt", padding=True))
        model(**inputs).logits[:, -1].log_softmax(-1)[:, TARGET].sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(g_first, kept["arrived"][:1])
    torch.testing.assert_close(g_second, kept["arrived"][1:])
    torch.testing.assert_close(g_early, kept[0].grad[1:])
    assert kept[0].grad[:1].abs().sum() == 0  # row 0 got nothing past the rewritten layer 2


def test_a_served_weight_outside_a_trace_says_where_it_lives(served_handle) -> None:
    with pytest.raises(AttributeError, match="lives on the server: read it inside a trace"):
        served_handle.lm_head.weight  # noqa: B018
    with served_handle.trace(PROMPT):
        shape = served_handle.lm_head.weight.shape
        weight = served_handle.lm_head.weight.save()
    assert weight.shape == shape
