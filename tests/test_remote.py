"""Remote equals local: every kind of intervention, run on a server, gives the local values.

Each case below records the same code on a model and returns the values it saved. It runs
locally (the oracle) and remotely three ways: on the local model with ``remote=<client>``
through the in-process transport, the same through a real ZeroMQ socket, and on the remote
handle ``client.model("llama")``, which has no weights, no model class and no config here.
On CPU with the same weights the results must be bit-identical (``torch.equal``).

Cases that write check their own effect where they can (a forced row differs from the same
prompt's clean row), so a server that ignored interventions could not pass.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

import lazytensor as lt
from lazytensor.frontend.served import Client, in_process
from lazytensor_server.service import Service
from servers import MODEL

#: The statement the error test fails on, as it appears in that test.
STATEMENT = "model.model.layers[1].output[:, -1, [10**6]] = 1.0"
SENTENCES = ["Q: cheap\nA:", "Q: big\nA:", "Q: fast\nA:"]
N = len(SENTENCES)


# -- the cases: record on `model`, return the saved values as a list --------------------------


def reads(model, remote):
    with model.trace(SENTENCES, remote=remote):
        hidden = model.model.layers[1].output.save()
        neurons = model.model.layers[2].mlp.down_proj.input.save()
        logits = model.output.logits.save()
    return [hidden, neurons, logits]


def neuron_forcing(model, remote):
    with model.trace(SENTENCES + SENTENCES, remote=remote):
        for layer, ids in {1: [7, 25], 3: [94]}.items():
            x = model.model.layers[layer].mlp.down_proj.input  # (B, T, neurons)
            x[3:, -1, ids] = 5.0
        out = model.output.save()
    logits = out.logits
    assert not torch.equal(logits[N:, -1], logits[:N, -1])  # the forcing changed something
    return [logits]


def replacement(model, remote):
    with model.trace(remote=remote) as tracer:
        with tracer.invoke(SENTENCES):
            clean = model.lm_head.output.save()
        with tracer.invoke(SENTENCES):
            mlp = model.model.layers[2].mlp
            mlp.output = mlp.output * 0.5
            halved = model.lm_head.output.save()
    assert not torch.equal(clean, halved)
    return [clean, halved]


def cross_invoke_patching(model, remote):
    with model.trace(remote=remote) as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            paris = model.model.layers[2].output[:, -1, :]
        with tracer.invoke("The Colosseum is in"):
            model.model.layers[2].output[:, -1, :] = paris
            patched = model.lm_head.output[:, -1].save()
        with tracer.invoke("The Colosseum is in"):
            clean = model.lm_head.output[:, -1].save()
    assert not torch.equal(patched, clean)
    return [patched, clean]


def empty_invoke(model, remote):
    with model.trace(remote=remote) as tracer:
        with tracer.invoke("Hello world"):
            pass
        with tracer.invoke(SENTENCES):
            pass
        with tracer.invoke():  # no inputs: sees the whole batch
            logits = model.output.logits.save()
    assert logits.shape[0] == 1 + N
    return [logits]


def logit_lens(model, remote):
    with model.trace("The Eiffel Tower is in", remote=remote):
        lens = [
            model.lm_head(model.model.norm(layer.output)).softmax(-1).save()
            for layer in model.model.layers
        ]
    return lens


def generation(model, remote):
    with model.generate(SENTENCES, max_new_tokens=4, do_sample=False, remote=remote) as tracer:
        with tracer.all():
            model.model.layers[1].mlp.output[:] *= 0.5
        steps = []
        for _ in tracer.iter[0:4]:
            steps.append(model.lm_head.output[:, -1].save())
        tokens = tracer.result.save()
    assert len({tuple(s.shape) for s in steps}) == 1 and tokens.shape[1] > 4
    return [*steps, tokens]


def materialization(model, remote):
    with model.trace(SENTENCES, remote=remote):
        total = model.model.layers[1].output.sum().item()  # runs the forward up to here
        assert isinstance(total, float)
        model.model.layers[2].output[:] = total
        logits = model.output.logits.save()
    return [torch.tensor(total), logits]


def shapes(model, remote):
    with model.trace(SENTENCES, remote=remote):
        hidden = model.model.layers[1].output
        shape = hidden.shape  # a shape-only run, on the server when remote
        model.model.layers[1].output[:, -1] = torch.ones(shape[-1])
        logits = model.output.logits.save()
    assert len(shape) == 3 and shape[0] == N
    return [torch.tensor(list(shape)), logits]


CASES = [
    reads,
    neuron_forcing,
    replacement,
    cross_invoke_patching,
    empty_invoke,
    logit_lens,
    generation,
    materialization,
    shapes,
]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def handle(inproc_client: Client) -> lt.LanguageModel:
    """The remote handle, over the in-process transport."""
    return inproc_client.model(MODEL)


@pytest.fixture(scope="module")
def oracle(local_llama: lt.LanguageModel) -> dict:
    """Each case's local values, computed once."""
    return {case.__name__: values(case(local_llama, False)) for case in CASES}


