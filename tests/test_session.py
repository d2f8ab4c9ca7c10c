"""Sessions: many traces and the code between them as one job, locally and on a server.

A sweep patches the clean run's last-token state into every layer of a corrupt run; the
reference does the same with forward hooks. Remote sessions equal local ones, go out as one
request, and fail alone and clearly when over the server's limits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lazytensor as lt
from lazytensor.core.errors import LimitExceeded, OpNotAllowedError, ProtocolError, TraceError
from lazytensor.core.graph import Batch, Graph, Segment
from lazytensor.frontend.served import in_process
from lazytensor.protocol import messages as m
from lazytensor_server.limits import Limits
from lazytensor_server.service import Service
from servers import MODEL

CLEAN, CORRUPT = "The capital of France is", "The capital of Spain is"


def sweep(lm, remote) -> list[torch.Tensor]:
    results = []
    with lm.session(remote=remote):
        with lm.trace(CLEAN):
            h = lm.model.layers[1].output[:, -1]
        for layer in range(len(lm.model.layers)):
            with lm.trace(CORRUPT):
                lm.model.layers[layer].output[:, -1] = h
                results.append(lm.output.logits[:, -1].save())
    return results


def by_hand(lm) -> list[torch.Tensor]:
    model, kept = lm._module, {}
    clean = dict(lm.tokenizer(CLEAN, return_tensors="pt"))
    corrupt = dict(lm.tokenizer(CORRUPT, return_tensors="pt"))
    handle = model.model.layers[1].register_forward_hook(
        lambda mod, a, o: kept.update(h=o[:, -1].clone())
    )
    with torch.no_grad():
        model(**clean)
    handle.remove()
    out = []
    for layer in model.model.layers:

        def patch(mod, args, output):
            output = output.clone()
            output[:, -1] = kept["h"]
            return output

        handle = layer.register_forward_hook(patch)
        with torch.no_grad():
            out.append(model(**corrupt).logits[:, -1])
        handle.remove()
    return out


def test_a_sweep_in_one_session_equals_hooks(llama: lt.LanguageModel) -> None:
    got = sweep(llama, False)
    assert all(isinstance(t, torch.Tensor) for t in got)
    for g, w in zip(got, by_hand(llama), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("how", ["inproc", "socket", "handle", "process"])
def test_a_remote_session_equals_local_and_is_one_request(
    how, local_llama, inproc_client, llama_service, request
) -> None:
    want = sweep(local_llama, False)
    if how == "handle":
        model, remote = inproc_client.model(MODEL), False
    else:
        model, remote = local_llama, request.getfixturevalue(f"{how}_client")
    worker = llama_service.workers[MODEL]
    before = worker.served_count
    got = sweep(model, remote)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    if how in ("inproc", "handle"):  # the other servers are other services
        assert worker.served_count == before + 1


def test_session_code_between_traces(llama: lt.LanguageModel) -> None:
    with llama.session():
        with llama.trace(CLEAN):
            a = llama.model.layers[0].output
        with llama.trace(CORRUPT):
            b = llama.model.layers[0].output
            carried = a.mean(-1).save()  # an earlier trace's proxy: its method is carried over
        diff = (a[:, -1] - b[:, -1]).norm().save()
        scaled = (a * 2).save()
        summed = a.sum(-1).save()  # session code: a method of an ended trace's proxy
    with llama.trace(CLEAN):
        want_a = llama.model.layers[0].output.save()
    with llama.trace(CORRUPT):
        want_b = llama.model.layers[0].output.save()
    torch.testing.assert_close(diff, (want_a[:, -1] - want_b[:, -1]).norm())
    torch.testing.assert_close(scaled, want_a * 2)
    torch.testing.assert_close(summed, want_a.sum(-1))
    torch.testing.assert_close(carried, want_a.mean(-1))


def test_values_exist_only_after_the_session(llama: lt.LanguageModel) -> None:
    with pytest.raises(TraceError, match="session"):
        with llama.session():
            with llama.trace(CLEAN):
                h = llama.model.layers[0].output.save()
            print(h.sum().item())


def test_a_failing_trace_names_its_line(llama: lt.LanguageModel, inproc_client) -> None:
    for remote in (False, inproc_client):
        with pytest.raises(IndexError, match=r"test_session.py:\d+"):
            with llama.session(remote=remote):
                with llama.trace(CLEAN):
                    h = llama.model.layers[0].output
                with llama.trace(CORRUPT):
                    llama.model.layers[1].output[:, -1] = h[:, 99]
                    llama.output.logits.save()


def test_nothing_saved_comes_back_and_nothing_is_held(llama: lt.LanguageModel) -> None:
    with llama.session():
        with llama.trace(CLEAN):
            h = llama.model.layers[0].output
        with llama.trace(CORRUPT):
            llama.model.layers[0].output[:] = h[:, :1]
    assert isinstance(h, lt.Proxy)
    with pytest.raises(TraceError, match="not saved"):
        _ = h.value


def session_request(local_llama, segments) -> m.Run:
    return m.Run("s-1", None, MODEL, Graph(), Batch(), segments=tuple(segments))


def test_a_session_over_the_limits_fails_clearly_and_the_server_serves(
    served_llama, local_llama
) -> None:
    service = Service([served_llama], limits=Limits(max_nodes=20))
    try:
        client = in_process(service, timeout=60.0)
        with pytest.raises(LimitExceeded, match="--max-nodes"):
            sweep(local_llama, client)  # 4 traces of 6 nodes each
        worker = service.workers[MODEL]
        worker.limits = dataclasses.replace(worker.limits, max_seconds=1e-6)
        service.limits = dataclasses.replace(service.limits, max_nodes=1000)
        with pytest.raises(lt.RemoteTimeout, match="--max-seconds"):
            sweep(local_llama, client)
        worker.limits = dataclasses.replace(worker.limits, max_seconds=300.0)
        for g, w in zip(sweep(local_llama, client), sweep(local_llama, False), strict=True):
            torch.testing.assert_close(g, w)
    finally:
        service.shutdown(grace=5.0)


def test_forged_carries_are_refused(llama_service, local_llama) -> None:
    client = in_process(llama_service, timeout=60.0)
    with local_llama.trace(CLEAN) as tracer:
        local_llama.output.logits.save()
    batch = tracer._batch()
    forward = Graph()
    forward.add("carry", "", (1, 0))  # a later segment's value
    with pytest.raises(ProtocolError, match="carried values"):
        client.call(session_request(local_llama, [Segment(forward, batch), Segment(Graph())]))
    alone = Graph()
    alone.add("carry", "", (0, 0))
    run = m.Run("r-1", None, MODEL, alone, batch)
    with pytest.raises(ProtocolError, match="only a session"):
        client.call(run)
    code = Graph()
    code.add("output", "model.layers.0")  # module values in session code
    with pytest.raises(OpNotAllowedError, match="only inside a trace"):
        client.call(session_request(local_llama, [Segment(code)]))


def test_shapes_inside_a_session(llama: lt.LanguageModel) -> None:
    hidden = llama._module.config.hidden_size
    with llama.session():
        vec = lt.parameter(torch.zeros(hidden))
        assert vec.shape == (hidden,)
        with llama.trace(CLEAN):
            h = llama.model.layers[0].output
            assert llama.lm_head.weight.shape == llama._module.lm_head.weight.shape
        with llama.trace(CORRUPT):
            assert (h[:, -1] * 2).shape == (1, hidden)  # a carried value
            y = (llama.model.layers[0].output + vec).save()
            want = y.shape
    assert y.shape == want
