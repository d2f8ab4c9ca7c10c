"""Steering during generation: add a direction to the residual stream at every decoding step.

``lm.generate`` traces ``model.generate``. Inside it, ``tracer.all()`` applies what it records
at every forward call (every decoding step), and ``tracer.iter[i:j]`` gives per-step access:
inside step ``s``, a module's output means its output at the ``s``-th forward call.

Run: python examples/steering_generation.py
"""

import torch

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

lm = lt.LanguageModel(cached_tiny_lm("llama"))  # tiny random-weight Llama, no download
layer = lm.model.layers[1]
prompts = ["The capital of France is", "Hello world"]
steps, strength = 6, 0.5  # this model's residual stream has a norm of about 0.2

# 1. A steering direction: the difference of layer 1's last-token activations on two prompts.
with lm.trace() as tracer:
    with tracer.invoke("Q: happy\nA:"):
        happy = layer.output[:, -1].save()  # (1, hidden)
    with tracer.invoke("Q: sad\nA:"):
        sad = layer.output[:, -1].save()
direction = (happy - sad) / (happy - sad).norm()  # (1, hidden), unit length

# 2. Generate twice, greedy: unsteered, then with the direction added at every step.
with lm.generate(prompts, max_new_tokens=steps, do_sample=False) as tracer:
    plain = tracer.result.save()

with lm.generate(prompts, max_new_tokens=steps, do_sample=False) as tracer:
    with tracer.all():  # at every decoding step, every position the step processes
        layer.output[:] += strength * direction
    logits = [None] * steps
    for step in tracer.iter[0:steps]:  # per step: the logits of the newest position
        logits[step] = lm.lm_head.output[:, -1].save()  # (batch, vocab)
    steered = tracer.result.save()  # (batch, prompt + new tokens), left-padded


def new_text(ids) -> list[str]:
    """The generated continuation of each row, decoded."""
    return lm.tokenizer.batch_decode(ids[:, -steps:])


for prompt, before, after in zip(prompts, new_text(plain), new_text(steered)):
    print(f"{prompt!r}\n  unsteered -> {before!r}\n  steered   -> {after!r}")

# Greedy decoding picks each step's argmax, so the saved per-step logits spell the output.
picked = torch.stack([step_logits.argmax(-1) for step_logits in logits], dim=1)  # (batch, steps)
print("per-step argmax spells the generated tokens:", torch.equal(picked, steered[:, -steps:]))