@pytest.fixture(params=["inproc", "socket", "handle"])
def remote(request, local_llama, inproc_client, socket_client, handle):
    """(model, remote) for each way of running remotely."""
    return {
        "inproc": (local_llama, inproc_client),
        "socket": (local_llama, socket_client),
        "handle": (handle, False),  # a handle runs on its server unless told otherwise
    }[request.param]


def values(saved: list) -> list[torch.Tensor]:
    out = [s if isinstance(s, lt.Proxy) else s for s in saved]
    assert all(isinstance(t, torch.Tensor) for t in out)
    return out


def assert_identical(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


def line_of(text: str) -> int:
    """The number of the one line of this file that is ``text``."""
    lines = pathlib.Path(__file__).read_text().splitlines()
    found = [i for i, line in enumerate(lines, 1) if line.strip() == text]
    assert len(found) == 1, found
    return found[0]


def served_count(service: Service) -> int:
    return service.workers[MODEL].served_count


# -- remote equals local ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_remote_equals_local(case, remote, oracle):
    model, where = remote
    assert_identical(values(case(model, where)), oracle[case.__name__])


def test_remote_true_and_address_use_that_server(local_llama, embedded_server, oracle, monkeypatch):
    monkeypatch.setenv("LAZYTENSOR_SERVER", embedded_server.endpoint)
    assert_identical(values(neuron_forcing(local_llama, True)), oracle["neuron_forcing"])
    monkeypatch.setenv("LAZYTENSOR_SERVER", "tcp://127.0.0.1:1")  # the address wins over it
    got = values(neuron_forcing(local_llama, embedded_server.endpoint))
    assert_identical(got, oracle["neuron_forcing"])


def test_materialization_is_a_separate_server_run(handle, llama_service, oracle):
    before = served_count(llama_service)
    assert_identical(values(materialization(handle, False)), oracle["materialization"])
    assert served_count(llama_service) == before + 2  # the sync point, then the whole graph


# -- the remote handle ------------------------------------------------------------------------


def test_handle_mirrors_the_served_module_tree_without_weights(handle, local_llama):
    assert [e.path for e in handle.modules()] == [e.path for e in local_llama.modules()]
    assert not any(isinstance(e._module, torch.nn.Module) for e in handle.modules())
    with pytest.raises(TypeError, match="served remotely"):
        handle.model.layers[0](torch.zeros(1, 2, 64))


def test_handle_tokenizer_is_the_servers(handle, local_llama):
    prompts = [*SENTENCES, "Hello world! The Eiffel Tower is in Paris.", "ü €"]
    assert handle.tokenizer(prompts)["input_ids"] == local_llama.tokenizer(prompts)["input_ids"]
    assert handle.tokenizer.pad_token_id == local_llama.tokenizer.pad_token_id
    assert handle.tokenizer.padding_side == "left"


def test_handle_over_a_socket(socket_client, oracle):
    model = socket_client.model(MODEL)
    assert_identical(values(neuron_forcing(model, False)), oracle["neuron_forcing"])


def test_lazy_result_runs_once_when_read(handle, local_llama, llama_service):
    with local_llama.trace("Hello world"):
        want = local_llama.output.logits[0, -1].save()
    before = served_count(llama_service)
    logits = handle("Hello world").logits[0, -1]
    assert served_count(llama_service) == before  # nothing ran yet
    top_values, top_indices = logits.topk(5).value
    assert served_count(llama_service) == before + 1  # one round trip
    assert torch.equal(top_values, want.topk(5).values)
    assert torch.equal(top_indices, want.topk(5).indices)
    assert torch.equal(logits, want)
    values = handle("Hello world").logits[0, -1].topk(3).values
    assert values.tolist() == want.topk(3).values.tolist()  # the first use runs it...
    assert type(values) is torch.Tensor  # ...and from then on the name holds the tensor


def test_models_describes_what_is_served(inproc_client, socket_client, local_llama):
    parameters = sum(p.numel() for p in local_llama._module.parameters())
    for client in (inproc_client, socket_client):
        (info,) = client.models()
        assert info["name"] == MODEL
        assert info["parameters"] == parameters
        assert (info["dtype"], info["device"]) == ("float32", "cpu")
        assert info["queue"] == 0
        assert isinstance(info["served"], int) and info["served"] >= 0


# -- non-blocking jobs ------------------------------------------------------------------------


def test_non_blocking_job(remote, oracle):
    model, where = remote
    where = where or True  # a handle, as in `model.trace("Hi", remote=True, blocking=False)`
    with model.trace(SENTENCES, remote=where, blocking=False) as job:
        hidden = model.model.layers[1].output.save()
        neurons = model.model.layers[2].mlp.down_proj.input.save()
        logits = model.output.logits.save()
    assert job.status() in ("sent", "received", "queued", "running", "completed")
    saved = job.result()
    assert_identical(saved, oracle["reads"])
    assert_identical(values([hidden, neurons, logits]), oracle["reads"])
    assert job.status() == "done"


def test_non_blocking_job_without_a_block(remote, local_llama):
    """`job = model.trace("Hi", remote=True, blocking=False)`: submitted on first use, and its
    result is the model's output."""
    model, where = remote
    job = model.trace(SENTENCES, remote=where or True, blocking=False)
    assert job.status() in ("sent", "received", "queued", "running", "completed")
    (out,) = job.result()
    with local_llama.trace(SENTENCES):
        want = local_llama.output.logits.save()
    assert torch.equal(out.logits, want)


def test_several_jobs_in_flight_on_one_client(llama_service, local_llama):
    """Replies that one job reads for another are kept for it, whatever the waiting order."""
    client = in_process(llama_service, timeout=3.0, silence=5.0)  # no time for a re-ask
    jobs = []
    for value in (1.0, 2.0, 3.0):
        with local_llama.trace(SENTENCES, remote=client, blocking=False) as job:
            local_llama.model.layers[1].output[:] = value
            logits = local_llama.output.logits.save()
        jobs.append((value, job, logits))
    for value, job, logits in reversed(jobs):
        job.result()
        with local_llama.trace(SENTENCES):
            local_llama.model.layers[1].output[:] = value
            want = local_llama.output.logits.save()
        assert torch.equal(logits, want)


def test_a_local_non_blocking_trace_is_a_job_that_runs_when_asked(local_llama):
    with local_llama.trace("Hi", blocking=False) as job:
        logits = local_llama.output.logits.save()
    assert job.status() == lt.JobState.QUEUED  # nothing ran yet
    (value,) = job.result()
    assert job.status() == "done" and torch.equal(logits, value)
    with local_llama.trace("Hi"):
        want = local_llama.output.logits.save()
    assert torch.equal(value, want)
    with local_llama.trace("Hi", blocking=False) as dropped:
        local_llama.output.save()
    assert dropped.cancel() and dropped.status() == "failed"
    with pytest.raises(lt.TraceError, match="cancelled"):
        dropped.result()


# -- errors -----------------------------------------------------------------------------------


def test_server_errors_are_raised_at_the_users_line(remote, oracle):
    model, where = remote
    with pytest.raises(IndexError) as info:
        with model.trace("Hi", remote=where):
            model.model.layers[1].output[:, -1, [10**6]] = 1.0
    message = str(info.value)
    assert f"{__file__}:{line_of(STATEMENT)}" in message
    assert f'"{STATEMENT}"' in message
    assert "out of bounds" in message
    # The server is still serving.
    assert_identical(values(reads(model, where)), oracle["reads"])


def test_unknown_model_is_a_clear_error(inproc_client):
    with pytest.raises(KeyError, match="does not serve a model 'gpt-17'.*it serves: llama"):
        inproc_client.model("gpt-17")


def test_forbidden_input_is_refused_by_the_server(handle):
    with pytest.raises(lt.OpNotAllowedError, match="'trust_remote_code' is not accepted"):
        with handle.generate("Hi", max_new_tokens=2, trust_remote_code=True):
            handle.output.save()
