"""Attribution patching: estimate every activation patch from one backward pass.

Activation patching copies an activation of a clean run into a corrupted run and measures how
much a metric moves: one forward pass per (layer, position). Attribution patching estimates
all of them at once with a first-order Taylor expansion around the corrupted run:

    metric(patched) - metric(corrupt) ~ (h_clean - h_corrupt) . d metric / d h_corrupt

so it needs the clean activations, the corrupted ones and the gradient of the metric with
respect to the corrupted ones: two traces, one of them with a backward pass. Here both are
computed for the residual stream after every layer at every position, then compared with real
activation patching of each (layer, position).

Run: python examples/attribution_patching.py
"""

import torch

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

lm = lt.LanguageModel(cached_tiny_lm("llama"))  # tiny random-weight Llama, no download
clean_prompt, corrupt_prompt = "The capital of France is", "The capital of Italy is"
paris, rome = lm.tokenizer(" Paris Rome").input_ids  # one token each
assert len(lm.tokenizer(clean_prompt).input_ids) == len(lm.tokenizer(corrupt_prompt).input_ids)


def logit_difference(logits):
    """The metric: how much more the model predicts ' Paris' than ' Rome' at the last token."""
    return logits[0, -1, paris] - logits[0, -1, rome]


# 1. The clean activations: (1, tokens, hidden) per layer.
with lm.trace(clean_prompt):
    clean = [layer.output.save() for layer in lm.model.layers]

# 2. The corrupted activations and the metric's gradient with respect to each of them.
with lm.trace(corrupt_prompt):
    corrupt = [layer.output.save() for layer in lm.model.layers]
    metric = logit_difference(lm.output.logits)
    corrupt_metric = metric.detach().save()  # a plain value; `metric` is the loss
    with metric.backward():  # recorded like the forward; runs after it
        grads = [layer.output.grad.save() for layer in lm.model.layers]

# The estimate of patching each (layer, position): (layers, tokens). The corrupted activations
# come from a forward pass recorded for a backward one, so no_grad keeps this arithmetic plain.
with torch.no_grad():
    estimate = torch.stack(
        [((c - k) * g).sum(-1)[0] for c, k, g in zip(clean, corrupt, grads)]  # (tokens,) each
    )

# 3. Real activation patching of every (layer, position), one trace each, for comparison.
actual = torch.zeros_like(estimate)
for index, layer in enumerate(lm.model.layers):
    for position in range(estimate.shape[1]):
        with lm.trace(corrupt_prompt):
            layer.output[:, position] = clean[index][:, position]  # a tensor: sent as a constant
            patched = logit_difference(lm.output.logits).save()
        actual[index, position] = patched - corrupt_metric

print(f"clean {clean_prompt!r}, corrupted {corrupt_prompt!r}")
print("metric: logit(' Paris') - logit(' Rome') at the last token")
print("effect of patching the residual stream after each layer (columns: token positions)")
for index in range(estimate.shape[0]):
    pairs = "  ".join(f"{e:+.3f}/{a:+.3f}" for e, a in zip(estimate[index], actual[index]))
    print(f"  layer {index}: estimate/actual {pairs}")

# Positions before the first differing token have equal activations: both sides are zero.
# Where they differ, the linear estimate should track the real effect closely.
correlation = torch.corrcoef(torch.stack([estimate.flatten(), actual.flatten()]))[0, 1].item()
print(f"correlation of attribution patching with activation patching: {correlation:.3f}")
assert correlation > 0.9, correlation
