"""Shared fixtures: tiny language models built on disk once per session, and a tiny MLP.

The language models are random-weight models from :mod:`lazytensor.tiny`, saved to a
directory so tests load them through the real ``from_pretrained`` path. Tests that need
randomness seed it themselves; no fixture relies on, or leaves behind, global RNG state.
"""

from __future__ import annotations

import pathlib

import pytest

import lazytensor as lt
from lazytensor.core import graph
from lazytensor.runtime import bounds
from lazytensor.tiny import build_tiny_lm
from models import TinyMLP


@pytest.fixture(autouse=True)
def _no_memory_bound_left_behind():
    """A server sets ``--max-memory`` as its worker thread's per-op bound; a test that runs a
    worker's code on its own thread must do it in a copied context, or every later local run
    of that thread is bounded (and replays without chains)."""
    yield
    assert bounds.MAX_BYTES.get() is None, "this test left a server's memory bound set"


@pytest.fixture(autouse=True)
def _shared_empty_kwargs_stay_empty():
    """Nodes without keyword arguments share one dict (``graph.NO_KWARGS``): nothing may
    write into a node's keywords in place, or every such node would gain them."""
    yield
    assert graph.NO_KWARGS == {}, f"a node's shared empty keywords were changed: {graph.NO_KWARGS}"


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Directory of a tiny random ``LlamaForCausalLM`` (4 layers, GQA) and its tokenizer."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Directory of a tiny random ``GPT2LMHeadModel`` (4 layers) and its tokenizer."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def llama(llama_path: pathlib.Path) -> lt.LanguageModel:
    """The tiny Llama loaded through ``LanguageModel(path)`` (wrapping keeps no state)."""
    return lt.LanguageModel(llama_path)


@pytest.fixture(scope="session")
def gpt2(gpt2_path: pathlib.Path) -> lt.LanguageModel:
    return lt.LanguageModel(gpt2_path)


@pytest.fixture(params=["gpt2", "llama"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def lm(arch: str, request: pytest.FixtureRequest) -> lt.LanguageModel:
    """Each architecture in turn (tests read its module paths from a dict keyed by ``arch``)."""
    return request.getfixturevalue(arch)


@pytest.fixture
def tiny_mlp() -> TinyMLP:
    """A fresh :class:`models.TinyMLP` with seed-0 weights, in eval mode."""
    return TinyMLP(seed=0).eval()


# Server fixtures for the remote tests (in-process service, embedded ZeroMQ server): servers.py.
from servers import (  # noqa: E402, F401
    embedded_server,
    inproc_client,
    llama_service,
    local_llama,
    process_client,
    served_handle,
    served_llama,
    socket_client,
    where,
)
