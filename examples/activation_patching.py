"""Activation patching: copy one layer's activation from a clean run into a corrupted run.

Each ``tracer.invoke`` adds a prompt to the batch; all invokes run as one forward pass, and
a value read in one invoke can be written into another. Here the residual stream at the last
token of the clean prompt replaces the same activation of the corrupted prompt, one layer at
a time, and we measure how much of the clean prediction comes back.

Run: python examples/activation_patching.py
"""

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

lm = lt.LanguageModel(cached_tiny_lm("llama"))  # tiny random-weight Llama, no download
clean_prompt, corrupt_prompt = "The Eiffel Tower is in", "The Colosseum is in"

print(f"clean {clean_prompt!r}, corrupted {corrupt_prompt!r}")
print("probability of the clean run's top token, patching the last token's residual stream:")
for index, layer in enumerate(lm.model.layers):
    with lm.trace() as tracer:
        with tracer.invoke(clean_prompt):
            clean = layer.output[:, -1]  # (1, hidden); used in this trace, so no .save()
            clean_logits = lm.lm_head.output[:, -1].save()  # (1, vocab)
        with tracer.invoke(corrupt_prompt):
            layer.output[:, -1] = clean  # patch: the clean activation into this prompt's row
            patched_logits = lm.lm_head.output[:, -1].save()
        with tracer.invoke(corrupt_prompt):  # the corrupted run, unpatched, for reference
            corrupt_logits = lm.lm_head.output[:, -1].save()

    target = clean_logits.argmax(-1)  # (1,)
    p_clean, p_patched, p_corrupt = (
        logits.softmax(-1)[0, target].item()
        for logits in (clean_logits, patched_logits, corrupt_logits)
    )
    recovered = (p_patched - p_corrupt) / (p_clean - p_corrupt)
    print(
        f"  layer {index}: clean {p_clean:.5f}  corrupted {p_corrupt:.5f}  "
        f"patched {p_patched:.5f}  recovered {recovered:6.1%}"
    )

# Patching the last layer's output at the last token fixes everything the prediction at that
# token depends on, so the patched logits equal the clean ones.
difference = (patched_logits - clean_logits).abs().max().item()
print(f"last layer: max |patched - clean| logit difference = {difference:.2e}")
