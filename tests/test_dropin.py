"""nnsight users' code runs unchanged: real tensors after the block, every input form, loading
arguments, aliases and custom envoys. Each result is checked against the same computation done
by hand on the Hugging Face model (``lm._module``) with plain PyTorch.
"""

from __future__ import annotations

import gc
import io
import pickle
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import lazytensor as lt
from lazytensor.frontend.served import in_process
from test_language_model import encode

PROMPTS = ["Hello world", "The capital of France is"]


def logits_by_hand(lm: lt.LanguageModel, rows) -> torch.Tensor:
    with torch.no_grad():
        return lm._module(**encode(lm.tokenizer, rows)).logits


# -- 1. a saved value is the real thing after the block ----------------------------------------
def test_saved_names_and_containers_hold_tensors(llama):
    with llama.trace("Hello"):
        h = llama.model.layers[0].output.save()
        parts = [llama.model.layers[i].output[:, -1] for i in range(2)]
        lt.save(parts)
        d = {"logits": llama.output.logits}
        lt.save(d)
        steps = lt.save([])  # saved empty, filled later
        steps.append(llama.model.layers[1].output)
        pair = lt.save((llama.lm_head.output, 1))
        out = llama.output.save()
    assert type(h) is torch.Tensor
    assert all(type(p) is torch.Tensor for p in parts) and type(d["logits"]) is torch.Tensor
    assert type(steps[0]) is torch.Tensor and type(pair[0]) is torch.Tensor and pair[1] == 1
    assert type(out).__name__ == "CausalLMOutputWithPast"  # a model output keeps its type
    want = logits_by_hand(llama, ["Hello"])
    torch.testing.assert_close(d["logits"], want, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=0)
    torch.testing.assert_close(parts[1], steps[0][:, -1], rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(h, buffer)
    assert np.asarray(h).shape == tuple(h.shape)
    assert torch.equal(pickle.loads(pickle.dumps(h)), h)
    assert torch.equal(torch.as_tensor(h), h)


def _in_a_function(lm):
    with lm.trace("Hello"):
        h = lm.lm_head.output.save()
        kept = [lm.lm_head.output[:, -1].save()]
    return h, kept


def test_function_locals_and_threads_hold_tensors(llama):
    h, kept = _in_a_function(llama)
    assert type(h) is torch.Tensor and type(kept[0]) is torch.Tensor
    torch.testing.assert_close(h, logits_by_hand(llama, ["Hello"]), rtol=0, atol=0)
    results = []
    thread = threading.Thread(target=lambda: results.append(_in_a_function(llama)))
    thread.start()
    thread.join(60)
    assert type(results[0][0]) is torch.Tensor
    assert torch.equal(results[0][0], h)


def test_unsaved_values_stay_proxies_that_say_so(llama):
    with llama.trace("Hello"):
        hidden = llama.model.layers[0].output
        llama.output.save()
    assert isinstance(hidden, lt.Proxy)
    with pytest.raises(lt.TraceError, match="not saved"):
        _ = hidden.value


def test_a_non_blocking_job_publishes_on_result(llama_service, local_llama):
    client = in_process(llama_service)
    with local_llama.trace("Hello", remote=client, blocking=False) as job:
        logits = local_llama.output.logits.save()
    assert isinstance(logits, lt.Proxy)
    job.result()
    assert type(logits) is torch.Tensor
    torch.testing.assert_close(logits, logits_by_hand(local_llama, ["Hello"]), rtol=0, atol=0)


# -- 2. every input form -----------------------------------------------------------------------
def test_encodings_and_keyword_inputs_match_the_prompts(llama):
    want = logits_by_hand(llama, PROMPTS)  # (B, T, V), left padded
    tok = llama.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True)  # left padding
    right = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    forms = [
        lambda: llama.trace(input_ids=enc.input_ids, attention_mask=enc.attention_mask),
        lambda: llama.trace(**enc),
        lambda: llama.trace(**right),  # the mask says which side the padding is on
        lambda: llama.trace(right.input_ids, attention_mask=right.attention_mask),
    ]
    for form in forms:
        with form():
            logits = llama.output.logits.save()
        torch.testing.assert_close(logits, want, rtol=0, atol=0)


