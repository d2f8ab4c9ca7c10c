"""Backends: where a recorded graph runs (in this process, or on a server through a client).

Imports core, runtime and protocol. A trace talks to a :class:`~.base.Backend` only.
"""
