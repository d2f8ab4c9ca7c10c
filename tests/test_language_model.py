"""LanguageModel oracle tests: every intervention against the same one written by hand.

Each test runs the issue's snippet through :class:`lazytensor.LanguageModel` and the same
intervention as a ``register_forward_hook``/``register_forward_pre_hook`` on the same Hugging
Face model, with inputs built here by hand (left padding, the attention mask and position ids
``cumsum(mask) - 1``). Identical computations are compared exactly. Llama and GPT-2 differ
only in module paths (``model.layers[i].mlp.down_proj`` vs ``transformer.h[i].mlp.c_proj``).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

import lazytensor as lt
from handmade import hooked

SENTENCES = ["Q: cheap\nA:", "Q: big\nA:", "Q: fast\nA:"]
PROMPTS = ["Hello world", "The capital of France is", "Q: big\nA:"]
FORCED = {1: [7, 25], 3: [94]}

#: Module paths per architecture: (layer list, MLP output projection, final norm, embedding).
PATHS = {
    "llama": ("model.layers", "mlp.down_proj", "model.norm", "model.embed_tokens"),
    "gpt2": ("transformer.h", "mlp.c_proj", "transformer.ln_f", "transformer.wte"),
}


# -- the hand-written side -------------------------------------------------------------------
def encode(tokenizer, rows: list[list[int]] | list[str]) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` built by hand."""
    rows = [tokenizer(r)["input_ids"] if isinstance(r, str) else list(r) for r in rows]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def run(lm: lt.LanguageModel, texts, *hooks) -> torch.Tensor:
    """The HF model's logits on ``texts`` with ``hooks`` installed."""
    with torch.no_grad(), hooked(*hooks):
        return lm._module(**encode(lm.tokenizer, texts)).logits


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def exact(actual, expected) -> None:
    """Bit-for-bit equality; a saved proxy is compared through its real ``.value``."""
    actual, expected = (x if isinstance(x, lt.Proxy) else x for x in (actual, expected))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# -- neuron forcing --------------------------------------------------------------------------
def check_forcing(lm: lt.LanguageModel, out, top, down: str) -> None:
    hf = lm._module

    def force(ids):
        def hook(module, args):
            args[0][3:, -1, ids] = 5.0

        return hook

    hooks = [
        (hf.get_submodule(down.format(layer)), "pre", force(ids)) for layer, ids in FORCED.items()
    ]
    expected = run(lm, SENTENCES + SENTENCES, *hooks)
    exact(out.logits, expected)
    values, indices = expected[:, -1].softmax(-1).topk(5)
    exact(top.values, values)
    exact(top.indices, indices)
    clean = run(lm, SENTENCES + SENTENCES)
    exact(out.logits[:3], clean[:3])  # rows 0..2 untouched
    assert not torch.allclose(out.logits[3:, -1], clean[3:, -1])


def test_neuron_forcing_llama(llama):
    lm, sentences = llama, SENTENCES
    with lm.trace(sentences + sentences):
        for layer, ids in {1: [7, 25], 3: [94]}.items():
            x = lm.model.layers[layer].mlp.down_proj.input
            x[3:, -1, ids] = 5.0  # rows 3.. only, last position
        out = lm.output.save()
    top = out.logits[:, -1].softmax(-1).topk(5)
    check_forcing(lm, out, top, "model.layers.{}.mlp.down_proj")


def test_neuron_forcing_gpt2(gpt2):
    lm, sentences = gpt2, SENTENCES
    with lm.trace(sentences + sentences):
        for layer, ids in {1: [7, 25], 3: [94]}.items():
            x = lm.transformer.h[layer].mlp.c_proj.input
            x[3:, -1, ids] = 5.0
        out = lm.output.save()
    top = out.logits[:, -1].softmax(-1).topk(5)
    check_forcing(lm, out, top, "transformer.h.{}.mlp.c_proj")


# -- activation patching across invokes ------------------------------------------------------
PATCH_PROMPTS = ["The Eiffel Tower is in", "The Colosseum is in"]


def check_patching(lm: lt.LanguageModel, clean, patched, everything, layer: str) -> None:
    hf = lm._module
    seen = {}

    def patch(module, args, output):
        seen["clean"] = output[0:1, -1].clone()
        output[1:2, -1] = output[0:1, -1]

    expected = run(lm, PATCH_PROMPTS, (hf.get_submodule(layer), "post", patch))
    exact(clean, seen["clean"])
    exact(patched, expected[1:2, -1])
    exact(everything, expected)  # the empty invoke sees both rows
    unpatched = run(lm, PATCH_PROMPTS)
    assert not torch.allclose(patched, unpatched[1:2, -1])


def test_patching_across_invokes_llama(llama):
    lm = llama
    with lm.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            clean = lm.model.layers[2].output[:, -1].save()
        with tracer.invoke("The Colosseum is in"):
            lm.model.layers[2].output[:, -1] = clean  # activation patching across invokes
            patched = lm.lm_head.output[:, -1].save()
        with tracer.invoke():  # an empty invoke sees the whole batch
            everything = lm.lm_head.output.save()
    check_patching(lm, clean, patched, everything, "model.layers.2")