def test_inputs_embeds_match_the_token_ids(llama):
    ids = llama.tokenizer(PROMPTS[1], return_tensors="pt").input_ids  # (1, T)
    embeds = llama._module.model.embed_tokens(ids).detach()  # (1, T, D)
    with llama.trace(inputs_embeds=embeds):
        logits = llama.output.logits.save()
    torch.testing.assert_close(logits, logits_by_hand(llama, [PROMPTS[1]]))


def test_tokenizer_arguments_go_to_the_tokenizer(llama):
    with llama.trace() as tracer:
        with tracer.invoke("a long prompt with many words in it", truncation=True, max_length=4):
            ids = llama.model.embed_tokens.input.save()
    assert ids.shape == (1, 4)
    want = llama.tokenizer("a long prompt with many words in it", truncation=True, max_length=4)
    assert ids[0].tolist() == want["input_ids"]


def test_forward_arguments_that_differ_between_invokes_are_an_error(llama):
    with pytest.raises(lt.TraceError, match="output_attentions.*True.*False"):
        with llama.trace() as tracer:
            with tracer.invoke("Hello", output_attentions=True):
                llama.output.save()
            with tracer.invoke("World", output_attentions=False):
                llama.output.save()


def test_tokenizer_kwargs_when_loading(llama_path):
    lm = lt.LanguageModel(llama_path, tokenizer_kwargs={"model_max_length": 7})
    assert lm.tokenizer.model_max_length == 7 and lm.tokenizer.padding_side == "left"


# -- 3. loading arguments are honoured or refused ---------------------------------------------
def test_loading_arguments_take_effect(llama_path):
    lm = lt.LanguageModel(llama_path, dtype="bfloat16", attn_implementation="eager")
    assert next(lm._module.parameters()).dtype == torch.bfloat16
    assert lm._module.config._attn_implementation == "eager"
    meta = lt.LanguageModel(
        llama_path, dtype=torch.bfloat16, attn_implementation="eager", dispatch=False
    )
    param = next(meta._module.parameters())
    assert param.device.type == "meta" and param.dtype == torch.bfloat16
    assert meta._module.config._attn_implementation == "eager"
    config = lm._module.config.__class__.from_pretrained(llama_path, num_hidden_layers=2)
    two = lt.LanguageModel(llama_path, config=config)
    assert len(two.model.layers) == 2
    assert lm.to("cpu") is lm and lm.eval() is lm and lm.cpu() is lm


def test_loading_arguments_that_cannot_apply_are_refused(llama_path):
    built = AutoModelForCausalLM.from_pretrained(llama_path)
    with pytest.raises(lt.TraceError, match="device_map"):
        lt.LanguageModel(built, tokenizer=lt.LanguageModel(llama_path).tokenizer, device_map="cpu")
    with pytest.raises(TypeError, match="no_such_argument"):
        lt.LanguageModel(llama_path, no_such_argument=3)


