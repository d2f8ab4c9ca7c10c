"""Read activations: save what modules compute during one forward pass.

Inside ``with lm.trace(...)`` nothing runs yet: each line records a step of an intervention
graph. When the block ends, the model runs once and every ``.save()``d value becomes real.

Run: python examples/read_activations.py
"""

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

# A tiny random-weight Llama built on the spot (no download). Its predictions are noise, but
# its module tree, shapes and forward pass are those of a real Hugging Face model.
lm = lt.LanguageModel(cached_tiny_lm("llama"))
prompt = "The Eiffel Tower is in"

with lm.trace(prompt):
    # The residual stream after every decoder layer: (batch, tokens, hidden).
    residual = [layer.output.save() for layer in lm.model.layers]

    # The MLP neurons of layer 1 are the input of its down projection: (batch, tokens, 2*hidden).
    neurons = lm.model.layers[1].mlp.down_proj.input.save()

    # Shapes are known inside the trace without running the model (shape-only propagation).
    print("inside the trace, layer 1 neurons have shape", tuple(neurons.shape))

    logits = lm.output.logits.save()

# After the block, saved values behave like the tensors they stand for.
tokens = lm.tokenizer.convert_ids_to_tokens(lm.tokenizer(prompt)["input_ids"])
print(f"prompt {prompt!r} -> {len(tokens)} tokens: {tokens}")
print("norm of the residual stream at the last token, per layer:")
for i, h in enumerate(residual):
    print(f"  layer {i}: {h[0, -1].norm():7.3f}   shape {tuple(h.shape)}")

top = neurons[0, -1].topk(5)
print("most active layer-1 MLP neurons at the last token:", top.indices.tolist())
print("next-token prediction:", repr(lm.tokenizer.decode(logits[0, -1].argmax())))
