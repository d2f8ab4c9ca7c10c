"""Isolation: each invoke sees its own rows, shape-only passes hide fake tensors from the
user's hooks, and a module the trace calls shows its own internals.

The oracles are the same runs with hand-written hooks: ``model.generate`` hooked by hand
(``test_iteration.hooked_generate``) for beams and returned sequences, plain forward hooks
for token-major values and for a submodule mounted on the model and called by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules.module import register_module_forward_hook

import lazytensor as lt
from test_iteration import PROMPTS, exact, hooked_generate

MLP = {"llama": "model.layers.1.mlp", "gpt2": "transformer.h.1.mlp"}


# -- invokes under beams and returned sequences --------------------------------------------------


def beams(lm, arch, remote=False):
    """Invoke 1 halves its MLP at every step under beam search; invoke 0 reads."""
    options = {"max_new_tokens": 3, "num_beams": 3, "do_sample": False}
    with lm.generate(remote=remote, **options) as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = lm.get(MLP[arch]).output.save()  # its 3 beams at the prompt step
            mine = tracer.result.save()
        with tracer.invoke(PROMPTS[1]):
            with tracer.all():
                lm.get(MLP[arch]).output[:] *= 0.5
            edited = lm.get(MLP[arch]).output.save()
        with tracer.invoke():
            everything = tracer.result.save()
    return options, [first, mine, edited, everything]


def test_beams_keep_invokes_apart(lm, arch):
    options, (first, mine, edited, everything) = beams(lm, arch)
    want, seen = hooked_generate(
        lm, PROMPTS, options, reads=(MLP[arch],), scale=(MLP[arch], range(3)), rows=slice(3, 6)
    )
    plain, _ = hooked_generate(lm, PROMPTS, options)
    exact(everything, want)
    exact(mine, want[:1])
    exact(mine, plain[:1])  # the other invoke's edit never reached this one's beams
    exact(first, seen[MLP[arch]][0][:3])
    exact(edited, seen[MLP[arch]][0][3:])


def test_returned_sequences_belong_to_their_invoke(llama):
    options = {"max_new_tokens": 3, "num_return_sequences": 2, "do_sample": True}
    torch.manual_seed(0)
    with llama.generate(**options) as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = tracer.result.save()
        with tracer.invoke(PROMPTS[1]):
            second = llama.generator.output.save()
        with tracer.invoke():
            both = tracer.result.save()
    torch.manual_seed(0)
    want, _ = hooked_generate(llama, PROMPTS, options)
    exact(both, want)
    exact(first, want[:2])
    exact(second, want[2:])


def test_remote_beams_equal_local(local_llama, inproc_client):
    _, remote = beams(local_llama, "llama", remote=inproc_client)
    _, local = beams(local_llama, "llama")
    for got, want in zip(remote, local, strict=True):
        exact(got, want)


# -- token-major values and values of unknown layout ---------------------------------------------


class TokenMajor(nn.Module):
    """Runs ``inner`` on the batch flattened to tokens, as a mixture of experts' router does."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return self.inner(x.reshape(b * t, d)).reshape(b, t, -1)  # (B*T, D) inside


