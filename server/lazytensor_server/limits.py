"""Limits: what one request may ask of the server, each configurable, each with a clear error."""

from __future__ import annotations

from dataclasses import dataclass

from lazytensor.core.errors import LimitExceeded


@dataclass(frozen=True)
class Limits:
    """Per-request limits; the CLI flag that sets each is named in its error."""

    max_request_bytes: int = 256 * 2**20
    max_header_bytes: int = 8 * 2**20  # the msgpack header: graph and small values
    max_nodes: int = 20_000
    max_saved_bytes: int = 2 * 2**30
    max_seconds: float = 300.0
    max_new_tokens: int = 512
    max_batch: int = 1024
    #: Bytes of tensors a request's own ops may hold at once (beyond the model's forward),
    #: estimated by a shape-only pass before it runs and checked per op while it runs.
    max_memory: int = 8 * 2**30
    #: Server-wide rather than per request: how many requests may share one forward pass
    #: (their rows together held to ``max_batch``); 1 turns batching off.
    max_batch_jobs: int = 32
    #: Per owner rather than per request: how many of one owner's requests may be queued or
    #: running at once (a key file's ``max_inflight=N`` overrides it for that key).
    max_inflight: int = 32
    #: Per client address rather than per request: how many connections one address may hold
    #: open at once (idle ones too); a connection over it is shut down as it is accepted.
    #: 0 turns the cap off.
    max_connections_per_address: int = 256
    #: The ``torch.compile`` backends a run may ask for as compiled replay (``--compile``;
    #: the first is what ``compile=True`` means); empty: every run is eager.
    compile: tuple[str, ...] = ()
    #: With ``compile``: compile any plain run of a structure its worker has run this many
    #: times, asked or not (``--compile-after``); 0: only runs that ask.
    compile_after: int = 0


def check(what: str, value: float, limit: float, flag: str) -> None:
    if value > limit:
        raise LimitExceeded(
            f"{what} is {value:,}, over this server's limit of {limit:,} ({flag}); "
            "split the work into smaller requests or ask the operator to raise the limit"
        )
