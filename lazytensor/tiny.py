"""Tiny models: small random-weight language models built on the spot, with no download.

Tests, the demo and the benchmarks need a real Hugging Face causal LM (real module tree, real
generation loop, real loading path) but cannot reach a model hub. This module builds one:
a byte-level BPE tokenizer trained on a built-in English corpus, plus a randomly initialised
``LlamaForCausalLM`` or ``GPT2LMHeadModel`` sized to that vocabulary. Both are written to a
directory with ``save_pretrained``, so ``AutoTokenizer.from_pretrained(directory)`` and
``AutoModelForCausalLM.from_pretrained(directory)`` load them exactly as they would a hub model.

Everything is deterministic: the same arguments give byte-identical files. The weights are
random, so the model's predictions are meaningless; only shapes and plumbing are real.

Example::

    from transformers import AutoModelForCausalLM
    from lazytensor.tiny import cached_tiny_lm

    model = AutoModelForCausalLM.from_pretrained(cached_tiny_lm("gpt2"))
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

ARCHS = ("llama", "gpt2")
"""The architectures :func:`build_tiny_lm` can build."""

SPECIAL_TOKEN = "<|endoftext|>"
"""The one special token; it serves as beginning-of-sequence, end-of-sequence and padding."""

VOCAB_SIZE = 512
"""Target vocabulary size of the tokenizer (256 byte symbols, the special token, merges)."""

MAX_POSITIONS = 256
"""Context length of every tiny model."""

CORPUS = """\
The Eiffel Tower is in Paris. The Eiffel Tower is in France. The Colosseum is in Rome.
The Colosseum is in Italy. The capital of France is Paris. The capital of Italy is Rome.
The capital of Germany is Berlin. The capital of Spain is Madrid. The capital of England is
London. The capital of Japan is Tokyo. The capital of China is Beijing. The capital of Russia
is Moscow. The capital of Egypt is Cairo. The capital of Canada is Ottawa. The capital of the
United States is Washington. The Brandenburg Gate is in Berlin. Big Ben is in London. The
Statue of Liberty is in New York. The Sagrada Familia is in Barcelona. The Kremlin is in
Moscow. The Great Wall is in China. The pyramids are in Egypt. Mount Fuji is in Japan.
Q: cheap
A: expensive
Q: big
A: small
Q: fast
A: slow
Q: hot
A: cold
Q: good
A: bad
Q: old
A: new
Q: happy
A: sad
Q: up
A: down
Hello world! Hello, world. Hello there, how are you today? I am fine, thank you.
The quick brown fox jumps over the lazy dog. A man and a woman walk to the city with a child.
She said that he was going to the house of his friend. They were there for a long time, and
then we went home. What is your name? My name is Ada. Where do you live? I live in a small
town near the sea. This is a good day for a walk in the park. It is one of the best places
to see the sun, the moon and the stars at night. People like to eat, to read and to write.
We can learn a lot from a book, a teacher or a friend. There are many countries in the world:
France, Italy, Germany, Spain, England, Japan, China, India, Brazil, Mexico and Canada. Paris,
Rome, Berlin, Madrid, London, Tokyo, Beijing, Delhi, Lisbon, Vienna, Athens, Dublin, Oslo,
Prague and Amsterdam are famous cities. One, two, three, four, five, six, seven, eight, nine,
ten. Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the
week. The model reads the text and predicts the next word. Every layer of the network has an
attention block and an MLP block. The output of each layer is added to the residual stream.
"""
"""Built-in training text for the tokenizer: the prompts tests use, common words, places."""


def build_tokenizer(directory: str | pathlib.Path) -> None:
    """Train the tiny byte-level BPE tokenizer and save it to ``directory``.

    Any text encodes (bytes are the base alphabet, so there is no unknown token) and decodes
    back unchanged. ``<|endoftext|>`` is the bos, eos and pad token; padding is on the left,
    as batched generation needs. No token is added to encoded text automatically.

    Args:
        directory: Where to write the tokenizer files; created if missing.

    Example::

        build_tokenizer("/tmp/tok")
        AutoTokenizer.from_pretrained("/tmp/tok")("Hello world").input_ids
    """
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(),
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )
    wrapped.save_pretrained(str(directory))


def _train_bpe() -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on :data:`CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def build_tiny_lm(
    directory: str | pathlib.Path,
    arch: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    seed: int = 0,
    **config_overrides: Any,
) -> pathlib.Path:
    """Build a random-weight causal LM and its tokenizer in ``directory``.

    Args:
        directory: Where to write the model and tokenizer; created if missing.
        arch: ``"llama"`` (``LlamaForCausalLM``, with grouped-query attention) or ``"gpt2"``
            (``GPT2LMHeadModel``).
        layers: Number of transformer blocks.
        hidden: Width of the residual stream.
        heads: Number of attention heads; must divide ``hidden``.
        seed: Seed for the random weights.
        **config_overrides: Extra fields for the ``LlamaConfig`` or ``GPT2Config``.

    Returns:
        ``directory`` as a ``pathlib.Path``.

    Raises:
        ValueError: If ``arch`` is unknown.

    Example::

        path = build_tiny_lm("/tmp/tiny", "gpt2", layers=2)
        model = AutoModelForCausalLM.from_pretrained(path)
    """
    import torch
    from transformers import AutoTokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny-model arch {arch!r}; expected one of {ARCHS}")
    path = pathlib.Path(directory)
    build_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config_for = _llama_config if arch == "llama" else _gpt2_config
    config = config_for(len(tokenizer), layers, hidden, heads, special_ids, config_overrides)
    with torch.random.fork_rng(devices=[]):  # seed the weights without moving the caller's RNG
        torch.manual_seed(seed)
        model = _model_class(arch)(config).to(torch.float32).eval()
    for name, value in special_ids.items():
        setattr(model.generation_config, name, value)
    with _progress_bars_off():
        model.save_pretrained(path)
    return path


@contextlib.contextmanager
def _progress_bars_off() -> Iterator[None]:
    """Silence ``transformers``' progress bars for a moment, restoring the caller's choice."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _llama_config(
    vocab: int,
    layers: int,
    hidden: int,
    heads: int,
    special_ids: dict[str, int],
    overrides: dict[str, Any],
) -> Any:
    """A ``LlamaConfig`` with two key/value heads, so grouped-query attention is exercised."""
    from transformers import LlamaConfig

    fields = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2 if heads % 2 == 0 else heads,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": False,
        **special_ids,
    }
    return LlamaConfig(**{**fields, **overrides})


