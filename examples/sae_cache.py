"""SAE data: cache one layer's residual stream over many prompts, ending each forward early.

``tracer.cache(modules=[...])`` keeps the outputs of the modules named; nothing after the last
of them is needed, so the forward ends there (``tracer.stop()`` says so explicitly). A counting
hook on the layers after it shows they never run, and a plain forward hook gives the same
activations.

Run: python examples/sae_cache.py
"""

import torch

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

lm = lt.LanguageModel(cached_tiny_lm("llama"))
LAYER = 1
prompts = [
    "The Eiffel Tower is in Paris.",
    "The capital of Japan is Tokyo.",
    "Q: cheap\nA: expensive",
    "Hello world! How are you today?",
]

# Count the calls of the layers after the cached one: they should never run.
later = {"calls": 0}
hooks = [
    layer.register_forward_pre_hook(lambda m, a: later.update(calls=later["calls"] + 1))
    for layer in lm._module.model.layers[LAYER + 1 :]
]

chunks = []
for start in range(0, len(prompts), 2):
    batch = prompts[start : start + 2]
    with lm.trace(batch) as tracer:
        cache = tracer.cache(modules=[lm.model.layers[LAYER]])
        tracer.stop()  # the forward ends after layer LAYER
    acts = cache.model.layers[LAYER].output  # (batch, tokens, hidden), left-padded
    mask = lm.tokenizer(batch, padding=True, return_tensors="pt")["attention_mask"]  # (B, T)
    chunks.append(acts[mask.bool()])  # (real tokens, hidden)
for hook in hooks:
    hook.remove()

data = torch.cat(chunks)
print(f"collected {data.shape[0]} token activations of width {data.shape[1]} at layer {LAYER}")
print("later layers ran", later["calls"], "times")

# The same activations from a plain forward hook on a full forward pass.
seen = []
hook = lm._module.model.layers[LAYER].register_forward_hook(lambda m, a, out: seen.append(out))
with torch.no_grad():
    lm.trace(prompts[:2], trace=False)
hook.remove()
mask = lm.tokenizer(prompts[:2], padding=True, return_tensors="pt")["attention_mask"]
same = torch.equal(seen[0][mask.bool()], chunks[0])
print("equals a forward hook on a full forward:", same)
