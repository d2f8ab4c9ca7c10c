"""Training on the server: a steering vector, then a LoRA adapter, sent as data.

A session records the whole training loop (every forward, backward and optimizer step) as one
job. The trainable tensor is made with ``lt.parameter``, the optimizer is one of the allow-listed
``lt.optim.SGD`` / ``Adam`` / ``AdamW``, and ``opt.step()`` is an op: no code of ours runs on
the server, and the model's weights are never trained (they stay read-only).

The loop below computes exactly what the plain-PyTorch loop further down computes (a forward
hook adds the vector to layer 2's output, the weights are frozen, ``torch.optim.AdamW`` steps
the vector), and the script checks the two agree step by step.

Run: python examples/train_steering_vector.py
"""

import torch
from transformers import AutoModelForCausalLM

import lazytensor as lt
from lazytensor.frontend.served import in_process
from lazytensor.tiny import cached_tiny_lm
from lazytensor_server.registry import load
from lazytensor_server.service import Service

path = cached_tiny_lm("llama")  # tiny random-weight Llama, no download
served = load(str(path), "llama")
weights = {name: w.clone() for name, w in served.module.state_dict().items()}
client = in_process(Service([served]))  # the real serving code, in this process
model = client.model("llama")  # against a real server: lt.connect(address).model("llama")

countries = ["France", "Italy", "Spain", "Japan", "Germany", "China", "Egypt", "Canada"]
prompts = [f"The capital of {country} is" for country in countries]  # 5 tokens each
target = model.tokenizer(" Paris").input_ids[0]
hidden, layer, steps, lr = 64, 2, 30, 1e-2


def steering_loss(logits):
    """Mean negative log-probability of ' Paris' after every prompt."""
    return logits[:, -1].log_softmax(-1)[:, target].mean().neg()


# 1. On the server: one request for the 30 training steps.
with model.session():
    vec = lt.parameter(torch.zeros(hidden))  # the client sends zeros; the server trains a copy
    opt = lt.optim.AdamW([vec], lr=lr)
    losses = []
    for _ in range(steps):
        with model.trace(prompts):
            model.model.layers[layer].output[:] += vec  # (8, 5, 64) += (64,)
            loss = steering_loss(model.output.logits)
            losses.append(loss.save())
            with loss.backward():  # writes the gradient into vec only
                pass
        opt.step()
        opt.zero_grad()
    trained = vec.save()
losses = torch.stack(losses)
print(f"steering vector: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps")
assert losses[-1] < losses[0] - 0.5, losses

# 2. The same training in plain PyTorch.
reference = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
plain = torch.zeros(hidden, requires_grad=True)
optimizer = torch.optim.AdamW([plain], lr=lr)
handle = reference.model.layers[layer].register_forward_hook(lambda m, i, out: out + plain)
batch = model.tokenizer(prompts, return_tensors="pt")  # equal lengths: no padding
plain_losses = []
for _ in range(steps):
    loss = steering_loss(reference(**batch).logits)
    plain_losses.append(loss.detach())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
handle.remove()
loss_gap = (losses - torch.stack(plain_losses)).abs().max().item()
vector_gap = (trained - plain.detach()).abs().max().item()
print(f"plain PyTorch loop: max |loss gap| {loss_gap:.1e}, max |vector gap| {vector_gap:.1e}")
assert loss_gap < 1e-4 and vector_gap < 1e-5

# 3. A LoRA adapter on one MLP projection, trained the same way.
with model.session():
    adapter = lt.lora(model.model.layers[1].mlp.down_proj, rank=4, seed=0)  # every later trace
    opt = lt.optim.AdamW(adapter.parameters(), lr=lr)  # [A, B]: A random, B zeros
    lora_losses = []
    for _ in range(steps):
        with model.trace(prompts):
            loss = steering_loss(model.output.logits)
            lora_losses.append(loss.save())
            with loss.backward():
                pass
        opt.step()
        opt.zero_grad()
    a, b = (p.save() for p in adapter.parameters())
first, last = lora_losses[0], lora_losses[-1]
print(f"LoRA rank 4, A {tuple(a.shape)}, B {tuple(b.shape)}: loss {first:.4f} -> {last:.4f}")
assert torch.allclose(first, losses[0])  # B starts at zero: the model as it was
assert last < first - 0.2, lora_losses

# The served model is exactly as it was: no weight trained, no gradient left behind.
unchanged = all(torch.equal(w, weights[name]) for name, w in served.module.state_dict().items())
print(f"server weights unchanged: {unchanged}")
assert unchanged and all(p.grad is None for p in served.module.parameters())
client.close()