def test_patching_across_invokes_gpt2(gpt2):
    lm = gpt2
    with lm.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            clean = lm.transformer.h[2].output[:, -1].save()
        with tracer.invoke("The Colosseum is in"):
            lm.transformer.h[2].output[:, -1] = clean
            patched = lm.lm_head.output[:, -1].save()
        with tracer.invoke():
            everything = lm.lm_head.output.save()
    check_patching(lm, clean, patched, everything, "transformer.h.2")


# -- logit lens ------------------------------------------------------------------------------
def check_lens(lm: lt.LanguageModel, lens, arch: str) -> None:
    layers_path, _, norm_path, _ = PATHS[arch]
    hf = lm._module
    layers = hf.get_submodule(layers_path)
    outputs = []
    hooks = [(layer, "post", lambda m, a, o: outputs.append(o.clone())) for layer in layers]
    logits = run(lm, ["The capital of France is"], *hooks)
    with torch.no_grad():
        norm = hf.get_submodule(norm_path)
        expected = [hf.lm_head(norm(h)).argmax(-1) for h in outputs]
    assert len(lens) == len(expected) == len(layers)
    for got, want in zip(lens, expected):
        exact(got, want)
    exact(lens[-1], logits.argmax(-1))  # the last layer's lens is the model's prediction


def test_logit_lens_llama(llama):
    lm = llama
    with lm.trace("The capital of France is"):
        lens = [
            lm.lm_head(lm.model.norm(layer.output)).argmax(-1).save() for layer in lm.model.layers
        ]
    check_lens(lm, lens, "llama")


def test_logit_lens_gpt2(gpt2):
    lm = gpt2
    with lm.trace("The capital of France is"):
        lens = [
            lm.lm_head(lm.transformer.ln_f(layer.output)).argmax(-1).save()
            for layer in lm.transformer.h
        ]
    check_lens(lm, lens, "gpt2")


# -- inputs and padding ----------------------------------------------------------------------
def _inputs(tokenizer) -> dict[str, tuple[object, list[list[int]]]]:
    """Each kind of input, with the token rows it must mean."""
    a, b = (tokenizer(p)["input_ids"] for p in PROMPTS[:2])
    assert len(a) != len(b)  # so that a batch of both is padded
    padded = tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
    return {
        "str": (PROMPTS[1], [b]),
        "list[str]": (PROMPTS[:2], [a, b]),
        "ids": (b, [b]),
        "list[ids]": ([a, b], [a, b]),
        "tensor 1-D": (torch.tensor(b), [b]),
        "tensor 2-D": (torch.tensor([b, b]), [b, b]),
        "dict": ({"input_ids": a}, [a]),
        "BatchEncoding": (padded, [a, b]),
    }


INPUT_KINDS = [
    "str",
    "list[str]",
    "ids",
    "list[ids]",
    "tensor 1-D",
    "tensor 2-D",
    "dict",
    "BatchEncoding",
]


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_input_kinds(lm, kind):
    value, rows = _inputs(lm.tokenizer)[kind]
    with lm.trace(value):
        logits = lm.output.logits.save()
    exact(logits, run(lm, rows))


def test_padded_rows_match_prompts_alone(lm, arch):
    embed = PATHS[arch][3]
    rows = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    assert len({len(r) for r in rows}) == len(rows)  # the batch really is padded
    with lm.trace(PROMPTS):
        ids = lm.get(embed).input.save()
        logits = lm.output.logits.save()
    exact(ids[:, -1], torch.tensor([r[-1] for r in rows]))  # -1 is every row's last real token
    with torch.no_grad():
        for i, row in enumerate(rows):
            alone = lm._module(input_ids=torch.tensor([row])).logits[0]  # (T_i, V)
            torch.testing.assert_close(logits[i, -len(row) :], alone)


# -- constructing a LanguageModel --------------------------------------------------------------
def test_model_object_with_tokenizer(llama, llama_path):
    hf = AutoModelForCausalLM.from_pretrained(llama_path)
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    lm = lt.LanguageModel(hf, tokenizer=tokenizer)
    assert lm._module is hf and lm.tokenizer is tokenizer
    with lm.trace(PROMPTS):
        lm.model.layers[1].output[:, -1] = 0.0
        logits = lm.output.logits.save()
    with llama.trace(PROMPTS):
        llama.model.layers[1].output[:, -1] = 0.0
        expected = llama.output.logits.save()
    exact(logits, expected)


def test_model_object_without_tokenizer_needs_one():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    hf = AutoModelForCausalLM.from_config(config)  # no path to load a tokenizer from
    with pytest.raises(lt.TraceError, match="tokenizer="):
        lt.LanguageModel(hf)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_by_name(llama_path, dtype):
    lm = lt.LanguageModel(llama_path, dtype=dtype)
    want = getattr(torch, dtype)
    assert {p.dtype for p in lm._module.parameters()} == {want}
    with lm.trace(PROMPTS):
        logits = lm.output.logits.save()
    reference = AutoModelForCausalLM.from_pretrained(llama_path, dtype=want).eval()
    with torch.no_grad():
        expected = reference(**encode(lm.tokenizer, PROMPTS)).logits
    assert logits.dtype == want
    exact(logits, expected)


