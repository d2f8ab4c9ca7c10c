"""The demo: force a few MLP neurons of a small Llama and compare its next-token predictions.

It is the neuron-forcing experiment of the README, end to end: build a small random-weight
Llama (no download), trace one forward pass over each prompt twice, force chosen neurons to a
fixed value at the last token in the second copy only, and print a table of the clean and the
forced top-5 next tokens. ``lazytensor demo`` runs it; the trace takes ``remote=`` from
:func:`main`, so the same experiment runs on a server once one is attached.

Example::

    python -m lazytensor demo --local
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .frontend.model import LanguageModel
from .frontend.served import connect

PROMPTS = ("Q: cheap\nA:", "Q: big\nA:", "Q: fast\nA:")
"""The prompts; each is run clean and forced in the same batch."""

NEURONS = {1: (7, 25), 3: (94,)}
"""Layer index -> MLP neurons (inputs of ``down_proj``) to force."""

VALUE = 5.0
"""What the forced neurons are set to."""

MODEL = {"layers": 6, "hidden": 128, "initializer_range": 0.1}
"""The demo model: a little larger, with larger random weights than the default tiny Llama,
so that its next-token distributions are peaked enough to read."""

TOP = 5


def load_model() -> LanguageModel:
    """Build (once per process) and load the demo's small random-weight Llama."""
    from .tiny import _progress_bars_off, cached_tiny_lm

    with _progress_bars_off():
        return LanguageModel(cached_tiny_lm("llama", **MODEL))


def force_neurons(
    lm: LanguageModel, prompts: tuple[str, ...] = PROMPTS, *, remote: Any = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the experiment; return the clean and the forced next-token probabilities.

    Args:
        lm: the model.
        prompts: the prompts; the batch holds them twice, clean rows first.
        remote: passed to ``lm.trace``: ``False`` runs here, ``True`` or an address on a server.

    Returns:
        ``(clean, forced)``, each of shape ``(len(prompts), vocab)``.
    """
    n = len(prompts)
    with lm.trace(list(prompts) * 2, remote=remote):
        for layer, ids in NEURONS.items():
            neurons = lm.model.layers[layer].mlp.down_proj.input  # (2n, tokens, mlp)
            neurons[n:, -1, list(ids)] = VALUE  # the second copy only, last token
        logits = lm.output.logits[:, -1].save()  # (2n, vocab)
    probs = logits.softmax(-1)  # (2n, vocab)
    return probs[:n], probs[n:]


def table(
    lm: LanguageModel, prompts: tuple[str, ...], clean: torch.Tensor, forced: torch.Tensor
) -> Table:
    """A ``rich`` table: per prompt, the clean and the forced top-5 tokens with probabilities."""
    forcing = ", ".join(f"layer {layer} {list(ids)}" for layer, ids in NEURONS.items())
    out = Table(
        title=f"Neuron forcing: MLP neurons {forcing} set to {VALUE} at the last token",
        caption="random weights: the tokens mean nothing, the change does\n"
        "bold: not in the clean top-5 · shift: total variation distance",
        show_lines=True,
    )
    out.add_column("prompt")
    out.add_column(f"clean top-{TOP}")
    out.add_column(f"forced top-{TOP}")
    out.add_column("shift", justify="right")
    for prompt, p, q in zip(prompts, clean, forced):
        clean_ids = set(p.topk(TOP).indices.tolist())
        shift = 0.5 * (q - p).abs().sum().item()
        out.add_row(
            Text(repr(prompt)),
            _ranked(lm, p, set()),
            _ranked(lm, q, clean_ids),
            f"{shift:.3f}",
        )
    return out


def _ranked(lm: LanguageModel, probs: torch.Tensor, known: set[int]) -> Text:
    """The top tokens of ``probs``, one per line; those not in ``known`` are bold."""
    top = probs.topk(TOP)
    text = Text()
    for rank, (token, p) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
        style = "bold" if known and token not in known else ""
        text.append(f"{_token(lm, token):<12}", style=style)
        text.append(f" {p:.3f}" + ("\n" if rank < TOP - 1 else ""))
    return text


def _token(lm: LanguageModel, token: int) -> str:
    """A token as quoted text; a token that is part of a multi-byte character as its id."""
    text = lm.tokenizer.decode(token)
    return f"<#{token}>" if "\ufffd" in text else repr(text)


def main(remote: bool = False) -> None:
    """Run the neuron-forcing demo and print the table.

    Args:
        remote: run the trace on a server instead of in this process.
    """
    console = Console()
    lm = load_model()
    if not remote:
        clean, forced = force_neurons(lm, PROMPTS)
        console.print(f"Traced one forward pass over {2 * len(PROMPTS)} rows locally.")
        console.print(table(lm, PROMPTS, clean, forced))
        return
    app = _embedded_server(lm)
    try:
        client = connect(app.endpoint)
        served = client.model("demo-llama")  # built from the server's description alone
        clean, forced = force_neurons(served, PROMPTS, remote=True)
        local = force_neurons(lm, PROMPTS)
        same = torch.equal(clean, local[0]) and torch.equal(forced, local[1])
        info = client.models()[0]
        console.print(
            f"Traced one forward pass over {2 * len(PROMPTS)} rows on an embedded server at "
            f"{app.endpoint} ({info['name']}, {info['parameters']:,} parameters, "
            f"{info['device']})."
        )
        console.print(f"remote equals local: {same}")
        console.print(table(served, PROMPTS, clean, forced))
    finally:
        app.stop()


def _embedded_server(lm: LanguageModel) -> Any:
    """A real ZeroMQ server on a free loopback port, in this process, serving ``lm``'s model."""
    from lazytensor_server.app import serve_in_thread
    from lazytensor_server.registry import ServedModel
    from lazytensor_server.service import Service

    served = ServedModel.wrap("demo-llama", lm._module, lm.tokenizer, str(lm._name))
    return serve_in_thread(Service([served]))
