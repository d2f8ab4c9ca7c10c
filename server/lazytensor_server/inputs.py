"""Inputs: what a run request may pass to the model, and the job built from it.

A language model takes keyword inputs from an allow-list only (a positional input, or any
other keyword, could be ``labels``, ``output_hidden_states`` or another argument that changes
what the forward does or returns). Limits count the rows that really run. The service builds
each job with :func:`job_of` after its checks; a worker process builds the same job from the
same request bytes.
"""

from __future__ import annotations

import torch

from lazytensor.core import tree
from lazytensor.core.errors import OpNotAllowedError, ProtocolError
from lazytensor.core.graph import Batch, Segment
from lazytensor.protocol import messages as m

from .limits import Limits, check
from .runner import Job

#: Keyword inputs a client may pass to a model's forward or ``generate``.
INPUT_KWARGS = frozenset(
    """input_ids attention_mask position_ids token_type_ids use_cache
    max_new_tokens min_new_tokens do_sample temperature top_k top_p num_beams
    repetition_penalty no_repeat_ngram_size length_penalty pad_token_id eos_token_id
    bos_token_id num_return_sequences typical_p logits_to_keep inputs_embeds""".split()
)


def batch_of(batch: Batch, limits: Limits, *, positional: bool) -> Batch:
    """The run's inputs, held to the model-input allow-list and the batch and step limits.

    A language model takes keyword inputs only (a positional one would be ``labels`` or
    another argument outside the allow-list). Limits count the rows that really run: every
    tensor input must have ``size`` rows, and generation multiplies them by its beams or
    returned sequences.
    """
    if batch.args and not positional:
        raise OpNotAllowedError(
            "this server's model takes keyword inputs only (input_ids=..., attention_mask=...)"
        )
    for name in batch.kwargs:
        if name not in INPUT_KWARGS:
            raise OpNotAllowedError(
                f"model input {name!r} is not accepted by this server; "
                f"accepted: {', '.join(sorted(INPUT_KWARGS))}"
            )
    rows = batch.size
    for value in tree.leaves((batch.args, batch.kwargs)):
        if not isinstance(value, torch.Tensor):
            continue
        if positional:  # a generic module's inputs need not share a batch dimension
            rows = max(rows, value.shape[0] if value.dim() else 1)
        elif value.dim() == 0 or value.shape[0] != batch.size:
            raise ProtocolError(
                f"the batch claims {batch.size} rows but holds an input of shape "
                f"{tuple(value.shape)}; every tensor input has one row per batch row"
            )
    kwargs = dict(batch.kwargs)
    if batch.generate:
        copies = [kwargs.get(k) for k in ("num_beams", "num_return_sequences")]
        if not all(c is None or (type(c) is int and c >= 1) for c in copies):
            raise ProtocolError("num_beams and num_return_sequences must be positive integers")
        rows *= max((c for c in copies if c is not None), default=1)
    check("batch rows", rows, limits.max_batch, "--max-batch")
    if batch.generate:
        steps = kwargs.setdefault("max_new_tokens", min(20, limits.max_new_tokens))
        if not isinstance(steps, int):
            raise ProtocolError("max_new_tokens must be an integer")
        check("generation steps (max_new_tokens)", steps, limits.max_new_tokens, "--max-new-tokens")
    return Batch(batch.args, kwargs, batch.size, batch.generate)


def job_of(request: m.Run, model: str, limits: Limits, *, positional: bool) -> Job:
    """The job for ``request`` (checked by the service) on ``model``: its inputs held to the
    allow-list and limits (:func:`batch_of`); ``positional`` for a model without a tokenizer."""
    segments = tuple(
        Segment(s.graph, s.batch and batch_of(s.batch, limits, positional=positional))
        for s in request.segments
    )
    batch = batch_of(request.batch, limits, positional=positional) if not segments else Batch()
    job = Job(request.id, None, model, request.graph, batch, request.stop_at, request.fake, 0)
    job.segments, job.compile = segments, request.compile
    return job
