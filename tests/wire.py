"""The wire format's names in one namespace, for tests written against the protocol as a whole.

Production code imports :mod:`lazytensor.protocol.codec`, ``.values`` and ``.messages``
separately; tests of the format read more easily with one ``wire.X`` prefix.
"""

from types import SimpleNamespace

from lazytensor.protocol import codec, messages, values

wire = SimpleNamespace(
    **{k: v for module in (messages, values, codec) for k, v in vars(module).items()
       if not k.startswith("__")}
)  # fmt: skip