def test_dispatch_false_loads_at_first_trace(llama, llama_path):
    lm = lt.LanguageModel(llama_path, dispatch=False)
    assert {p.device.type for p in lm._module.parameters()} == {"meta"}
    with lm.trace(SENTENCES + SENTENCES):
        for layer, ids in FORCED.items():
            lm.model.layers[layer].mlp.down_proj.input[3:, -1, ids] = 5.0
        shape = lm.model.layers[3].mlp.down_proj.input.shape
        logits = lm.output.logits.save()
    assert shape[-1] == lm._module.config.intermediate_size
    assert {p.device.type for p in lm._module.parameters()} == {"cpu"}
    with llama.trace(SENTENCES + SENTENCES):
        for layer, ids in FORCED.items():
            llama.model.layers[layer].mlp.down_proj.input[3:, -1, ids] = 5.0
        expected = llama.output.logits.save()
    exact(logits, expected)


# -- shapes inside the trace -------------------------------------------------------------------
def test_shape_inside_trace_without_running_the_model(lm, arch):
    layers_path, _, _, _ = PATHS[arch]
    hf = lm._module
    real_calls = []

    def count(module, args, kwargs):
        if not isinstance(kwargs["input_ids"], FakeTensor):
            real_calls.append(1)

    handle = hf.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with lm.trace(PROMPTS):
            layer = lm.get(layers_path)[0]
            shape = layer.output.shape
            vocab = lm.output.logits.shape[-1]
            rows = len(layer.output)
            assert real_calls == []  # answered without running the real forward
            h = layer.output
            h[..., : h.shape[-1] // 2] = 0.0
            logits = lm.output.logits.save()
    finally:
        handle.remove()
    width = max(len(lm.tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert shape == (len(PROMPTS), width, hf.config.hidden_size)
    assert vocab == hf.config.vocab_size and rows == len(PROMPTS)
    assert real_calls == [1]

    def zero_half(module, args, output):
        output[..., : output.shape[-1] // 2] = 0.0

    exact(logits, run(lm, PROMPTS, (hf.get_submodule(layers_path)[0], "post", zero_half)))


# -- materialization and strict mode -----------------------------------------------------------
def test_materialization_equals_final_value(lm, arch, caplog):
    layers = PATHS[arch][0]
    with caplog.at_level(logging.WARNING, logger="lazytensor"), lm.trace(PROMPTS):
        lm.get(layers)[0].output[:] *= 2
        h = lm.get(layers)[1].output[:, -1]
        early = [h.tolist() for _ in range(2)]  # one warning per call site
        lm.get(layers)[2].output[:] *= 0.5  # recording goes on after the sync point
        final = h.save()
        logits = lm.output.logits.save()
    assert len(caplog.records) == 1 and "early = [h.tolist()" in caplog.records[0].getMessage()
    exact(torch.tensor(early[0]), final)
    assert early[1] == early[0]

    hf, seen = lm._module, {}
    stack = hf.get_submodule(layers)

    def double(module, args, output):
        output[:] *= 2

    def read(module, args, output):
        seen["h"] = output[:, -1].clone()

    def halve(module, args, output):
        output[:] *= 0.5

    expected = run(
        lm, PROMPTS, (stack[0], "post", double), (stack[1], "post", read), (stack[2], "post", halve)
    )
    exact(final, seen["h"])
    exact(logits, expected)


def test_strict_mode_refuses_to_materialize(lm, arch):
    hf = lm._module
    calls = []
    handle = hf.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with pytest.raises(lt.StrictModeError) as info, lm.trace(PROMPTS, strict=True):
            h = lm.get(PATHS[arch][0])[1].output
            float(h.sum())
    finally:
        handle.remove()
    assert "test_language_model.py" in str(info.value)
    assert '"float(h.sum())"' in str(info.value)
    assert calls == []  # the model never ran


# -- errors ------------------------------------------------------------------------------------
def test_wrong_module_path_lists_close_names(llama, gpt2):
    before = hook_count(llama._module)
    with pytest.raises(AttributeError, match=r"did you mean 'layers'\?.*embed_tokens, layers"):
        with llama.trace(PROMPTS):
            llama.model.layer[0].output.save()
    with pytest.raises(AttributeError, match=r"did you mean 'ln_f'\?"):
        with gpt2.trace(PROMPTS):
            gpt2.transformer.ln_final.output.save()
    assert hook_count(llama._module) == before


def test_out_of_range_neuron_quotes_the_line(lm, arch):
    _, down, _, _ = PATHS[arch]
    before = hook_count(lm._module)
    with pytest.raises(IndexError) as info, lm.trace(SENTENCES):
        x = lm.get(PATHS[arch][0])[1].get(down).input
        x[:, -1, [10**6]] = 5.0
    message = str(info.value)
    assert "test_language_model.py:" in message
    assert '"x[:, -1, [10**6]] = 5.0"' in message
    assert "1000000" in message
    assert hook_count(lm._module) == before
