"""Model and LanguageModel: wrap a module so it can be traced.

A :class:`Model` is the root :class:`~lazytensor.envoy.Envoy` of any ``torch.nn.Module`` plus
what a trace needs from a model: how to turn one invoke's inputs into batch rows
(:meth:`Model._prepare`), how to join the invokes into one forward pass
(:meth:`Model._batch`) and where to run a graph (:meth:`Model._execute`). Wrapping changes
nothing about the module: no hooks stay installed outside a trace.

:class:`LanguageModel` loads a Hugging Face causal LM and its tokenizer, accepts text, token
ids or encodings, pads on the left and passes the attention mask with matching position ids,
so every row of a padded batch computes what that prompt computes alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .envoy import Envoy
from .errors import TraceError
from .executor import Batch, Executor
from .graph import Graph
from .spec import ModuleSpec
from .trace import Trace, current

_TRACE_OPTIONS = ("strict", "remote")


@dataclass
class Part:
    """One invoke's inputs, ready to be joined with the others into a batch."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    size: int = 1


class Model(Envoy):
    """Wrap any ``torch.nn.Module`` for tracing.

    Example:
        >>> net = Model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> with net.trace(torch.ones(2, 4)):
        ...     y = net.output.save()
        >>> y.shape
        torch.Size([2, 4])
    """

    def __init__(self, module: torch.nn.Module, name: str | None = None) -> None:
        super().__init__(module)
        object.__setattr__(self, "_name", name)

    def trace(
        self,
        *args: Any,
        strict: bool = False,
        remote: Any = False,
        blocking: bool = True,
        **kwargs: Any,
    ) -> Trace:
        """Open a trace; ``args``/``kwargs`` are the forward's inputs (one implicit invoke).

        Args:
            strict: raise instead of running the model early when a value is materialized.
            remote: run on a server: ``True`` for ``$LAZYTENSOR_SERVER``, an address such as
                ``"tcp://host:5555"``, or a :class:`~lazytensor.client.Client`.
            blocking: with ``remote``, ``False`` submits the graph at the end of the block and
                returns at once; poll ``tracer.status()``, wait with ``tracer.result()``.

        Returns:
            A :class:`~lazytensor.trace.Trace` to use as a context manager.
        """
        inputs = (args, kwargs) if (args or kwargs) else None
        return Trace(self, inputs, strict=strict, remote=self._remote(remote), blocking=blocking)

    # -- what a trace asks of a model ------------------------------------------------------
    def _prepare(self, args: tuple, kwargs: dict) -> Part:
        size = next(
            (
                t.shape[0]
                for t in (*args, *kwargs.values())
                if isinstance(t, torch.Tensor) and t.dim() > 0
            ),
            1,
        )
        return Part(args, kwargs, size)

    def _batch(
        self, parts: list[Part], *, generate: bool = False, options: dict | None = None
    ) -> Batch:
        size = sum(p.size for p in parts)
        if len(parts) == 1:
            return Batch(parts[0].args, dict(parts[0].kwargs), size, generate)
        first = parts[0]
        if any(
            len(p.args) != len(first.args) or p.kwargs.keys() != first.kwargs.keys() for p in parts
        ):
            raise TraceError(
                "every invoke must pass the same positional and keyword inputs "
                "to be batched into one forward pass"
            )
        args = tuple(_join([p.args[i] for p in parts]) for i in range(len(first.args)))
        kwargs = {k: _join([p.kwargs[k] for p in parts]) for k in first.kwargs}
        return Batch(args, kwargs, size, generate)

    def _execute(
        self,
        graph: Graph,
        batch: Batch,
        *,
        stop_at: int | None = None,
        fake_mode: Any = None,
        remote: Any = False,
    ) -> dict[int, Any]:
        """Run ``graph`` here or, with ``remote``, on a server; returns node id -> value."""
        if remote:
            client, name = self._server(remote)
            return client.execute(name, graph, batch, stop_at=stop_at, fake_mode=fake_mode)
        return Executor(self._module, graph, batch, stop_at=stop_at, fake_mode=fake_mode).run()

    def _submit(self, graph: Graph, batch: Batch, remote: Any) -> Any:
        if not remote:
            raise TraceError("blocking=False needs remote=...: a local trace runs at once")
        client, name = self._server(remote)
        return client.submit(name, graph, batch)

    def _remote(self, remote: Any) -> Any:
        """A handle on a served model runs remotely unless told where else."""
        bound = self.__dict__.get("_bound")
        if bound is not None and (remote is True or not remote):
            return bound[0]
        return remote

    def _server(self, remote: Any) -> tuple[Any, str]:
        from .client import Client, default_client

        if isinstance(remote, Client):
            client = remote
        else:
            client = default_client(remote if isinstance(remote, str) else None)
        bound = self.__dict__.get("_bound")
        name = bound[1] if bound is not None else self.__dict__.get("_name")
        if not name:
            raise TraceError(
                "this model has no name on a server: wrap it with Model(module, name=...), "
                "load it by path, or get it from client.model(name)"
            )
        return client, name


def _join(values: list[Any]) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values)
    if any(v != values[0] for v in values[1:]):
        raise TraceError("non-tensor inputs differ between invokes, so they cannot be batched")
    return values[0]


