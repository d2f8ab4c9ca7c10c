"""A remote sweep: activation patching across every layer as one session, one request.

``with model.session():`` records every trace opened in its block as one job. The clean run's
activations stay on the server (they are never saved), flow into each patched run there, and
only the few numbers saved come back when the block ends: one request and one queue slot,
however many traces the sweep holds.

The server here is the real serving code (``lazytensor_server.service.Service``) reached by an
in-process transport, so the script needs no network; against a real server the only change is
``client = lt.connect("tcp://gpu-host:5555")``.

Run: python examples/remote_sweep.py
"""

import torch

import lazytensor as lt
from lazytensor.frontend.served import in_process
from lazytensor.tiny import cached_tiny_lm
from lazytensor_server.registry import load
from lazytensor_server.service import Service

path = cached_tiny_lm("llama")  # tiny random-weight Llama, no download
client = in_process(Service([load(str(path), "llama")]))  # a server in this process
model = client.model("llama")  # a handle built from the server's description; no weights here
clean_prompt, corrupt_prompt = "The capital of France is", "The capital of Italy is"
paris, rome = model.tokenizer(" Paris Rome").input_ids


def sweep(lm):
    """Patch the clean last-token residual stream into the corrupted run, one layer at a time.

    Returns the metric logit(' Paris') - logit(' Rome') of the clean, the corrupted and each
    patched run, as saved proxies (tensors once the session ends).
    """
    with lm.session():
        with lm.trace(clean_prompt):
            clean = [layer.output[:, -1] for layer in lm.model.layers]  # (1, hidden); no .save()
            logits = lm.output.logits[0, -1]
            clean_metric = (logits[paris] - logits[rome]).save()
        with lm.trace(corrupt_prompt):
            logits = lm.output.logits[0, -1]
            corrupt_metric = (logits[paris] - logits[rome]).save()
        patched = []
        for index, layer in enumerate(lm.model.layers):
            with lm.trace(corrupt_prompt):
                layer.output[:, -1] = clean[index]  # a value of the first trace, on the server
                logits = lm.output.logits[0, -1]
                patched.append((logits[paris] - logits[rome]).save())
    return clean_metric, corrupt_metric, patched


served_before = client.models()[0]["served"]
clean_metric, corrupt_metric, patched = sweep(model)  # runs when the session block ends
requests = client.models()[0]["served"] - served_before
traces = 2 + len(patched)
print(f"{traces} traces ran on the server as {requests} request(s)")
assert requests == 1, requests

print(
    f"logit(' Paris') - logit(' Rome'): clean {clean_metric:+.4f}, corrupted {corrupt_metric:+.4f}"
)
for index, value in enumerate(patched):
    recovered = (value - corrupt_metric) / (clean_metric - corrupt_metric)
    print(f"  patching layer {index}: {value:+.4f}  recovered {recovered:6.1%}")

# The same function on the local model gives the same numbers: a session runs where its
# model runs, and the server runs the same replay.
local_clean, local_corrupt, local_patched = sweep(lt.LanguageModel(path))
remote = torch.stack([clean_metric, corrupt_metric, *patched])
same = torch.equal(remote, torch.stack([local_clean, local_corrupt, *local_patched]))
print(f"remote equals local: {same}")
assert same

# The last layer's output at the last token is all the prediction depends on.
assert torch.allclose(patched[-1], clean_metric)
client.close()
