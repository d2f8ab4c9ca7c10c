"""``envoy.source``: values inside a module's forward, checked against hooks and by hand.

Oracles: plain PyTorch forward hooks on the same model, Hugging Face's own attention weights
(``output_attentions=True`` under eager attention) and attention computed by hand from the
hooked projections. Remote runs must equal local ones.
"""

from __future__ import annotations

import math

import pytest
import torch

import lazytensor as lt
from lazytensor.core.errors import OpNotAllowedError
from lazytensor.core.graph import Node
from lazytensor.runtime import source
from lazytensor_server.service import _check_node
from servers import MODEL

PROMPT = "The Eiffel Tower is in"
BATCH = ["The capital of France is Paris", "Hi"]  # left-padded: a boolean mask under sdpa
ATTN = {"llama": "model.layers.0.self_attn", "gpt2": "transformer.h.0.attn"}


@pytest.fixture(scope="module")
def models(llama_path, gpt2_path) -> dict:
    """Each architecture under each attention implementation."""
    paths = {"llama": llama_path, "gpt2": gpt2_path}
    return {
        (arch, impl): lt.LanguageModel(path, attn_implementation=impl)
        for arch, path in paths.items()
        for impl in ("eager", "sdpa")
    }


def encode(lm: lt.LanguageModel, prompts: str | list[str]) -> dict:
    """The inputs a trace gives the model: left padding, its mask, matching positions."""
    rows = [
        lm.tokenizer(p)["input_ids"] for p in ([prompts] if isinstance(prompts, str) else prompts)
    ]
    width, pad = max(len(r) for r in rows), lm.tokenizer.pad_token_id
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def run_plain(lm: lt.LanguageModel, prompts, hooks=(), **kwargs) -> torch.Tensor:
    """The logits (or the output, with ``kwargs``) of the bare Hugging Face model."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            out = lm._module(**encode(lm, prompts), **kwargs)
            return out if kwargs else out.logits
    finally:
        for handle in handles:
            handle.remove()


def attention(lm: lt.LanguageModel, arch: str) -> torch.nn.Module:
    return lm._module.get_submodule(ATTN[arch])


# -- reads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_q_proj_output_equals_a_hook_on_q_proj(models, impl):
    lm = models["llama", impl]
    with lm.trace(BATCH):
        q = lm.model.layers[0].self_attn.source.q_proj_0.output.save()
    seen = []
    q_proj = attention(lm, "llama").q_proj
    run_plain(lm, BATCH, [(q_proj, lambda m, a, o: seen.append(o))])
    torch.testing.assert_close(q, seen[0])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_softmax_is_huggingfaces_attention_pattern(models, impl):
    lm = models["llama", impl]
    with lm.trace(PROMPT):
        pattern = lm.model.layers[1].self_attn.source.softmax_0.output.save()
        logits = lm.output.logits.save()
    want = run_plain(models["llama", "eager"], PROMPT, output_attentions=True).attentions[1]
    torch.testing.assert_close(pattern, want)
    # Nothing was written: the run computes what the model computes.
    torch.testing.assert_close(logits, run_plain(lm, PROMPT))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gpt2_softmax_equals_attention_by_hand(models, impl):
    lm = models["gpt2", impl]
    with lm.trace(BATCH):
        attn = lm.transformer.h[0].attn.source
        qkv = attn.c_attn_1.output.save()
        pattern = attn.softmax_0.output.save()
        scores = attn.softmax_0.input.save()
        logits = lm.output.logits.save()
    seen = []
    module = attention(lm, "gpt2")
    plain = run_plain(lm, BATCH, [(module.c_attn, lambda m, a, o: seen.append(o))])
    torch.testing.assert_close(qkv, seen[0])
    torch.testing.assert_close(logits, plain)
    q, k, _ = seen[0].split(module.split_size, dim=2)  # (B, T, C) each
    b, t, c = q.shape
    heads = module.num_heads
    q, k = (x.view(b, t, heads, c // heads).transpose(1, 2) for x in (q, k))  # (B, H, T, D)
    mask = encode(lm, BATCH)["attention_mask"].bool()  # (B, T): False on padding
    allowed = torch.ones(t, t, dtype=torch.bool).tril() & mask[:, None, None, :]  # (B, 1, T, T)
    by_hand = (q @ k.transpose(-1, -2) / math.sqrt(c // heads)).masked_fill(~allowed, -1e30)
    by_hand = by_hand.softmax(-1)  # (B, H, T, T)
    real = mask[:, None, :, None] & mask[:, None, None, :]  # query and key both real tokens
    want = torch.where(real, by_hand, 0.0)
    torch.testing.assert_close(torch.where(real, pattern, 0.0), want)
    torch.testing.assert_close(scores.softmax(-1), pattern)


def test_sdpa_and_eager_patterns_agree_on_a_padded_batch(models):
    got = {}
    for impl in ("eager", "sdpa"):
        lm = models["llama", impl]
        with lm.trace(BATCH):
            got[impl] = lm.model.layers[2].self_attn.source.softmax_0.output.save()
    torch.testing.assert_close(got["sdpa"], got["eager"])


def test_each_generation_step_has_its_pattern(models):
    lm = models["llama", "sdpa"]
    with lm.generate(PROMPT, max_new_tokens=3) as tracer:
        patterns = []
        for _ in tracer.iter[:3]:
            patterns.append(lm.model.layers[0].self_attn.source.softmax_0.output.save())
    t = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"].shape[1]
    assert [p.shape[-2:] for p in patterns] == [(t, t), (1, t + 1), (1, t + 2)]
    for p in patterns:
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))


def test_a_site_read_after_calling_its_module_belongs_to_that_call(models):
    lm = models["llama", "sdpa"]
    x = torch.randn(1, 3, lm._module.config.hidden_size)
    with lm.trace(PROMPT):
        lm.model.layers[0].mlp(x)
        act = lm.model.layers[0].mlp.source.act_fn_0.output.save()
    mlp = lm._module.model.layers[0].mlp
    with torch.no_grad():
        torch.testing.assert_close(act, mlp.act_fn(mlp.gate_proj(x)))


# -- writes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_zeroing_the_pattern_equals_zeroing_the_attention_by_hand(models, impl):
    lm = models["llama", impl]
    with lm.trace(BATCH):
        lm.model.layers[0].self_attn.source.softmax_0.output[:] = 0.0
        logits = lm.output.logits.save()

    def zero(module, args, output):  # no attention weights: o_proj (no bias) of zeros
        return (torch.zeros_like(output[0]), *output[1:])

    torch.testing.assert_close(logits, run_plain(lm, BATCH, [(attention(lm, "llama"), zero)]))


def test_scaling_q_proj_equals_a_hook_that_scales_it(models):
    lm = models["llama", "sdpa"]
    with lm.trace(BATCH):
        q_proj = lm.model.layers[1].self_attn.source.q_proj_0
        q_proj.output = q_proj.output * 2.0
        logits = lm.output.logits.save()
    double = (lm._module.model.layers[1].self_attn.q_proj, lambda m, a, o: o * 2.0)
    plain = run_plain(lm, BATCH)
    torch.testing.assert_close(logits, run_plain(lm, BATCH, [double]))
    assert not torch.allclose(logits, plain)


def test_writing_a_calls_input_equals_a_pre_hook(models):
    lm = models["gpt2", "sdpa"]
    with lm.trace(BATCH):
        site = lm.transformer.h[2].attn.source.c_proj_0
        site.input = site.input * 0.5
        logits = lm.output.logits.save()
    c_proj = lm._module.transformer.h[2].attn.c_proj
    handle = c_proj.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    try:
        want = run_plain(lm, BATCH)
    finally:
        handle.remove()
    torch.testing.assert_close(logits, want)


def test_the_modules_own_forward_is_back_after_a_run_also_a_failed_one(models):
    lm = models["llama", "sdpa"]
    module = lm._module.model.layers[0].self_attn
    with lm.trace(PROMPT):
        lm.model.layers[0].self_attn.source.softmax_0.output.save()
    assert "forward" not in module.__dict__
    with pytest.raises(RuntimeError):
        with lm.trace(PROMPT):
            lm.model.layers[0].self_attn.source.softmax_0.output[:] = torch.ones(7, 7, 7)
    assert "forward" not in module.__dict__
    torch.testing.assert_close(run_plain(lm, PROMPT), run_plain(models["llama", "eager"], PROMPT))


# -- names and errors ----------------------------------------------------------------------------
def test_printing_lists_the_sites_with_their_lines(models):
    text = str(models["llama", "sdpa"].model.layers[0].self_attn.source)
    assert text.startswith("model.layers.0.self_attn.source (LlamaAttention.forward):")
    assert "q_proj_0" in text and "self.q_proj(hidden_states)" in text
    assert "softmax_0" in text and "nn.functional.softmax(attn_weights" in text
    names = models["gpt2", "eager"].transformer.h[0].attn.source.names
    assert {"c_attn_1", "attention_interface_0", "softmax_0", "c_proj_0"} <= set(names)


def test_an_unknown_site_is_a_clear_error_with_close_matches(models):
    lm = models["llama", "sdpa"]
    with pytest.raises(AttributeError, match=r"no call site 'softmx_0'; did you mean 'softmax_0'"):
        with lm.trace(PROMPT):
            lm.model.layers[0].self_attn.source.softmx_0.output.save()
    with pytest.raises(AttributeError, match="ModuleList.*no source sites"):
        lm.model.layers.source.anything  # noqa: B018
    with pytest.raises(AttributeError, match=r"test_source.py:\d+.*no call site 'bogus_0'"):
        with lm.trace(PROMPT) as tracer:
            tracer.read("model.layers.0.self_attn:bogus_0", "output").save()


def test_a_site_is_used_only_inside_a_trace(models):
    site = models["llama", "sdpa"].model.layers[0].self_attn.source.softmax_0
    with pytest.raises(lt.TraceError, match=r"\.source\.softmax_0\.output .*no trace is active"):
        site.output  # noqa: B018


# -- remote ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["inproc", "socket", "process"])
def test_remote_equals_local(how, local_llama, request):
    handle = request.getfixturevalue(f"{how}_client").model(MODEL)
    values = []
    for lm in (local_llama, handle):
        with lm.trace(BATCH):
            attn = lm.model.layers[0].self_attn.source
            q = attn.q_proj_0.output.save()
            pattern = attn.softmax_0.output.save()
            attn.softmax_0.output[:, :, -1] = 0.0
            logits = lm.output.logits.save()
        values.append((q, pattern, logits))
    for got, want in zip(values[1], values[0]):
        torch.testing.assert_close(got, want)
    local = local_llama.model.layers[0].self_attn.source
    assert str(handle.model.layers[0].self_attn.source) == str(local)


def test_the_server_refuses_unknown_sites_and_paths(inproc_client):
    handle = inproc_client.model(MODEL)
    with pytest.raises(AttributeError, match="LlamaAttention.forward has no call site 'bogus_0'"):
        with handle.trace(PROMPT) as tracer:
            tracer.read("model.layers.0.self_attn:bogus_0", "output").save()
    with pytest.raises(AttributeError, match="has no module 'model.nowhere'"):
        with handle.trace(PROMPT) as tracer:
            tracer.read("model.nowhere:softmax_0", "output").save()


def test_the_server_lets_a_graph_replace_data_only(inproc_client):
    handle = inproc_client.model(MODEL)
    with pytest.raises(OpNotAllowedError, match="attention_interface_0's inputs hold Python obj"):
        with handle.trace(PROMPT):
            site = handle.model.layers[0].self_attn.source.attention_interface_0
            site.inputs = site.inputs  # its first argument is the attention module itself
            handle.output.logits.save()


def test_the_server_checks_a_site_against_its_own_code(served_llama):
    attn = "model.layers.0.self_attn"
    _check_node(Node(0, "output", f"{attn}:softmax_0"), served_llama, trusted=False)
    with pytest.raises(AttributeError, match="did you mean 'softmax_0'"):
        _check_node(Node(0, "output", f"{attn}:softmax_9"), served_llama, trusted=False)
    with pytest.raises(OpNotAllowedError, match="not a module"):
        _check_node(Node(0, "module", f"{attn}:softmax_0"), served_llama, trusted=False)


class Recorder:
    """A listener of every site of a module that replaces nothing and counts what fired."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names, self.fired = names, set()

    def active(self) -> bool:
        return True

    def fire(self, name, kind, value):
        self.fired.add(name)
        return value


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_instrumenting_every_module_changes_nothing(models, arch):
    lm = models[arch, "sdpa"]
    want = run_plain(lm, BATCH)
    handles, recorders, ran = [], {}, set()
    for module in lm._module.modules():
        names = source.of(type(module)).names
        if names:
            recorders[module] = Recorder(names)
            handles.append(source.instrument(module, recorders[module]))
            handles.append(module.register_forward_hook(lambda m, a, o: ran.add(m)))
    try:
        got = run_plain(lm, BATCH)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(got, want)
    assert {m for m, r in recorders.items() if r.fired} == ran  # each forward that ran: its sites
    assert "softmax_0" in set().union(*(r.fired for r in recorders.values()))
    assert not any("forward" in m.__dict__ for m in lm._module.modules())


def test_names_are_source_order_and_computed_once_per_class(models):
    cls = type(attention(models["llama", "sdpa"], "llama"))
    sites = source.of(cls)
    assert sites is source.of(cls)
    names = [s.name for s in sites.sites]
    assert names[:3] == ["q_proj_0", "view_0", "transpose_0"]
    assert names.index("attention_interface_0") < names.index("softmax_0") < names.index("o_proj_0")
