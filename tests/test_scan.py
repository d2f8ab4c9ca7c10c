"""model.scan(...): a trace run shape-only, without weights, here or on a server.

Shapes and dtypes are checked against the real values of the same code run by a real trace
and by hand-written hooks; a model made with ``dispatch=False`` must stay on the meta device.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import lazytensor as lt
from handmade import capture, forward
from lazytensor.frontend.served import Client
from servers import MODEL

SENTENCES = ["Q: cheap\nA:", "Q: big\nA:", "Q: fast\nA:"]


@pytest.fixture(scope="module")
def empty(llama_path) -> lt.LanguageModel:
    """The tiny Llama with no weights loaded (meta device)."""
    return lt.LanguageModel(str(llama_path), dispatch=False)


@pytest.fixture(scope="module")
def handle(inproc_client: Client) -> lt.LanguageModel:
    return inproc_client.model(MODEL)


def hand_shapes(lm: lt.LanguageModel) -> dict:
    kept: dict = {}
    paths = ["model.layers.3", "model.layers.1.mlp.down_proj"]
    logits = forward(lm, SENTENCES, *capture(lm._module, paths, kept, inputs=True))
    return {
        "hidden": kept["model.layers.3"][0],
        "neurons": kept["model.layers.1.mlp.down_proj:in"][0],
        "logits": logits,
    }


def scanned(model: lt.LanguageModel, remote=False) -> dict:
    with model.scan(SENTENCES, remote=remote):
        hidden = model.model.layers[-1].output.save()
        neurons = model.model.layers[1].mlp.down_proj.input.save()
        logits = model.output.logits.save()
        top = logits[:, -1].topk(5).indices.save()
    return {"hidden": hidden, "neurons": neurons, "logits": logits, "top": top}


def test_scan_without_weights_gives_the_real_shapes(empty, local_llama):
    got = scanned(empty)
    want = hand_shapes(local_llama)
    for name, real in want.items():
        assert isinstance(got[name], FakeTensor)  # shape and dtype, no data
        assert got[name].shape == real.shape and got[name].dtype == real.dtype
    assert got["top"].shape == (3, 5) and got["top"].dtype == torch.int64
    assert not empty._dispatched  # nothing was loaded
    assert next(empty._module.parameters()).device.type == "meta"


@pytest.mark.parametrize("how", ["remote=client", "handle"])
def test_scan_on_a_server(how, local_llama, inproc_client, handle):
    got = scanned(local_llama, inproc_client) if how == "remote=client" else scanned(handle)
    want = hand_shapes(local_llama)
    for name, real in want.items():
        assert isinstance(got[name], FakeTensor)
        assert got[name].shape == real.shape and got[name].dtype == real.dtype


def test_scan_sees_the_edits(empty):
    with empty.edit() as (_, edited):
        edited.model.layers[0].mlp.skip(torch.zeros(3, 5, 64))
    with edited.scan(SENTENCES):
        h = edited.model.layers[0].mlp.output.save()
    assert h.shape == (3, 5, 64)


def test_shape_error_in_a_scan_names_the_users_line(empty):
    with pytest.raises(RuntimeError, match=r'test_scan.py:\d+ "bad = hs.view\(3, 7, -1\)"'):
        with empty.scan(SENTENCES):
            hs = empty.model.layers[-1].output
            bad = hs.view(3, 7, -1)
            bad.save()
    with pytest.raises(RuntimeError, match=r"test_scan.py:\d+ .*same reduction dim"):
        with empty.scan(SENTENCES):
            hs = empty.model.layers[-1].output
            (hs @ torch.ones(65, 2)).save()


def test_reading_a_value_in_a_scan_is_an_error(empty):
    with pytest.raises(lt.TraceError, match="shapes only"):
        with empty.scan(SENTENCES):
            print(empty.model.layers[0].output[0, 0, 0].item())
    assert not empty._dispatched
