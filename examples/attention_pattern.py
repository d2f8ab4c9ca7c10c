"""Attention patterns: read and edit values inside a module's forward with ``.source``.

The attention pattern has no module of its own: it is the result of a ``softmax`` call inside
the attention's forward. ``module.source`` names every call of that forward (print it to see
them), and ``.source.softmax_0.output`` reads or writes that call's result like a module's
output, under the fused SDPA kernel too (the call then runs as eager attention).

Run: python examples/attention_pattern.py
"""

import torch

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

path = cached_tiny_lm("llama")
lm = lt.LanguageModel(path)  # SDPA attention, the default
prompt = "The Eiffel Tower is in"

# The sites of the attention's forward, each with its source line (the first few here).
print("\n".join(str(lm.model.layers[0].self_attn.source).splitlines()[:4]) + "\n  ...")

with lm.trace(prompt):
    # One pattern per layer: (batch, heads, query tokens, key tokens).
    patterns = [layer.self_attn.source.softmax_0.output.save() for layer in lm.model.layers]
    logits = lm.output.logits.save()

tokens = [lm.tokenizer.decode(i).strip() for i in lm.tokenizer(prompt)["input_ids"]]
print("where the last token looks, averaged over heads:")
for i, pattern in enumerate(patterns):
    weights = pattern[0, :, -1].mean(0)  # (key tokens,)
    print(f"  layer {i}: " + "  ".join(f"{t}={w:.2f}" for t, w in zip(tokens, weights)))

# The same patterns as Hugging Face's eager attention returns them.
eager = lt.LanguageModel(path, attn_implementation="eager")
with eager.trace(prompt, output_attentions=True):
    reference = eager.output.attentions.save()
same = all(torch.allclose(p, r, atol=1e-6) for p, r in zip(patterns, reference))
print("patterns equal eager attention's:", same)

# Edit: the last token of layer 1 attends only to itself, in every head.
with lm.trace(prompt):
    pattern = lm.model.layers[1].self_attn.source.softmax_0.output
    pattern[:, :, -1] = 0.0
    pattern[:, :, -1, -1] = 1.0
    edited = lm.output.logits.save()
change = (edited[0, -1] - logits[0, -1]).abs().max()
print(f"largest change of a last-token logit: {change:.4f}")
