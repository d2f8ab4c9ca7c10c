"""Neuron forcing: set chosen MLP neurons to a fixed value and see what the model predicts.

The batch holds each prompt twice. Rows 0-2 run untouched (the clean baseline); in rows 3-5
some neurons of layers 1 and 3 are forced to 5.0 at the last token. One forward pass gives
both, and each row computes exactly what its prompt would compute alone.

Run: python examples/neuron_forcing.py
"""

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

lm = lt.LanguageModel(cached_tiny_lm("llama"))  # tiny random-weight Llama, no download
sentences = ["Q: cheap\nA:", "Q: big\nA:", "Q: fast\nA:"]
neurons = {1: [7, 25], 3: [94]}  # layer -> MLP neurons to force

with lm.trace(sentences + sentences):
    for layer, ids in neurons.items():
        # An MLP's neurons are the input of its down projection: (batch, tokens, neurons).
        x = lm.model.layers[layer].mlp.down_proj.input
        x[3:, -1, ids] = 5.0  # rows 3.. only, last position: an in-place write
    out = lm.output.save()

probs = out.logits[:, -1].softmax(-1)  # (6, vocab): next-token distribution per row
top = probs.topk(3)
n = len(sentences)
print(f"forcing {neurons} to 5.0 (layer -> neurons); top-3 next tokens:")
for i, sentence in enumerate(sentences):
    for label, row in (("clean ", i), ("forced", i + n)):
        ranked = ", ".join(
            f"{lm.tokenizer.decode(t)!r} {p:.4f}"
            for t, p in zip(top.indices[row].tolist(), top.values[row].tolist())
        )
        print(f"  {sentence!r:16} {label}  {ranked}")

# How far the intervention moved each prompt's distribution (total variation distance).
shift = 0.5 * (probs[n:] - probs[:n]).abs().sum(-1)
print("distribution shift per prompt:", [round(s, 4) for s in shift.tolist()])
