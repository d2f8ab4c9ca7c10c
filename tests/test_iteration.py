"""Generation iteration in every form, against a hand-hooked ``model.generate``.

The oracle is the Hugging Face model's own ``generate`` on the same left-padded batch, with
hooks written out by hand (as in ``test_generate.py``): one records a module's output at every
forward call, one scales an MLP's output at chosen calls. Step ``i`` is the ``i``-th forward.
Generation that stops early uses an end-of-sequence token chosen from a plain run, so the
number of steps that run is known.
"""

from __future__ import annotations

import logging

import pytest
import torch

import lazytensor as lt
from lazytensor.core.errors import ProtocolError
from lazytensor.core.graph import Graph
from lazytensor.protocol import messages

PROMPTS = ["Hello world", "The capital of France is"]
STEPS = 5
OPTIONS = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False}
MLP = {"llama": "model.layers.1.mlp", "gpt2": "transformer.h.1.mlp"}
FIRST = {"llama": "model.layers.0.mlp", "gpt2": "transformer.h.0.mlp"}
LONG = 10  # the most steps a generation that stops early may run


def hooked_generate(lm, prompts, options, reads=(), scale=None, rows=slice(None)):
    """``generate`` with hand-written hooks: the ids, and each read module's outputs by call.

    ``scale`` is ``(path, calls)``: that module's output ``rows`` are halved at those calls.
    """
    tokenizer, hf = lm.tokenizer, lm._module
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width, pad = max(map(len, encoded)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in encoded])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in encoded])  # (B, T)
    seen: dict[str, list] = {path: [] for path in reads}
    handles = []
    if scale is not None:
        path, calls, count = scale[0], scale[1], [0]

        def halve(module, args, output):
            if count[0] in calls:
                output[rows] *= 0.5
            count[0] += 1

        handles.append(hf.get_submodule(path).register_forward_hook(halve))
    for path in reads:
        store = seen[path]
        handles.append(
            hf.get_submodule(path).register_forward_hook(
                lambda m, a, out, store=store: store.append(out.clone())
            )
        )
    try:
        with torch.no_grad():
            tokens = hf.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **options)
    finally:
        for handle in handles:
            handle.remove()
    return tokens, seen


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def exact_all(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        exact(got, want)


# -- every step that runs: iter[:], all() ------------------------------------------------------


def test_unbounded_iteration_saves_one_value_per_step(lm, arch):
    with lm.generate(PROMPTS, **OPTIONS) as tracer:
        logits = []
        for _ in tracer.iter[:]:
            logits.append(lm.lm_head.output.save())
            lm.get(MLP[arch]).output[:] *= 0.5
        with tracer.all():
            firsts = lt.save([lm.get(FIRST[arch]).output])
        for _ in tracer.all():
            last = lm.lm_head.output.save()  # a name holds the last step's value
        tokens = tracer.result.save()
    want_tokens, seen = hooked_generate(
        lm, PROMPTS, OPTIONS, reads=("lm_head", FIRST[arch]), scale=(MLP[arch], range(STEPS))
    )
    exact(tokens, want_tokens)
    exact_all(logits, seen["lm_head"])
    exact_all(firsts, seen[FIRST[arch]])
    exact(last, seen["lm_head"][-1])
    _, plain = hooked_generate(lm, PROMPTS, OPTIONS, reads=("lm_head",))
    assert not torch.equal(logits[1], plain["lm_head"][1])  # the edit applied at every step


def test_a_value_of_two_steps_is_computed_once_per_step(llama):
    """A node that reads two modules of the same step waits for both at every step."""
    seen_steps = []

    def record(a, b):
        seen_steps.append((a.shape, b.shape))
        return b - a

    with llama.generate(PROMPTS, **OPTIONS) as tracer:
        deltas = []
        for _ in tracer.iter[:]:
            first = llama.model.layers[0].output
            second = llama.model.layers[1].output
            deltas.append(lt.apply(record, first, second).save())
    _, seen = hooked_generate(llama, PROMPTS, OPTIONS, reads=("model.layers.0", "model.layers.1"))
    exact_all(deltas, [b - a for a, b in zip(seen["model.layers.0"], seen["model.layers.1"])])
    assert len(seen_steps) == STEPS  # once per step, never on a mix of two steps


def test_shape_inside_unbounded_iteration(llama):
    with llama.generate(PROMPTS, **OPTIONS) as tracer:
        for _ in tracer.iter[:]:
            shape = llama.lm_head.output.shape
    assert shape == (len(PROMPTS), 1, llama._module.config.vocab_size)


# -- some steps: a list, a block, next() ------------------------------------------------------


def test_a_list_of_steps(lm, arch):
    with lm.generate(PROMPTS, **OPTIONS) as tracer:
        logits = {}
        for step in tracer.iter[[0, 2, 4]]:
            logits[step] = lm.lm_head.output.save()
    _, seen = hooked_generate(lm, PROMPTS, OPTIONS, reads=("lm_head",))
    assert sorted(logits) == [0, 2, 4]
    for step, got in logits.items():
        exact(got, seen["lm_head"][step])


def test_block_form_applies_at_each_step_of_the_range(lm, arch):
    with lm.generate(PROMPTS, **OPTIONS) as tracer:
        outs = []
        with tracer.iter[1:3]:  # recorded once, applied at steps 1 and 2
            lm.get(MLP[arch]).output[:] *= 0.5
            outs.append(lm.lm_head.output.save())
        tokens = tracer.result.save()
    want_tokens, seen = hooked_generate(
        lm, PROMPTS, OPTIONS, reads=("lm_head",), scale=(MLP[arch], {1, 2})
    )
    exact(tokens, want_tokens)
    exact_all(outs, seen["lm_head"][1:3])


def test_next_moves_module_access_to_the_next_step(lm, arch):
    with lm.generate(PROMPTS, **OPTIONS) as tracer:
        zero = lm.get(FIRST[arch]).output.save()
        tracer.next()
        one = lm.get(FIRST[arch]).output.save()
        tracer.next()
        lm.get(MLP[arch]).output[:] *= 0.5
        tokens = tracer.result.save()
    want_tokens, seen = hooked_generate(
        lm, PROMPTS, OPTIONS, reads=(FIRST[arch],), scale=(MLP[arch], {2})
    )
    exact(zero, seen[FIRST[arch]][0])
    exact(one, seen[FIRST[arch]][1])
    exact(tokens, want_tokens)


# -- the generator: its output and its streamed tokens ------------------------------------------


def test_generator_output_and_streamed_tokens(lm):
    with lm.generate(PROMPTS, **OPTIONS) as tracer:
        streamed = []
        for _ in tracer.iter[:]:
            streamed.append(lm.generator.streamer.output.save())
        second = [lm.generator.streamer.output.save() for _ in tracer.iter[1]]
        tokens = lm.generator.output.save()
        result = tracer.result.save()
    want, _ = hooked_generate(lm, PROMPTS, OPTIONS)
    exact(tokens, want)
    exact(result, want)
    width = want.shape[1] - STEPS
    exact_all(streamed, [want[:, width + step] for step in range(STEPS)])
    exact(second[0], want[:, width + 1])


def test_streamed_tokens_need_a_generation(llama):
    with pytest.raises(lt.TraceError, match="inside `with lm.generate"):
        with llama.trace("Hello"):
            llama.generator.streamer.output.save()


# -- generation that stops early ----------------------------------------------------------------


def early_stop(lm) -> tuple[str, dict, int]:
    """A prompt, options under which its generation stops early, and how many steps run.

    The end-of-sequence token is the first token the model generates for it that it has not
    generated before (the tiny random models repeat themselves a lot).
    """
    for prompt in ("Hello world", "Q: cheap\nA:"):
        plain, _ = hooked_generate(lm, [prompt], {"max_new_tokens": LONG, "do_sample": False})
        new = plain[0, -LONG:].tolist()
        for step in range(1, LONG - 1):
            if new[step] not in new[:step]:
                return prompt, {"max_new_tokens": LONG, "eos_token_id": new[step]}, step + 1
    raise AssertionError("no token stops these generations early")


def test_steps_that_never_ran_raise_when_read(lm, caplog):
    prompt, options, ran = early_stop(lm)
    with caplog.at_level(logging.WARNING, logger="lazytensor"):
        with lm.generate(prompt, **options) as tracer:
            logits = [lm.lm_head.output.save() for _ in tracer.iter[0:LONG]]
            every = []
            for _ in tracer.iter[:]:
                every.append(lm.lm_head.output.save())
            late = [lm.lm_head.output.save() for _ in tracer.iter[LONG - 1]][0]
            tokens = tracer.result.save()
    want, seen = hooked_generate(lm, [prompt], options, reads=("lm_head",))
    exact(tokens, want)
    assert len(seen["lm_head"]) == ran
    exact_all(logits[:ran], seen["lm_head"])  # the steps that ran keep their values
    exact_all(every, seen["lm_head"])
    assert f"generation stopped after {ran} step(s)" in caplog.text
    for proxy in (*logits[ran:], late):
        assert isinstance(proxy, lt.Proxy)
        with pytest.raises(lt.TraceError) as info:
            _ = proxy.shape
        message = str(info.value)
        assert "test_iteration.py:" in message and "never ran" in message
        assert f"generation stopped after {ran} steps" in message


# -- misuse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", [slice(-1, 0), -1, [0, -2], slice(0, -1), slice(2, 1), slice(0, 4, 0), 1.5]
)
def test_bad_steps_are_refused(llama, key):
    with pytest.raises(lt.TraceError, match="tracer.iter"):
        with llama.generate(PROMPTS, **OPTIONS) as tracer:
            _ = tracer.iter[key]


