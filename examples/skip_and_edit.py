"""Skip a module and keep an edit: ``envoy.skip(value)`` and ``lm.edit()``.

``skip`` stops a module from running at all (nothing inside it runs either) and makes ``value``
its output; here layer 1's MLP is replaced by a scaled copy of its input. ``lm.edit()`` records
an intervention once, on a new wrapper sharing the same weights, and every later trace of that
wrapper applies it; the original ``lm`` stays clean.

Run: python examples/skip_and_edit.py
"""

import torch

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

lm = lt.LanguageModel(cached_tiny_lm("llama"))
prompt = "The Eiffel Tower is in"
mlp = lm._module.model.layers[1].mlp

# -- skip: the MLP never runs ------------------------------------------------------------------
ran = []
hook = mlp.down_proj.register_forward_pre_hook(lambda m, a: ran.append(1))
with lm.trace(prompt):
    envoy = lm.model.layers[1].mlp
    envoy.skip(envoy.input * 0.5)  # (batch, tokens, hidden): the MLP's output, without the MLP
    skipped = lm.output.logits.save()
hook.remove()
print("layer 1's MLP ran", len(ran), "times while skipped")

# The same by hand: a forward hook replacing the output (the MLP still runs there).
hook = mlp.register_forward_hook(lambda m, args, out: args[0] * 0.5)
with torch.no_grad():
    by_hand = lm.trace(prompt, trace=False).logits
hook.remove()
print("skip equals a replacing hook:", torch.equal(skipped, by_hand))

# -- edit: an ablation that stays on a copy ------------------------------------------------------
with lm.edit() as (tracer, ablated):
    ablated.model.layers[0].mlp.output[:] = 0  # every trace of `ablated` does this first

for text in (prompt, "Hello world"):
    with ablated.trace(text):
        edited = ablated.output.logits.save()
    with lm.trace(text):
        clean = lm.output.logits.save()
    change = (edited[0, -1] - clean[0, -1]).abs().max()
    print(f"{text!r}: the ablation moves the last logits by up to {change:.3f}")
print("same weights, no copy:", ablated._module is lm._module)
