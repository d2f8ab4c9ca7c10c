"""Model and LanguageModel: wrap a module so it can be traced.

A :class:`Model` is the root :class:`~lazytensor.frontend.envoy.Envoy` of any
``torch.nn.Module`` plus the two things a trace needs from a model: an inputs adapter
(:mod:`.inputs`: what an invoke's inputs become, how invokes join into one batch) and a
backend (:mod:`lazytensor.backends`: this process, or a server). Wrapping changes nothing about
the module: no hooks stay installed outside a trace.

:class:`LanguageModel` loads a Hugging Face causal LM and its tokenizer and accepts text, token
ids or encodings (:class:`~.inputs.TokenInputs`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..backends.base import Backend
from ..backends.local import LocalBackend
from ..backends.remote import RemoteBackend, connection
from ..core.errors import TraceError
from ..runtime.device import device_of, to_device
from ..tracing.scan import Weightless
from ..tracing.session import Session
from ..tracing.trace import Trace, current
from . import edits
from .envoy import Envoy, EnvoyTree
from .inputs import TensorInputs, TokenInputs


class Model(Envoy):
    """Wrap any ``torch.nn.Module`` for tracing.

    Example:
        >>> net = Model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> with net.trace(torch.ones(2, 4)):
        ...     y = net.output.save()
        >>> y.shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        module: torch.nn.Module,
        name: str | None = None,
        *,
        rename: dict[str, str] | None = None,
        envoys: dict[str, type] | None = None,
    ) -> None:
        super().__init__(module, tree=EnvoyTree(rename, envoys))
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_inputs", TensorInputs())

    def trace(
        self,
        *args: Any,
        strict: bool = False,
        remote: Any = False,
        blocking: bool = True,
        trace: bool = True,
        compile: bool | str = False,
        **kwargs: Any,
    ) -> Trace:
        """Open a trace; ``args``/``kwargs`` are the forward's inputs (one implicit invoke).

        Args:
            strict: raise instead of running the model early when a value is materialized.
            remote: run on a server: ``True`` for ``$LAZYTENSOR_SERVER``, an address such as
                ``"tcp://host:5555"``, or a :class:`~lazytensor.client.Client`.
            blocking: ``False`` submits the graph at the end of the block and returns at once;
                poll ``tracer.status()``, wait with ``tracer.result()``, drop with
                ``tracer.cancel()``.
            trace: ``False`` runs the model on the inputs now and returns its output (no block).
            compile: compiled replay (:mod:`lazytensor.runtime.compiled`): from the second run of
                a graph structure on, the model and the interventions run as one
                ``torch.compile``'d function whose inputs are the graph's constants. A string
                names the ``torch.compile`` backend (``"inductor"`` for ``True``).

        Returns:
            A :class:`~lazytensor.tracing.trace.Trace` to use as a context manager.
        """
        first = (args, kwargs) if (args or kwargs) else None
        if not trace:
            return self._plain(first, remote=remote)
        return self._open(first, remote=remote, strict=strict, blocking=blocking, compile=compile)

    def _plain(self, first: Any, *, remote: Any, generate: bool = False, **options: Any) -> Any:
        """``trace=False``: the model's output (``generate``'s result) on these inputs."""
        if first is None:
            raise TraceError("trace=False runs the model on its inputs: pass them")
        backend = self.backend(remote)
        if not isinstance(backend, LocalBackend) or edits.of(self) is not None:
            # run a trace that saves the output (with the edits, if any)
            with self._open(first, remote=remote, generate=generate, options=options) as tracer:
                out = (tracer.result if generate else self.output).save()
            return out
        inputs = self._inputs
        batch = inputs.batch([inputs.prepare(*first)], generate=generate, options=options)
        module = self._local_module()
        batch = to_device(batch, device_of(module))
        if generate:
            return module.generate(*batch.args, **batch.kwargs)
        return module(*batch.args, **batch.kwargs)

    def session(self, remote: Any = False) -> Session:
        """Record many traces, and the code between them, as one job (see
        :mod:`lazytensor.tracing.session`): values flow between traces where they run, and
        only saved values come back, when the block ends.

        Args:
            remote: where the session runs, as for :meth:`trace` (every trace in it runs there).
        """
        backend = self.backend(remote)
        return Session(self, backend, lambda: Trace(self, self._inputs, backend))

    def _open(self, first: Any, *, remote: Any, **options: Any) -> Trace:
        return edits.seed(self, Trace(self, self._inputs, self.backend(remote), first, **options))

    def scan(self, *args: Any, remote: Any = False, **kwargs: Any) -> Trace:
        """A trace run shape-only: saved values are fake tensors (shape and dtype, no data).

        No weights are loaded (a ``dispatch=False`` model stays on the meta device); with
        ``remote`` (or on a served model's handle) the server runs the shape-only pass.

        Example:
            >>> with net.scan(torch.ones(2, 4)):                  # doctest: +SKIP
            ...     y = net.output.save()
            >>> y.shape                                            # doctest: +SKIP
            torch.Size([2, 4])
        """
        first = (args, kwargs) if (args or kwargs) else None
        backend = self.backend(remote)
        if isinstance(backend, LocalBackend):  # the module as it is: never load weights
            backend = Weightless(lambda: self._module)
        return edits.seed(self, Trace(self, self._inputs, backend, first, scan=True))

    def edit(self, *, inplace: bool = False) -> Any:
        """Interventions applied to every later trace: ``with lm.edit() as (tracer, edited):``.

        Args:
            inplace: keep them on this wrapper (yields ``(tracer, self)``); by default they go
                on a new wrapper of the same module (no weights are copied).

        Returns:
            A context manager yielding ``(tracer, edited model)`` (see :mod:`.edits`).
        """
        return edits.edit(self, inplace)

    def clear_edits(self) -> None:
        """Drop this wrapper's edits: its later traces run the model as it is."""
        edits.clear(self)

    def backend(self, remote: Any = False) -> Backend:
        """Where this model's traces run: here, or on the server ``remote`` names.

        ``remote`` is ``False`` (here; a handle on a served model runs on its server), ``True``
        (``$LAZYTENSOR_SERVER``), an address such as ``"tcp://host:5555"``, or a client.
        """
        bound = self.__dict__.get("_bound")
        if bound is not None and (remote is True or not remote):
            return RemoteBackend(bound[0], bound[1])
        if not remote:
            return LocalBackend(self._local_module)
        name = self.__dict__.get("_name")
        if not name:
            raise TraceError(
                "this model has no name on a server: wrap it with Model(module, name=...), "
                "load it by path, or get it from client.model(name)"
            )
        return RemoteBackend(connection(remote), name)

    def _local_module(self) -> torch.nn.Module:
        return self._module

    # -- the module's own verbs, returning the wrapper ---------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> Model:
        """``module.to(...)``; returns this wrapper."""
        self._module.to(*args, **kwargs)
        return self

    def cuda(self, device: Any = None) -> Model:
        self._module.cuda(device)
        return self

    def cpu(self) -> Model:
        self._module.cpu()
        return self

    def eval(self) -> Model:
        self._module.eval()
        return self

    def train(self, mode: bool = True) -> Model:
        self._module.train(mode)
        return self