def test_the_step_of_an_unbounded_iteration_has_no_value(llama):
    with pytest.raises(lt.TraceError, match="has no value"):
        with llama.generate(PROMPTS, **OPTIONS) as tracer:
            for step in tracer.iter[:]:
                if step == 0:
                    pass


def test_next_inside_every_step_is_refused(llama):
    with pytest.raises(lt.TraceError, match="several steps"):
        with llama.generate(PROMPTS, **OPTIONS) as tracer:
            with tracer.all():
                tracer.next()


def test_block_of_uneven_steps_is_refused(llama):
    with pytest.raises(lt.TraceError, match="evenly spaced"):
        with llama.generate(PROMPTS, **OPTIONS) as tracer:
            with tracer.iter[[0, 1, 3]]:
                pass


# -- the wire ------------------------------------------------------------------------------------


def test_call_ranges_cross_the_wire_and_bad_ones_are_refused():
    graph = Graph()
    graph.add("output", "lm_head", call=(2, None, 1))
    graph.add("output", "lm_head", call=(0, 6, 2))
    data = messages.encode_graph(graph)
    assert [n.call for n in messages.decode_graph(data).nodes] == [(2, None, 1), (0, 6, 2)]
    for bad in [(-1, None, 1), (3, 3, 1), (0, None, 0), (0, 1), "0", (0, None, True)]:
        data["nodes"][0][5] = bad
        with pytest.raises(ProtocolError, match="call"):
            messages.decode_graph(data)


def test_remote_iteration_equals_local(local_llama, inproc_client):
    prompt, options, ran = early_stop(local_llama)

    def run(remote):
        with local_llama.generate(prompt, remote=remote, **options) as tracer:
            every = []
            for _ in tracer.iter[:]:
                every.append(local_llama.lm_head.output.save())
                every.append(local_llama.generator.streamer.output.save())
            steps = [local_llama.lm_head.output.save() for _ in tracer.iter[0:LONG]]
        return every, steps

    every, steps = run(inproc_client)
    want_every, want_steps = run(False)
    assert len(every) == 2 * ran
    exact_all(every, want_every)
    exact_all(steps[:ran], want_steps[:ran])
    with pytest.raises(lt.TraceError, match=f"stopped after {ran} steps"):
        _ = steps[-1].shape