class LanguageModel(Model):
    """A Hugging Face causal language model and its tokenizer, ready to trace.

    Args:
        model: a local path or hub id, or an already built ``PreTrainedModel``.
        tokenizer: a tokenizer; by default loaded from the same path.
        dtype: weights dtype (``torch.bfloat16`` or its name).
        device_map: passed to ``from_pretrained`` (accelerate placement).
        dispatch: load the weights now; ``False`` builds the model on the meta device and
            loads the weights at the first run.

    Example:
        >>> lm = LanguageModel("path/to/model")                 # doctest: +SKIP
        >>> with lm.trace("The Eiffel Tower is in"):           # doctest: +SKIP
        ...     logits = lm.output.logits.save()
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        dtype: Any = None,
        device_map: Any = None,
        dispatch: bool = True,
        remote: tuple[Any, str] | None = None,
        **load_kwargs: Any,
    ) -> None:
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        loader = {"dtype": dtype, "device_map": device_map, **load_kwargs}
        loader = {k: v for k, v in loader.items() if v is not None}
        if isinstance(model, torch.nn.Module):
            module, source = model, getattr(model, "name_or_path", None)
        elif isinstance(model, ModuleSpec):  # a served model's handle: see Client.model
            module, source, dispatch = model, None, True
        else:
            source = str(model)
            module = _load(source, loader) if dispatch else _load_empty(source, loader)
        super().__init__(module, name=source)
        object.__setattr__(self, "_bound", remote)
        if tokenizer is None:
            if not source:
                raise TraceError("pass tokenizer=... for a model that was not loaded by path")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_dispatched", dispatch or isinstance(model, torch.nn.Module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Outside a trace: a lazy result, run (once) when a value is needed.

        ``lm("Hello").logits[0, -1]`` records; ``print(...)`` or ``.value`` runs the model, on
        the server for a served model, in one round trip. Inside a trace: a module call.
        """
        if current() is not None:
            return super().__call__(*args, **kwargs)
        trace = Trace(self, (args, kwargs), remote=self._remote(False), lazy=True)
        return trace.read("", "output")

    def dispatch(self) -> None:
        """Load the real weights of a model created with ``dispatch=False``."""
        if not self._dispatched:
            object.__setattr__(self, "_module", _load(self._source, self._loader))
            object.__setattr__(self, "_first_param", None)
            self._children.clear()
            object.__setattr__(self, "_dispatched", True)

    def generate(
        self,
        *args: Any,
        strict: bool = False,
        remote: Any = False,
        blocking: bool = True,
        **kwargs: Any,
    ) -> Trace:
        """Trace ``model.generate``: ``kwargs`` are generation options (``max_new_tokens``...).

        Inside, ``tracer.iter[i:j]`` selects decoding steps, ``tracer.all()`` applies to every
        step and ``tracer.result`` is the generated ids.
        """
        inputs = (args, {}) if args else None
        return Trace(
            self,
            inputs,
            generate=True,
            options=kwargs,
            strict=strict,
            remote=self._remote(remote),
            blocking=blocking,
        )

    def _prepare(self, args: tuple, kwargs: dict) -> Part:
        if len(args) != 1:
            raise TraceError(
                "a language model takes one input per invoke: a string, a list "
                "of strings, token ids or a tokenizer encoding"
            )
        rows = _token_rows(self.tokenizer, args[0])
        return Part((rows,), kwargs, len(rows))

    def _batch(
        self, parts: list[Part], *, generate: bool = False, options: dict | None = None
    ) -> Batch:
        rows = [row for part in parts for row in part.args[0]]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        padded = any(len(r) != width for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T)
        if padded:
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
        else:
            mask = torch.ones_like(ids)  # (B, T)
        kwargs: dict[str, Any] = {}
        for part in parts:
            kwargs.update(part.kwargs)
        device = self._device()
        kwargs.update(input_ids=ids.to(device), attention_mask=mask.to(device))
        if generate:
            kwargs.setdefault("pad_token_id", pad)
            kwargs.update(options or {})
        elif padded:
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T)
            kwargs["position_ids"] = positions.to(device)
        return Batch((), kwargs, len(rows), generate)

    def _execute(self, graph: Graph, batch: Batch, **kwargs: Any) -> dict[int, Any]:
        if not kwargs.get("remote") and not self._dispatched:
            self.dispatch()  # inputs were placed before the weights existed: move them
            device = self._device()
            moved = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in batch.kwargs.items()
            }
            batch = Batch(batch.args, moved, batch.size, batch.generate)
        return super()._execute(graph, batch, **kwargs)

    def _device(self) -> torch.device:
        if not isinstance(self._module, torch.nn.Module):  # a served model's handle
            return torch.device("cpu")
        param = self.__dict__.get("_first_param")
        if param is None:  # the same Parameter object stays across .to(): keep it
            param = next(self._module.parameters(), None)
            object.__setattr__(self, "_first_param", param)
        if param is None or param.device.type == "meta":
            return torch.device("cpu")
        return param.device


def _load(source: str, loader: dict) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, **loader).eval()


def _load_empty(source: str, loader: dict) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


def _token_rows(tokenizer: Any, value: Any) -> list[list[int]]:
    """One invoke's input as a list of token-id rows (no padding)."""
    if isinstance(value, str):
        return [tokenizer(value)["input_ids"]]
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if hasattr(value, "keys") and "input_ids" in value:
        ids, mask = value["input_ids"], value.get("attention_mask")
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        if ids and isinstance(ids[0], int):
            ids, mask = [ids], [mask] if mask is not None else None
        if mask is None:
            return [list(r) for r in ids]
        mask = mask.tolist() if isinstance(mask, torch.Tensor) else mask
        return [[t for t, m in zip(r, ms) if m] for r, ms in zip(ids, mask)]
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return [list(r) for r in tokenizer(list(value))["input_ids"]]
        if all(isinstance(v, int) for v in value):
            return [list(value)]
        if all(isinstance(v, (list, tuple)) for v in value):
            return [list(r) for r in value]
    raise TraceError(
        f"cannot use a {type(value).__name__} as language-model input: pass a "
        "string, a list of strings, token ids or a tokenizer encoding"
    )
