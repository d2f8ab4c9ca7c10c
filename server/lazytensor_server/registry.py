"""Registry: the models a server serves, loaded once, described as data for clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lazytensor.runtime.source import of as sites_of


@dataclass
class ServedModel:
    """One served model and what clients may know about it."""

    name: str
    module: torch.nn.Module
    tokenizer: Any = None
    source: str = ""
    paths: frozenset[str] = field(default_factory=frozenset)
    tree: dict = field(default_factory=dict)
    weights: frozenset[str] = field(default_factory=frozenset)  # parameter and buffer names
    #: ``(parameter count, dtype, device)``, read once: a ``models`` request answers from it,
    #: instead of walking every parameter of a large model for each request.
    summary: tuple | None = field(default=None, repr=False)

    @classmethod
    def wrap(
        cls, name: str, module: torch.nn.Module, tokenizer: Any = None, source: str = ""
    ) -> ServedModel:
        paths = frozenset(path for path, _ in module.named_modules())
        tree = {**describe(module), "sources": sources(module)}
        weights = frozenset(n for n, _ in (*module.named_parameters(), *module.named_buffers()))
        return cls(name, module.eval(), tokenizer, source, paths, tree, weights=weights)

    def info(self, queued: int, served: int) -> dict:
        if self.summary is None:
            param = next(self.module.parameters(), None)
            self.summary = (
                parameter_count(self.module),
                str(param.dtype).removeprefix("torch.") if param is not None else None,
                str(param.device) if param is not None else None,
            )
        count, dtype, device = self.summary
        return {
            "name": self.name,
            "parameters": count,
            "dtype": dtype,
            "device": device,
            "queue": queued,
            "served": served,
        }  # never the source: a path on the server's disk is not the clients' business

    def description(self) -> dict:
        tokenizer: dict[str, Any] = {}
        if self.tokenizer is not None:
            tok = self.tokenizer
            tokenizer = {
                "json": tok.backend_tokenizer.to_str(),
                "special": {
                    k: getattr(tok, k, None)
                    for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                },
            }
        return {"model": self.name, "tree": self.tree, "tokenizer": tokenizer}

    def check_site(self, path: str, name: str) -> None:
        """Raise ``AttributeError`` unless ``name`` is a source site of the module at
        ``path`` (one of :attr:`paths`), by this server's own reading of its code."""
        sites_of(type(self.module.get_submodule(path))).check(name)

    def matches(self, name: str) -> bool:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        own = self.source.rstrip("/").rsplit("/", 1)[-1] if self.source else None
        return name in (self.name, self.source) or base in (self.name, own)


#: Sizes a client may read from a described module (``lm.lm_head.in_features``).
_SIZES = ("in_features", "out_features", "embedding_dim", "num_embeddings", "hidden_size")


def describe(module: torch.nn.Module) -> dict:
    """The module tree of ``module`` as plain data (no tensors, no code)."""
    return {
        "cls": type(module).__name__,
        "weights": [*module._parameters, *module._buffers],
        "attributes": {k: v for k in _SIZES if type(v := getattr(module, k, None)) is int},
        "children": {
            name: describe(child) for name, child in module._modules.items() if child is not None
        },
    }


def sources(module: torch.nn.Module) -> dict[str, list[list[str]]]:
    """Per module class of ``module``: its forward's source sites as ``[name, line, inside]``
    (:mod:`lazytensor.runtime.source`), so clients can name them."""
    classes = {type(m).__name__: type(m) for m in module.modules()}
    return {
        name: [[s.name, s.line, s.inside] for s in sites_of(cls).sites]
        for name, cls in classes.items()
    }


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load(
    source: str, name: str | None = None, *, device: str | None = None, dtype: str | None = None
) -> ServedModel:
    """Load a Hugging Face causal LM and its tokenizer from a path or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype) if dtype != "auto" else "auto"
    module = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device:
        module = module.to(device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    name = name or source.rstrip("/").rsplit("/", 1)[-1]
    return ServedModel.wrap(name, module, tokenizer, source)
