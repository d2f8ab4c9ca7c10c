"""Logit lens: decode every layer's residual stream with the model's own final norm and head.

Calling a submodule inside a trace (``lm.lm_head(...)``) records a call of that module on the
values you pass; it runs during the forward pass, as soon as its inputs exist.

Run: python examples/logit_lens.py
"""

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

lm = lt.LanguageModel(cached_tiny_lm("llama"))  # tiny random-weight Llama, no download
prompt = "The capital of France is"

with lm.trace(prompt):
    # For each layer: norm -> unembed -> most likely token at every position, (1, tokens).
    lens = [lm.lm_head(lm.model.norm(layer.output)).argmax(-1).save() for layer in lm.model.layers]
    prediction = lm.output.logits.argmax(-1).save()  # the model's own answer, (1, tokens)


def show(ids: list[int]) -> list[str]:
    """Each token id as its quoted text, e.g. ' Paris' or '\\n'."""
    return [repr(lm.tokenizer.decode(i)) for i in ids]


tokens = show(lm.tokenizer(prompt)["input_ids"])
width = max(len(t) for t in tokens) + 2
print("top token after each layer (columns: the input tokens)")
print(" " * 9 + "".join(f"{t:<{width}}" for t in tokens))
for index, guesses in enumerate(lens):
    print(f"layer {index:<3}" + "".join(f"{t:<{width}}" for t in show(guesses[0].tolist())))

# The last layer's lens is exactly the model's forward pass: final norm, then the head.
print("last layer's lens equals the model's prediction:", bool((lens[-1] == prediction).all()))
