"""Generation oracle tests: ``lm.generate`` against a hand-hooked ``model.generate``.

The reference is the same Hugging Face model's ``generate(..., do_sample=False)`` on inputs
padded here by hand, with hooks written out: one that scales the MLP output in place at the
chosen forward calls, one that records the last position of ``lm_head``'s output at every
call. ``min_new_tokens`` keeps the end-of-sequence token from stopping either side early, so
every run makes exactly ``max_new_tokens`` forward calls.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import lazytensor as lt

PROMPTS = ["Hello world", "The capital of France is"]
STEPS = 8
OPTIONS = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False}
MLP = {"llama": "model.layers.1.mlp", "gpt2": "transformer.h.1.mlp"}


def reference(
    lm: lt.LanguageModel, mlp: str, scaled_calls=(), rows=slice(None)
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Hand-hooked greedy generation: the generated ids and ``lm_head``'s last position per step.

    The MLP at ``mlp`` has its output's ``rows`` halved in place at the forward calls in
    ``scaled_calls``.
    """
    tokenizer, hf = lm.tokenizer, lm._module
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width, pad = max(map(len, encoded)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in encoded])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in encoded])  # (B, T)
    calls, logits = [0], []

    def scale(module, args, output):
        if calls[0] in scaled_calls:
            output[rows] *= 0.5
        calls[0] += 1

    def record(module, args, output):
        logits.append(output[:, -1].clone())

    handles = [
        hf.get_submodule(mlp).register_forward_hook(scale),
        hf.lm_head.register_forward_hook(record),
    ]
    try:
        with torch.no_grad():
            tokens = hf.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **OPTIONS)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] == len(logits) == STEPS and tokens.shape == (len(PROMPTS), width + STEPS)
    return tokens, logits


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def check_all_steps(lm: lt.LanguageModel, arch: str, tokens, logits) -> None:
    want_tokens, want_logits = reference(lm, MLP[arch], scaled_calls=range(STEPS))
    exact(tokens, want_tokens)
    assert len(logits) == STEPS
    for got, want in zip(logits, want_logits):
        exact(got, want)
    _, plain = reference(lm, MLP[arch])
    assert not torch.allclose(logits[0], plain[0])  # the intervention did something


def test_generate_scaling_every_step_llama(llama):
    lm, prompts = llama, PROMPTS
    with lm.generate(prompts, max_new_tokens=8, min_new_tokens=8, do_sample=False) as tracer:
        with tracer.all():  # applied at every decoding step
            lm.model.layers[1].mlp.output[:] *= 0.5
        logits = [None] * 8
        for step in tracer.iter[0:8]:  # per-step access; step i = the i-th forward call
            logits[step] = lm.lm_head.output[:, -1].save()
        tokens = tracer.result.save()  # the generated ids
    check_all_steps(lm, "llama", tokens, logits)


def test_generate_scaling_every_step_gpt2(gpt2):
    lm, prompts = gpt2, PROMPTS
    with lm.generate(prompts, max_new_tokens=8, min_new_tokens=8, do_sample=False) as tracer:
        with tracer.all():
            lm.transformer.h[1].mlp.output[:] *= 0.5
        logits = [None] * 8
        for step in tracer.iter[0:8]:
            logits[step] = lm.lm_head.output[:, -1].save()
        tokens = tracer.result.save()
    check_all_steps(lm, "gpt2", tokens, logits)


def test_generate_intervention_at_one_step(lm, arch):
    with lm.generate(PROMPTS, **OPTIONS) as tracer:
        for _ in tracer.iter[2]:
            lm.get(MLP[arch]).output[:] *= 0.5
        logits = [lm.lm_head.output[:, -1].save() for _ in tracer.iter[0:STEPS]]
        tokens = tracer.result.save()
    want_tokens, want_logits = reference(lm, MLP[arch], scaled_calls={2})
    exact(tokens, want_tokens)
    for got, want in zip(logits, want_logits, strict=True):
        exact(got, want)
    _, plain = reference(lm, MLP[arch])
    exact(logits[1], plain[1])
    assert not torch.allclose(logits[2], plain[2])


def test_generate_invokes_touch_only_their_rows(lm, arch):
    with lm.generate(**OPTIONS) as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = tracer.result.save()
        with tracer.invoke(PROMPTS[1]):
            with tracer.all():
                lm.get(MLP[arch]).output[:] *= 0.5
        with tracer.invoke():
            logits = [lm.lm_head.output[:, -1].save() for _ in tracer.iter[0:STEPS]]
            tokens = tracer.result.save()
    want_tokens, want_logits = reference(lm, MLP[arch], scaled_calls=range(STEPS), rows=slice(1, 2))
    exact(tokens, want_tokens)
    for got, want in zip(logits, want_logits, strict=True):
        exact(got, want)
    exact(first, want_tokens[:1])
    plain, _ = reference(lm, MLP[arch])
    exact(first, plain[:1])


def test_shape_inside_generate(lm, arch):
    hf, real_calls = lm._module, []

    def count(module, args, kwargs):
        if not isinstance(kwargs["input_ids"], FakeTensor):
            real_calls.append(1)

    handle = hf.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with lm.generate(PROMPTS, **OPTIONS):
            shape = lm.get(MLP[arch]).output.shape
            assert real_calls == []
    finally:
        handle.remove()
    width = max(len(lm.tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert shape == (len(PROMPTS), width, hf.config.hidden_size)  # the first (prompt) step
    assert len(real_calls) == STEPS


def test_iteration_past_max_new_tokens_names_the_line_when_read(lm):
    """Steps past the end never run: the run keeps the others, and reading one names its line."""
    before = sum(len(m._forward_hooks) for m in lm._module.modules())
    with lm.generate(PROMPTS, **OPTIONS) as tracer:
        logits = [lm.lm_head.output.save() for _ in tracer.iter[0 : STEPS + 2]]
    assert tracer.state.value == "done"
    assert all(isinstance(t, torch.Tensor) for t in logits[:STEPS])
    with pytest.raises(lt.TraceError) as info:
        _ = logits[STEPS].shape
    message = str(info.value)
    assert "test_generate.py:" in message and '"logits = [lm.lm_head.output.save()' in message
    assert f"step {STEPS} never ran" in message and f"stopped after {STEPS} steps" in message
    assert sum(len(m._forward_hooks) for m in lm._module.modules()) == before


def test_a_value_of_the_prompt_step_is_read_at_every_step(lm, arch):
    """A vector read once, at the prompt, and added at every step stays for every step."""
    with lm.generate(PROMPTS, **OPTIONS) as tracer:
        vec = lm.get(MLP[arch]).output[:, -1] * 0.01  # the prompt step's
        with tracer.all():
            lm.get(MLP[arch]).output[:, -1] += vec
        logits = [lm.lm_head.output[:, -1].save() for _ in tracer.iter[0:STEPS]]
    tokenizer, hf = lm.tokenizer, lm._module
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kept, seen = [], []

    def steer(module, args, output):
        if not kept:
            kept.append(output[:, -1] * 0.01)
        output[:, -1] += kept[0]

    handles = [
        hf.get_submodule(MLP[arch]).register_forward_hook(steer),
        hf.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[:, -1].clone())),
    ]
    try:
        with torch.no_grad():
            hf.generate(**encoded, pad_token_id=tokenizer.pad_token_id, **OPTIONS)
    finally:
        for handle in handles:
            handle.remove()
    for got, want in zip(logits, seen, strict=True):
        exact(got, want)