class SequenceFirst(nn.Module):
    """Runs ``inner`` on ``(T, B, D)``: its first dimension is not the batch's."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


@pytest.fixture
def wrapped(llama_path):
    """A fresh tiny Llama whose layer-0 MLP runs token-major and layer-1 MLP sequence-first."""
    lm = lt.LanguageModel(llama_path)
    layers = lm._module.model.layers
    layers[0].mlp = TokenMajor(layers[0].mlp)
    layers[1].mlp = SequenceFirst(layers[1].mlp)
    return lm


def test_token_major_values_are_narrowed_to_the_invoke(wrapped):
    router = "model.layers.0.mlp.inner"
    with wrapped.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            wrapped.get(router).output[:] = 0.0
        with tracer.invoke(PROMPTS[1]):
            seen_in = wrapped.get(router).input.save()
            inputs = wrapped.model.layers[0].inputs.save()  # also shared cache positions
        logits = wrapped.lm_head.output.save()
    hf = wrapped._module
    seen = {}

    def zero_first(module, args, output):
        seen["in"] = args[0].clone()
        output[: len(output) // 2] = 0.0  # rows 0..T of (2*T, D): the first prompt's tokens

    def layer(module, args, kwargs):
        seen["layer"] = (args, kwargs)

    handles = [
        hf.get_submodule(router).register_forward_hook(zero_first),
        hf.model.layers[0].register_forward_pre_hook(layer, with_kwargs=True),
        hf.lm_head.register_forward_hook(lambda m, a, out: seen.update(logits=out)),
    ]
    try:
        wrapped.trace(PROMPTS, trace=False)
    finally:
        for handle in handles:
            handle.remove()
    tokens = seen["in"].shape[0] // 2
    exact(seen_in, seen["in"][tokens:])
    exact(logits, seen["logits"])
    args, kwargs = inputs
    exact(args[0] if args else kwargs["hidden_states"], _hidden(seen["layer"])[1:])


def _hidden(call):
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def test_rows_of_a_value_of_unknown_layout_are_refused(wrapped):
    with wrapped.trace(PROMPTS) as tracer:
        whole = wrapped.model.layers[1].mlp.inner.input.save()  # no invoke: the whole value
    assert whole.shape[1] == len(PROMPTS)  # (T, B, D)
    with pytest.raises(lt.GraphError) as info:
        with wrapped.trace() as tracer:
            with tracer.invoke(PROMPTS[0]):
                wrapped.model.layers[1].mlp.inner.input.save()
            with tracer.invoke(PROMPTS[1]):
                pass
    message = str(info.value)
    assert "test_isolation.py:" in message and "cannot tell which part" in message


# -- shape-only passes never show the user's hooks fake tensors ----------------------------------


def test_shape_only_passes_hide_the_users_hooks(tiny_mlp):
    seen: list[bool] = []

    def look(module, args, *rest):
        seen.append(isinstance(args[0], FakeTensor))

    handles = [
        tiny_mlp.layer2.register_forward_hook(look),
        tiny_mlp.layer2.register_forward_pre_hook(look),
        register_module_forward_hook(look),
    ]
    hooks_before = (dict(tiny_mlp.layer2._forward_hooks), dict(tiny_mlp.layer2._forward_pre_hooks))
    net = lt.Model(tiny_mlp)
    try:
        with net.trace(torch.ones(2, 8)):
            shape = net.layer3.output.shape
            out = net.output.save()
        with pytest.raises(IndexError):
            with net.trace(torch.ones(2, 8)):
                _ = net.layer1.output[:, 99].shape  # a failing shape-only pass puts them back
        hooks_after = (
            dict(tiny_mlp.layer2._forward_hooks),
            dict(tiny_mlp.layer2._forward_pre_hooks),
        )
    finally:
        for handle in handles:
            handle.remove()
    assert shape == (2, 4) and out.shape == (2, 4)
    assert len(seen) == 5 + 2  # the real run only: 5 modules (global hook) + 2 on layer2
    assert not any(seen)
    assert hooks_after == hooks_before


def test_the_model_libraries_own_hooks_stay_in_shape_only_passes(llama_path):
    """Hugging Face fills ``hidden_states`` with forward hooks it installs at first need: here
    during a shape-only pass, which must keep them (then and after)."""
    lm = lt.LanguageModel(llama_path)
    with lm.trace(PROMPTS, output_hidden_states=True):
        count = len(lm.output.hidden_states)
        shape = lm.output.hidden_states[-1].shape
        last = lm.output.hidden_states[-1].save()
    config = lm._module.config
    assert count == config.num_hidden_layers + 1 and shape[-1] == config.hidden_size
    assert last.shape == shape


# -- a module mounted on the model and called in the trace ---------------------------------------


class SAE(nn.Module):
    def __init__(self, width: int, features: int = 32) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.encoder = nn.Linear(width, features)
            self.decoder = nn.Linear(features, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.relu(self.encoder(x)))


@pytest.fixture
def mounted(llama_path):
    lm = lt.LanguageModel(llama_path)
    lm.add_module("sae", SAE(lm._module.config.hidden_size))
    return lm


def test_a_called_modules_internals_are_readable_and_the_logit_lens_still_works(mounted):
    lm = mounted
    with lm.trace(PROMPTS):
        rebuilt = lm.sae(lm.model.layers[1].output).save()
        features = lm.sae.encoder.output.save()
        lens = lm.lm_head(lm.model.norm(lm.model.layers[0].output)).save()
        logits = lm.lm_head.output.save()
        norm = lm.model.norm.output.save()
    hf, seen = lm._module, {}
    paths = ("model.layers.0", "model.layers.1", "model.norm", "lm_head")
    handles = [
        hf.get_submodule(p).register_forward_hook(lambda m, a, out, p=p: seen.update({p: out}))
        for p in paths
    ]
    try:
        lm.trace(PROMPTS, trace=False)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        want_features = hf.sae.encoder(seen["model.layers.1"])
        want_rebuilt = hf.sae(seen["model.layers.1"])
        want_lens = hf.lm_head(hf.model.norm(seen["model.layers.0"]))
    exact(features, want_features)
    exact(rebuilt, want_rebuilt)
    exact(lens, want_lens)
    exact(logits, seen["lm_head"])  # the model's own lm_head call, not the lens's
    exact(norm, seen["model.norm"])


def test_an_edit_inside_a_called_module_changes_its_result(mounted):
    lm = mounted
    with lm.trace(PROMPTS):
        rebuilt = lm.sae(lm.model.layers[1].output).save()
        lm.sae.encoder.output[:] = 0.0  # recorded after the call: applies inside it
    decoder = lm._module.sae.decoder
    exact(rebuilt, decoder.bias.expand_as(rebuilt))


def test_a_read_before_the_call_means_the_models_own_forward(mounted):
    lm = mounted
    with pytest.raises(lt.GraphError, match="never called") as info:
        with lm.trace(PROMPTS):
            lm.sae.encoder.output.save()
            lm.sae(lm.model.layers[1].output).save()
    assert "test_isolation.py:" in str(info.value)
