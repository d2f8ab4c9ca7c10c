"""Served: handles on models a server serves, and the client that makes them.

The server describes each served model as data (its module tree: class names and children;
its tokenizer); :meth:`Client.model` rebuilds the tree as :class:`ModuleSpec` objects and wraps
it in a :class:`~lazytensor.frontend.model.LanguageModel` bound to the server. An
:class:`~lazytensor.frontend.envoy.Envoy` walks a spec exactly as it walks an ``nn.Module``
(both expose ``_modules``), so ``model.model.layers[3].output`` records the same node whether
the weights are here or on the server.
"""

from __future__ import annotations

from typing import Any

from ..backends.client import Connection
from ..backends.transport import InProcessTransport
from ..runtime.source import Site
from .model import LanguageModel

_MAX_DEPTH = 64


class ModuleSpec:
    """A described module: its class name, named children and its forward's source sites.

    Calling it is an error: a spec stands for a module whose weights are elsewhere.
    """

    def __init__(
        self,
        cls_name: str,
        children: dict[str, ModuleSpec],
        attributes: dict[str, Any] | None = None,
        source_sites: tuple[Site, ...] = (),
    ) -> None:
        self.cls_name = cls_name
        self._modules = children
        self._attributes = attributes or {}
        self._weights: tuple[str, ...] = ()  # names of its own parameters and buffers
        self.source_sites = source_sites

    @classmethod
    def from_dict(cls, data: dict, depth: int = 0, sources: dict | None = None) -> ModuleSpec:
        if depth > _MAX_DEPTH or not isinstance(data, dict):
            raise ValueError("a module description must be a nested dict of bounded depth")
        if sources is None:  # the root holds every class's sites: {class: [[name, line, in]]}
            sources = _sites(data.get("sources"))
        children = data.get("children", {})
        cls_name = str(data.get("cls", "Module"))
        spec = cls(
            cls_name,
            {str(k): cls.from_dict(v, depth + 1, sources) for k, v in children.items()},
            source_sites=sources.get(cls_name, ()),
        )
        weights = data.get("weights", [])
        spec._weights = tuple(str(w) for w in weights) if isinstance(weights, list) else ()
        sizes = data.get("attributes")
        if isinstance(sizes, dict):
            spec._attributes.update((str(k), v) for k, v in sizes.items() if type(v) is int)
        return spec

    def __getattr__(self, name: str) -> Any:
        attributes = self.__dict__.get("_attributes", {})
        if name in attributes:
            return attributes[name]
        raise AttributeError(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{self.cls_name} is served remotely: call it inside a trace, or call "
            "the model handle itself for a lazy result"
        )

    def __repr__(self) -> str:
        return f"ModuleSpec({self.cls_name}, {len(self._modules)} children)"


class Client(Connection):
    """A connection to a lazytensor server that also hands out model handles.

    Example:
        >>> client = connect("tcp://127.0.0.1:5555")        # doctest: +SKIP
        >>> model = client.model("llama")                  # doctest: +SKIP
    """

    def model(
        self,
        name: str,
        *,
        rename: dict[str, str] | None = None,
        envoys: dict[str, type] | None = None,
    ) -> LanguageModel:
        """A handle on a served model, built from the server's description of it.

        No weights, model class or config are needed here: the handle's envoy tree mirrors
        the server's module tree and its tokenizer is the one the server ships. ``rename``
        and ``envoys`` are as for :class:`~lazytensor.LanguageModel` (they live here only).
        """
        info = self.describe(name)
        spec = ModuleSpec.from_dict(info.tree)
        tokenizer = _tokenizer(info.tokenizer)
        return LanguageModel(
            spec, tokenizer=tokenizer, remote=(self, name), rename=rename, envoys=envoys
        )


def connect(address: str | None = None, api_key: str | None = None, **kwargs: Any) -> Client:
    """Connect to a server (defaults from ``LAZYTENSOR_SERVER`` / ``LAZYTENSOR_API_KEY``).

    Keyword arguments are :class:`~lazytensor.backends.client.Connection`'s; a server started
    with ``--curve-secret`` needs ``server_key=`` (and, with ``--curve-clients``, this client's
    ``client_secret=``), or ``LAZYTENSOR_SERVER_KEY`` / ``LAZYTENSOR_CLIENT_SECRET``.

    Example:
        >>> client = connect("tcp://gpu:5555", "s3cret", server_key="server.key",
        ...                  client_secret="alice.key_secret")  # doctest: +SKIP
    """
    return Client(address, api_key, **kwargs)


def in_process(server: Any, api_key: str | None = None, **kwargs: Any) -> Client:
    """A client wired straight to a server object in this process (tests, embedding)."""
    return Client("inproc", api_key, transport=InProcessTransport(server), **kwargs)


def _sites(data: Any) -> dict[str, tuple[Site, ...]]:
    """The source sites of each module class, from a server's description."""
    if not isinstance(data, dict):
        return {}
    return {
        str(cls_name): tuple(
            Site(*map(str, site)) for site in sites if isinstance(site, list) and len(site) == 3
        )
        for cls_name, sites in data.items()
        if isinstance(sites, list)
    }


def _tokenizer(data: dict) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    special = {k: v for k, v in data.get("special", {}).items() if isinstance(v, str)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(data["json"]), **special)
