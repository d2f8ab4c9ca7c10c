"""Source: a module's ``forward`` as envoys, one per call it makes (``envoy.source``).

``lm.model.layers[0].self_attn.source.softmax_0.output`` is the attention pattern: the
return value of the ``softmax`` call in the forward (under SDPA too, see
:mod:`lazytensor.runtime.source`). A :class:`SiteEnvoy` reads and writes like an
:class:`~lazytensor.frontend.envoy.Envoy`: ``.output`` is the call's result, ``.inputs`` its
``(args, kwargs)``, ``.input`` its first argument; each records a point node at the target
``"<module path>:<site>"``. Printing a module's ``.source`` lists its sites with their lines.

The names of a local module come from its class's code; a served model's from the server's
description of its own code, so a client never sends or runs code, only names a site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..runtime import source
from ..runtime.source import Site

if TYPE_CHECKING:
    from .envoy import Envoy

_OWN = frozenset(("output", "input", "inputs"))


def sites_of(module: Any) -> tuple[tuple[Site, ...], str]:
    """The sites of a module (an ``nn.Module`` or a served model's spec), and why it has none."""
    if isinstance(module, torch.nn.Module):
        found = source.of(type(module))
        return found.sites, found.reason
    sites = getattr(module, "source_sites", ())
    return sites, "" if sites else "the server describes no sites for it"


class Source:
    """The call sites of one module's forward; see the module docstring.

    Example:
        >>> with lm.trace("Hello"):                                       # doctest: +SKIP
        ...     pattern = lm.model.layers[0].self_attn.source.softmax_0.output.save()
    """

    def __init__(self, envoy: Envoy) -> None:
        sites, reason = sites_of(envoy._module)
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_sites", {site.name: site for site in sites})
        object.__setattr__(self, "_reason", reason)

    def __getattr__(self, name: str) -> SiteEnvoy:
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in self._sites:
            where = f"the forward of {self._envoy._describe()}"
            raise AttributeError(source.unknown(name, list(self._sites), where, self._reason))
        return SiteEnvoy(self._envoy, name)

    def __getitem__(self, name: str) -> SiteEnvoy:
        return getattr(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot set {name!r} on a .source: assign to a site's .output")

    def __iter__(self):
        return iter([SiteEnvoy(self._envoy, name) for name in self._sites])

    def __len__(self) -> int:
        return len(self._sites)

    def __dir__(self) -> list[str]:
        return list(self._sites)

    @property
    def names(self) -> list[str]:
        """The site names, in source order."""
        return list(self._sites)

    def _kind(self) -> str:
        module = self._envoy._module
        return getattr(module, "cls_name", None) or type(module).__name__

    def __str__(self) -> str:
        where = self._envoy.path or "<root>"
        head = f"{where}.source ({self._kind()}.forward)"
        if not self._sites:
            return f"{head}: no sites ({self._reason})"
        width = max(len(name) for name in self._sites) + 2
        lines, inside, caller = [f"{head}:"], "", ""
        for site in self._sites.values():
            if site.inside != inside:
                inside = site.inside
                if inside:
                    lines.append(f"    [{inside}, which {caller} runs when one of these is used]")
            caller = caller if site.inside else site.name
            indent = "    " if site.inside else "  "
            lines.append(f"{indent}{site.name:<{width}}{site.line}")
        return "\n".join(lines)

    __repr__ = __str__


class SiteEnvoy:
    """One call inside a module's forward: ``.output``, ``.input``, ``.inputs`` like an envoy.

    The input of a method call ``x.view(shape)`` is ``shape``: ``x`` is part of the callee.
    """

    def __init__(self, envoy: Envoy, name: str) -> None:
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "path", f"{envoy.path}{source.SEP}{name}")

    def _trace(self, what: str) -> Any:
        return self._envoy._trace(f".source.{self.name}{what}")

    @property
    def output(self) -> Any:
        """The call's return value (a proxy inside a trace)."""
        return self._trace(".output").read(self.path, "output")

    @property
    def input(self) -> Any:
        """The call's first argument (a proxy inside a trace)."""
        return self._trace(".input").read(self.path, "input")

    @property
    def inputs(self) -> Any:
        """The call's ``(args, kwargs)`` (a proxy inside a trace)."""
        return self._trace(".inputs").read(self.path, "inputs")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _OWN:
            raise AttributeError(
                f"cannot set {name!r} on source site {self.path!r}: only .output, .input and "
                ".inputs can be assigned"
            )
        self._trace(f".{name}").write(self.path, f"set_{name}", value)

    def __repr__(self) -> str:
        return f"<SiteEnvoy {self.path!r}>"