def _gpt2_config(
    vocab: int,
    layers: int,
    hidden: int,
    heads: int,
    special_ids: dict[str, int],
    overrides: dict[str, Any],
) -> Any:
    """A ``GPT2Config`` of the requested size (GPT-2's MLP is 4x ``hidden``, its own default)."""
    from transformers import GPT2Config

    fields = {
        "vocab_size": vocab,
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": heads,
        "n_positions": MAX_POSITIONS,
        **special_ids,
    }
    return GPT2Config(**{**fields, **overrides})


def _model_class(arch: str) -> Any:
    """The ``transformers`` model class for ``arch``."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    return LlamaForCausalLM if arch == "llama" else GPT2LMHeadModel


def cached_tiny_lm(arch: str = "llama", **kwargs: Any) -> pathlib.Path:
    """Build a tiny model once per process and return its directory.

    Calls with the same arguments share one temporary directory, so repeated callers (tests,
    benchmarks) pay the build cost once. The directory is removed when the process exits.

    Args:
        arch: As for :func:`build_tiny_lm`.
        **kwargs: Keyword arguments of :func:`build_tiny_lm`; values must be hashable.

    Returns:
        The directory holding the model and tokenizer.

    Example::

        tokenizer = AutoTokenizer.from_pretrained(cached_tiny_lm())
    """
    return _cached(arch, tuple(sorted(kwargs.items())))


@functools.cache
def _cached(arch: str, kwargs: tuple[tuple[str, Any], ...]) -> pathlib.Path:
    directory = tempfile.mkdtemp(prefix=f"lazytensor-tiny-{arch}-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return build_tiny_lm(directory, arch, **dict(kwargs))