class LanguageModel(Model):
    """A Hugging Face causal language model and its tokenizer, ready to trace.

    Every loading argument takes effect or raises; none is ignored.

    Args:
        model: a local path or hub id, or an already built ``PreTrainedModel``.
        tokenizer: a tokenizer; by default loaded from the same path.
        dtype: weights dtype (``torch.bfloat16`` or its name); a built model is converted.
        device_map: passed to ``from_pretrained`` (accelerate placement).
        dispatch: load the weights now; ``False`` builds the model on the meta device, with the
            same config, dtype and attention implementation, and loads the weights at the first
            run (or :meth:`dispatch`).
        config: a ``PretrainedConfig`` to load the model with.
        attn_implementation: ``"eager"``, ``"sdpa"``...; passed to ``from_pretrained``.
        tokenizer_kwargs: passed to ``AutoTokenizer.from_pretrained`` (``padding_side`` too:
            batches are padded on the left either way, as generation needs).
        rename: aliases, ``{"mlp": "ff", "model.layers": "layers"}`` (see :class:`Model`).
        envoys: envoy classes by module path suffix (see :class:`Model`).
        load_kwargs: other ``from_pretrained`` arguments (``revision``, ``trust_remote_code``).

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
        *,
        config: Any = None,
        attn_implementation: str | None = None,
        tokenizer_kwargs: dict | None = None,
        rename: dict[str, str] | None = None,
        envoys: dict[str, type] | None = None,
        remote: tuple[Any, str] | None = None,
        **load_kwargs: Any,
    ) -> None:
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        loader = {"dtype": dtype, "device_map": device_map, "config": config,
                  "attn_implementation": attn_implementation, **load_kwargs}  # fmt: skip
        loader = {k: v for k, v in loader.items() if v is not None}
        if isinstance(model, torch.nn.Module):
            module, source = _built(model, loader, dispatch), getattr(model, "name_or_path", None)
        elif remote is not None:  # a served model's handle (a ModuleSpec): see Client.model
            module, source, dispatch = model, None, True
        else:
            source = str(model)
            module = _load(source, loader) if dispatch else _load_empty(source, loader)
        super().__init__(module, name=source, rename=rename, envoys=envoys)
        object.__setattr__(self, "_bound", remote)
        if tokenizer is None:
            if not source:
                raise TraceError("pass tokenizer=... for a model that was not loaded by path")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, **(tokenizer_kwargs or {}))
        elif tokenizer_kwargs:
            raise TraceError("tokenizer_kwargs apply when the tokenizer is loaded by path")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_dispatched", dispatch or isinstance(model, torch.nn.Module))
        object.__setattr__(self, "_inputs", TokenInputs(tokenizer))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Outside a trace: a lazy result, run (once) when a value is needed.

        ``lm("Hello").logits[0, -1]`` records; ``print(...)`` or ``.value`` runs the model, on
        the server for a served model, in one round trip. Inside a trace: a module call.
        """
        if current() is not None:
            return super().__call__(*args, **kwargs)
        trace = Trace(self, self._inputs, self.backend(False), (args, kwargs), lazy=True)
        edits.seed(self, trace)
        return trace.read("", "output")

    def dispatch(self) -> None:
        """Load the real weights of a model created with ``dispatch=False``."""
        if not self._dispatched:
            object.__setattr__(self, "_module", _load(self._source, self._loader))
            self._children.clear()
            object.__setattr__(self, "_dispatched", True)

    def generate(
        self,
        *args: Any,
        strict: bool = False,
        remote: Any = False,
        blocking: bool = True,
        trace: bool = True,
        compile: bool | str = False,
        **kwargs: Any,
    ) -> Trace:
        """Trace ``model.generate``: ``kwargs`` are generation options (``max_new_tokens``...).

        Inside, ``tracer.iter[i:j]`` selects decoding steps, ``tracer.all()`` applies to every
        step and ``tracer.result`` is the generated ids. ``trace=False`` generates now and
        returns the ids.
        """
        first = (args, {}) if args else None
        if not trace:
            return self._plain(first, remote=remote, generate=True, **kwargs)
        return self._open(
            first,
            remote=remote,
            generate=True,
            options=kwargs,
            strict=strict,
            blocking=blocking,
            compile=compile,
        )

    def _local_module(self) -> torch.nn.Module:
        self.dispatch()
        return self._module

    @property
    def generator(self) -> Generator:
        """Inside ``lm.generate(...)``: the generation itself, as an envoy-like object.

        ``lm.generator.output`` is what ``generate`` returns (``tracer.result``);
        ``lm.generator.streamer.output`` is the tokens chosen at the current step, one per
        row, shape ``(B,)`` (step ``i`` inside ``tracer.iter``; every step in a range).
        """
        return Generator(self)


