"""Tests for lazytensor/tiny.py: the tiny models load through the real Hugging Face path."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lazytensor.tiny import build_tiny_lm, cached_tiny_lm

PROMPTS = [
    "The Eiffel Tower is in",
    "The Colosseum is in",
    "The capital of France is",
    "Q: cheap\nA:",
    "Q: big\nA:",
    "Q: fast\nA:",
    "Hello world",
    " leading space, trailing newline\n",
    "Unseen bytes: ünïcödé 日本 🙂",
]


@pytest.fixture(params=["llama", "gpt2"])
def tiny_path(request: pytest.FixtureRequest) -> pathlib.Path:
    return request.getfixturevalue(f"{request.param}_path")


@pytest.fixture
def transformers_warnings() -> Iterator[list[logging.LogRecord]]:
    """Warnings ``transformers`` logs (its logger does not propagate, so caplog misses them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_llama_loads_with_grouped_query_attention(llama_path: pathlib.Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_attention_heads == 4
    assert model.config.num_key_value_heads == 2
    assert len(model.model.layers) == 4


def test_gpt2_loads(gpt2_path: pathlib.Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gpt2_path)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert len(model.transformer.h) == 4
    assert model.config.n_positions == 256


def test_model_matches_tokenizer(tiny_path: pathlib.Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    assert model.config.vocab_size == len(tokenizer)
    assert model.dtype == torch.float32
    assert not model.training
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for config in (model.config, model.generation_config):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (special,) * 3
    logits = model(**tokenizer("Hello world", return_tensors="pt")).logits
    assert logits.shape == (1, 2, len(tokenizer))  # (B, T, vocab)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_round_trips(llama_path: pathlib.Path, prompt: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    ids = tokenizer(prompt).input_ids
    assert tokenizer.decode(ids) == prompt
    assert tokenizer.unk_token_id not in ids


def test_tokenizer_learned_the_prompts(llama_path: pathlib.Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    assert 500 <= len(tokenizer) <= 520
    assert len(tokenizer("The capital of France is").input_ids) <= 6


def test_tokenizer_pads_on_the_left(llama_path: pathlib.Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["Hello world", "The capital of France is"], padding=True)
    short_ids, short_mask = batch.input_ids[0], batch.attention_mask[0]
    padding = len(short_ids) - sum(short_mask)
    assert padding > 0
    assert short_mask[:padding] == [0] * padding
    assert short_ids[:padding] == [tokenizer.pad_token_id] * padding


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_build_is_deterministic(tmp_path: pathlib.Path, arch: str) -> None:
    first = build_tiny_lm(tmp_path / "first", arch)
    second = build_tiny_lm(tmp_path / "second", arch)
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    assert "model.safetensors" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_seed_changes_weights(tmp_path: pathlib.Path) -> None:
    a = AutoModelForCausalLM.from_pretrained(build_tiny_lm(tmp_path / "a", "gpt2", seed=0))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_lm(tmp_path / "b", "gpt2", seed=1))
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_build_leaves_global_rng_alone(tmp_path: pathlib.Path) -> None:
    before = torch.random.get_rng_state()
    build_tiny_lm(tmp_path, "gpt2", layers=1)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_size_and_config_overrides(tmp_path: pathlib.Path) -> None:
    path = build_tiny_lm(tmp_path, "llama", layers=2, hidden=32, heads=2, rms_norm_eps=1e-5)
    config = AutoModelForCausalLM.from_pretrained(path).config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 32, 2)
    assert config.rms_norm_eps == 1e-5


def test_unknown_arch_is_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny-model arch 'bert'"):
        build_tiny_lm(tmp_path, "bert")


def test_greedy_generation_is_quiet_and_repeatable(
    tiny_path: pathlib.Path, transformers_warnings: list[logging.LogRecord]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    batch = tokenizer(
        ["Hello world", "The capital of France is"], return_tensors="pt", padding=True
    )
    first = model.generate(**batch, max_new_tokens=4, do_sample=False)
    second = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert first.shape == (2, batch.input_ids.shape[1] + 4)
    assert torch.equal(first, second)
    assert [record.getMessage() for record in transformers_warnings] == []


def test_cached_tiny_lm_builds_once_per_arguments() -> None:
    path = cached_tiny_lm("gpt2", layers=1)
    assert cached_tiny_lm("gpt2", layers=1) == path
    assert cached_tiny_lm("gpt2", layers=2) != path
    assert (path / "model.safetensors").is_file()
