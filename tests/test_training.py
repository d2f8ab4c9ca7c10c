"""Training as data: trainable tensors, optimizers and adapters, locally and on a server.

Each loop is checked against the same loop written in plain PyTorch (same initial values, CPU
float32); remote runs against local ones. The model's weights never change.
"""

from __future__ import annotations

import pytest
import torch

import lazytensor as lt
from lazytensor.core.errors import GraphError, OpNotAllowedError, TraceError
from servers import MODEL

BATCH = ["The Eiffel Tower is in", "Rome is the capital of"]
TARGET, STEPS, LAYER = 11, 4, 1


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].log_softmax(-1)[:, TARGET].mean().neg()


def steer(lm, remote, optimizer="AdamW", lr=1e-2) -> torch.Tensor:
    hidden = lm.model.embed_tokens.embedding_dim
    with lm.session(remote=remote):
        vec = lt.parameter(torch.zeros(hidden))
        opt = getattr(lt.optim, optimizer)([vec], lr=lr)
        for _ in range(STEPS):
            with lm.trace(BATCH):
                lm.model.layers[LAYER].output[:] += vec
                loss = loss_of(lm.output.logits)
                with loss.backward():
                    pass
            opt.step()
            opt.zero_grad()
        trained = vec.save()
    return trained


def steer_by_hand(lm, optimizer="AdamW", lr=1e-2) -> torch.Tensor:
    model = lm._module
    inputs = dict(lm.tokenizer(BATCH, return_tensors="pt", padding=True))
    vec = torch.zeros(model.config.hidden_size, requires_grad=True)
    opt = getattr(torch.optim, optimizer)([vec], lr=lr)
    handle = model.model.layers[LAYER].register_forward_hook(lambda m, a, o: o + vec)
    try:
        for _ in range(STEPS):
            loss_of(model(**inputs).logits).backward(inputs=[vec])
            opt.step()
            opt.zero_grad()
    finally:
        handle.remove()
    return vec.detach()


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "AdamW"])
def test_a_steering_vector_trains_as_in_plain_pytorch(llama, optimizer) -> None:
    before = {k: v.clone() for k, v in llama._module.state_dict().items()}
    got = steer(llama, False, optimizer)
    torch.testing.assert_close(got.detach(), steer_by_hand(llama, optimizer))
    assert got.abs().sum() > 0
    after = llama._module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the weights did not move


@pytest.mark.parametrize("how", ["inproc", "socket", "handle", "process"])
def test_remote_training_equals_local(how, local_llama, inproc_client, served_llama, request):
    want = steer(local_llama, False)
    if how == "handle":
        model, remote = inproc_client.model(MODEL), False
    else:
        model, remote = local_llama, request.getfixturevalue(f"{how}_client")
    weights = {k: v.clone() for k, v in served_llama.module.state_dict().items()}
    got = steer(model, remote)
    torch.testing.assert_close(got, want.detach())
    now = served_llama.module.state_dict()
    assert all(torch.equal(weights[k], now[k]) for k in weights)
    assert all(p.grad is None for p in served_llama.module.parameters())
    if how == "process":  # that server's weights, shared with its worker process, are intact
        with local_llama.trace(BATCH, remote=remote):
            served = local_llama.output.logits.save()
        with local_llama.trace(BATCH):
            mine = local_llama.output.logits.save()
        assert torch.equal(served, mine)


def lora_loop(lm, remote) -> tuple[torch.Tensor, torch.Tensor]:
    with lm.session(remote=remote):
        adapter = lt.lora(lm.model.layers[LAYER].mlp.down_proj, rank=4, alpha=8, seed=0)
        opt = lt.optim.AdamW(adapter.parameters(), lr=1e-2)
        for _ in range(STEPS):
            with lm.trace(BATCH):
                loss = loss_of(lm.output.logits)
                loss.backward()
            opt.step()
            opt.zero_grad()
        a, b = adapter.A.save(), adapter.B.save()
    return a, b


def test_a_lora_adapter_trains_as_by_hand(llama, inproc_client) -> None:
    a, b = lora_loop(llama, False)
    down = llama._module.model.layers[LAYER].mlp.down_proj
    init = torch.empty(4, down.in_features)
    init.uniform_(-1 / down.in_features**0.5, 1 / down.in_features**0.5,
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    want_a = init.clone().requires_grad_(True)
    want_b = torch.zeros(down.out_features, 4, requires_grad=True)
    opt = torch.optim.AdamW([want_a, want_b], lr=1e-2)
    handle = down.register_forward_hook(
        lambda m, args, out: out + (args[0] @ want_a.T) @ want_b.T * 2.0
    )
    inputs = dict(llama.tokenizer(BATCH, return_tensors="pt", padding=True))
    try:
        for _ in range(STEPS):
            loss_of(llama._module(**inputs).logits).backward(inputs=[want_a, want_b])
            opt.step()
            opt.zero_grad()
    finally:
        handle.remove()
    torch.testing.assert_close(a.detach(), want_a.detach())
    torch.testing.assert_close(b.detach(), want_b.detach())
    assert b.abs().sum() > 0
    remote_a, remote_b = lora_loop(llama, inproc_client)
    torch.testing.assert_close(remote_a, a.detach())
    torch.testing.assert_close(remote_b, b.detach())


def test_an_optimizer_never_takes_a_weight(llama, inproc_client) -> None:
    for remote in (False, inproc_client):
        with pytest.raises(GraphError, match="only tensors made with lt.parameter"):
            with llama.trace(BATCH, remote=remote):
                opt = lt.optim.SGD([llama.lm_head.weight], lr=1.0)
                opt.step()
                llama.output.logits.save()


def test_training_ops_need_a_trace_or_session() -> None:
    with pytest.raises(TraceError, match="open one first"):
        lt.parameter(torch.zeros(3))
    with pytest.raises(TraceError, match="open one first"):
        lt.lora(None, rank=2)


def test_the_server_refuses_unknown_optimizers_and_options(llama, inproc_client) -> None:
    with pytest.raises(OpNotAllowedError, match="LBFGS"):
        with llama.session(remote=inproc_client):
            vec = lt.parameter(torch.zeros(4))
            lt.optim.Optimizer("LBFGS", [vec], {"lr": 1.0}).step()
    with pytest.raises(OpNotAllowedError, match="foreach"):
        with llama.session(remote=inproc_client):
            vec = lt.parameter(torch.zeros(4))
            lt.optim.SGD([vec], lr=1.0, foreach="x").step()