class Generator:
    """``lm.generator``: points on a generation rather than on a module."""

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm

    @property
    def output(self) -> Any:
        """What ``generate`` returns (the prompt and generated ids), like ``tracer.result``."""
        return self._lm._trace("lm.generator.output").read("", "result")

    @property
    def streamer(self) -> Streamer:
        return Streamer(self._lm)


class Streamer:
    """``lm.generator.streamer``: what a generation streams at each step."""

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm

    @property
    def output(self) -> Any:
        """The tokens the current step chose, one per row: ``(B,)``."""
        trace = self._lm._trace("lm.generator.streamer.output")
        if not trace.generate:
            raise TraceError(
                "lm.generator.streamer.output is a generation's tokens: use it inside "
                "`with lm.generate(...)`"
            )
        return trace.read("", "tokens")


def _built(module: torch.nn.Module, loader: dict, dispatch: bool) -> torch.nn.Module:
    """A model the user built: only ``dtype`` applies (as ``.to(dtype)``); the rest refuse."""
    extra = sorted(set(loader) - {"dtype"})
    if extra or not dispatch:
        what = ", ".join(extra + ([] if dispatch else ["dispatch=False"]))
        raise TraceError(
            f"{what} apply when loading a model by path; this model is already built: "
            "configure it before wrapping it, or pass its path instead"
        )
    dtype = loader.get("dtype")
    return module.to(dtype) if isinstance(dtype, torch.dtype) else module


def _load(source: str, loader: dict) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, **loader).eval()


def _load_empty(source: str, loader: dict) -> torch.nn.Module:
    """The model on the meta device, built as :func:`_load` would build it, without weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    loader = dict(loader)
    config = loader.pop("config", None)
    known = {k: loader.pop(k) for k in ("revision", "trust_remote_code") if k in loader}
    if config is None:
        config = AutoConfig.from_pretrained(source, **known)
    options = {k: loader[k] for k in ("dtype", "attn_implementation") if k in loader}
    if options.get("dtype") == "auto":
        options["dtype"] = getattr(config, "dtype", None) or torch.float32
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **options, **known).eval()