# -- 4. aliases and custom envoys ---------------------------------------------------------------
class Heads(lt.Envoy):
    @property
    def heads(self):
        b, s, h = self.output.shape
        return self.output.view(b, s, 4, h // 4)


def test_rename_and_custom_envoys(llama_path, llama):
    lm = lt.LanguageModel(
        llama_path,
        rename={"mlp": "ff", "model.layers": "layers"},
        envoys={"self_attn.o_proj": Heads},
    )
    assert isinstance(lm.layers[0].self_attn.o_proj, Heads)
    with lm.trace("Hello"):
        a = lm.layers[0].ff.output.save()
        b = lm.model.layers[0].mlp.output.save()
        heads = lm.model.layers[0].self_attn.o_proj.heads.save()
    captured = {}
    module = llama._module.model.layers[0]
    handles = [
        module.mlp.register_forward_hook(lambda m, i, o: captured.update(mlp=o)),
        module.self_attn.o_proj.register_forward_hook(lambda m, i, o: captured.update(o=o)),
    ]
    try:
        logits_by_hand(llama, ["Hello"])
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(a, captured["mlp"], rtol=0, atol=0)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    o = captured["o"]
    torch.testing.assert_close(heads, o.view(*o.shape[:2], 4, -1), rtol=0, atol=0)


class Wrapper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.output = torch.nn.Linear(4, 4)  # named like an envoy attribute

    def forward(self, x):
        return self.output(x) * 2


def test_envoy_tree_details():
    net = lt.Model(Wrapper())
    assert net["output"]._module is net._module.output  # reachable by name
    with pytest.raises(lt.TraceError, match=r"envoy\['output'\]"):
        _ = net.output
    assert bool(net["output"])  # a leaf envoy is truthy
    assert net.get("output.weight") is net._module.output.weight
    replacement = torch.nn.Linear(4, 4)
    net._module.output = replacement  # replaced after wrapping: the envoy follows
    assert net["output"]._module is replacement
    x = torch.ones(1, 4)
    with net.trace(x):
        inner = net["output"].output.save()
    torch.testing.assert_close(inner, replacement(x), rtol=0, atol=0)


# -- memory ------------------------------------------------------------------------------------
def test_a_wrapped_model_is_freed_by_reference_counting():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    net = lt.Model(module)
    with net.trace(torch.ones(1, 4)):
        saved = net[0].output.save()
    _ = net[1], net[0]
    ref = weakref.ref(module)
    gc.disable()
    try:
        del module, net
        assert ref() is None, "the model outlives its wrapper"
        assert type(saved) is torch.Tensor  # and a saved value does not keep it alive
    finally:
        gc.enable()


# -- 7. other things a user meets ---------------------------------------------------------------
def test_apply_calls_the_function_itself_locally(llama):
    seen = []
    lock = threading.Lock()  # not picklable: the function is not shipped anywhere

    def norm(t):
        with lock:
            seen.append(tuple(t.shape))
        return t.norm(dim=-1)

    with llama.trace("Hello"):
        h = llama.model.layers[1].output
        norms = lt.apply(norm, h).save()
    captured = {}
    handle = llama._module.model.layers[1].register_forward_hook(
        lambda m, i, o: captured.update(h=o[0] if isinstance(o, tuple) else o)
    )
    try:
        logits_by_hand(llama, ["Hello"])
    finally:
        handle.remove()
    assert seen == [tuple(captured["h"].shape)]  # its side effect happened here
    torch.testing.assert_close(norms, captured["h"].norm(dim=-1), rtol=0, atol=0)


def test_apply_runs_remotely_only_on_a_trusted_server(served_llama, local_llama):
    from lazytensor_server.service import Service

    def top(t):
        return t[:, -1].topk(3).indices

    with local_llama.trace("Hello"):
        want = lt.apply(top, local_llama.output.logits).save()
    service = Service([served_llama], trusted=True)
    try:
        with local_llama.trace("Hello", remote=in_process(service, timeout=60.0)):
            got = lt.apply(top, local_llama.output.logits).save()
    finally:
        service.shutdown(grace=5.0)
    assert torch.equal(got, want)


def test_shape_after_a_value_reading_function_is_a_clear_error(llama):
    with pytest.raises(lt.TraceError, match="cannot be known inside the trace.*read the shape"):
        with llama.trace("Hello"):
            ids = lt.apply(lambda t: torch.tensor(t.argmax(-1).tolist()), llama.output.logits)
            _ = ids.shape


def test_trace_false_returns_the_plain_output(llama):
    out = llama.trace(PROMPTS, trace=False)
    torch.testing.assert_close(out.logits, logits_by_hand(llama, PROMPTS), rtol=0, atol=0)
    ids = llama.generate("Hello", max_new_tokens=3, do_sample=False, trace=False)
    enc = llama.tokenizer("Hello", return_tensors="pt")
    with torch.no_grad():
        want = llama._module.generate(
            **enc, max_new_tokens=3, do_sample=False, pad_token_id=llama.tokenizer.pad_token_id
        )
    assert torch.equal(ids, want)


def test_a_client_with_no_server_fails_fast_naming_the_address():
    client = lt.connect("tcp://127.0.0.1:1", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(lt.RemoteTimeout, match=r"tcp://127\.0\.0\.1:1.*server running"):
        client.models()
    assert time.monotonic() - started < 10
    client.close()


def test_input_forms_and_aliases_remotely(inproc_client, local_llama):
    enc = local_llama.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    want = logits_by_hand(local_llama, PROMPTS)
    with local_llama.trace(**enc, remote=inproc_client):
        logits = local_llama.output.logits.save()
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    handle = inproc_client.model("llama", rename={"model.layers": "layers", "mlp": "ff"})
    with handle.trace(PROMPTS[0]):
        ff = handle.layers[1].ff.output.save()
    with local_llama.trace(PROMPTS[0]):
        mlp = local_llama.model.layers[1].mlp.output.save()
    torch.testing.assert_close(ff, mlp, rtol=0, atol=0)
