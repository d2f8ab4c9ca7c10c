"""The public API: ``lazytensor.__all__`` is pinned, so adding or removing a name is deliberate."""

from __future__ import annotations

import lazytensor as lt

PUBLIC = [
    "Client",
    "Envoy",
    "GraphError",
    "JobState",
    "LanguageModel",
    "LazytensorError",
    "LimitExceeded",
    "Model",
    "NodeFailure",
    "OpNotAllowedError",
    "ProtocolError",
    "Proxy",
    "RemoteError",
    "RemoteOutOfMemory",
    "RemoteTimeout",
    "StrictModeError",
    "Trace",
    "TraceError",
    "__version__",
    "apply",
    "connect",
    "current",
    "lora",
    "optim",
    "parameter",
    "save",
]


def test_all_is_pinned() -> None:
    assert lt.__all__ == PUBLIC
    assert PUBLIC == sorted(set(PUBLIC))  # sorted, no duplicates: a diff shows what changed


def test_every_export_exists() -> None:
    for name in lt.__all__:
        assert getattr(lt, name) is not None, name
    namespace: dict = {}
    exec("from lazytensor import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(PUBLIC)


def test_errors_are_exceptions_of_one_tree() -> None:
    errors = [
        name
        for name in PUBLIC
        if name.endswith("Error")
        or name.startswith("Remote")
        or name in ("NodeFailure", "LimitExceeded")
    ]
    assert len(errors) == 11
    for name in errors:
        assert issubclass(getattr(lt, name), lt.LazytensorError), name


def test_version() -> None:
    assert isinstance(lt.__version__, str)
    assert all(part.isdigit() for part in lt.__version__.split("."))
