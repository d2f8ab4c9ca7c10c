"""Workflows: what caching the first layers costs with and without the forward ending early.

"Cache layers 0-3 of 12" is the SAE data-collection pattern (docs/sae_data.md): keep a few
early layers' outputs, need nothing after them. Timed in one process, interleaved round by
round (:func:`common.measure`), on the same model object and inputs:

* ``forward``: the plain forward (under ``torch.no_grad``), all 12 layers and the head;
* ``hooks``: layers 0-3 kept by hand-written forward hooks on a full forward (what a hook
  can do without raising out of the model);
* ``cache, ends early``: ``tracer.cache(modules=layers[:4])``; the forward ends after layer 3
  on its own;
* ``cache + stop()``: the same with an explicit ``tracer.stop()``;
* ``cache, full forward``: the same cache plus ``lm.output`` saved, so the forward runs to the
  end (the cost of the cache without the early end);
* ``forward-only trace``: a trace that saves ``lm.output`` only (a full forward), to check that
  the early-end bookkeeping does not slow traces that need the whole forward. Run the script
  with ``--only forward_only`` on an older checkout to compare (it needs nothing newer).

The first round's cached values are checked against the hooks' (bit-identical on CPU).

Examples::

    python benchmarks/bench_workflows.py --size tiny
    python benchmarks/bench_workflows.py --size medium --repeats 20 --markdown
"""

from __future__ import annotations

import argparse
from typing import Any

import common
import torch

import lazytensor as lt

LIB = "lazytensor"
CACHED = 4  # layers 0..3
SIZES = {
    "tiny": common.TINY[0],  # llama, 12 layers, d=64, batch 1 x seq 16
    "medium": common.Shape("llama", 12, 512, 8, 8, 128),  # 12 layers, d=512, batch 8 x seq 128
}
LABELS = {
    "forward": "plain forward (12 layers + head)",
    "hooks:cache": "hooks keep layers 0-3, full forward",
    f"{LIB}:cache": "cache layers 0-3, ends early",
    f"{LIB}:cache_stop": "cache layers 0-3 + tracer.stop()",
    f"{LIB}:cache_full": "cache layers 0-3, full forward",
    f"{LIB}:forward_only": "forward-only trace (saves lm.output)",
}


def hooks_cache(model: torch.nn.Module, lay: common.Layout, inputs: dict) -> list:
    saved: list = []
    with common._Hooks(model) as hooks, torch.no_grad():
        for i in range(CACHED):
            hooks.post(lay.layer(i), lambda m, a, out: saved.append(out))
        model(**inputs)
    return saved


def cache(lm: lt.LanguageModel, rows: list, *, stop: bool = False, full: bool = False) -> list:
    with lm.trace(rows) as tracer:
        kept = tracer.cache(modules=[lm.model.layers[i] for i in range(CACHED)])
        if full:
            lm.output.save()
        if stop:
            tracer.stop()
    return [kept.model.layers[i].output for i in range(CACHED)]


def forward_only(lm: lt.LanguageModel, rows: list) -> Any:
    with lm.trace(rows):
        out = lm.output.save()
    return out


def cases_for(shape: common.Shape, args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = common.load(shape, args.device, args.dtype)
    lm = lt.LanguageModel(model, tokenizer=tokenizer)
    lay = common.LAYOUTS[shape.arch]
    rows = common.token_rows(shape, seed=1)
    x = common.model_inputs(rows, args.device)
    cases = {
        "forward": lambda: common.plain_forward(model, x),
        "hooks:cache": lambda: hooks_cache(model, lay, x),
        f"{LIB}:cache": lambda: cache(lm, rows),
        f"{LIB}:cache_stop": lambda: cache(lm, rows, stop=True),
        f"{LIB}:cache_full": lambda: cache(lm, rows, full=True),
        f"{LIB}:forward_only": lambda: forward_only(lm, rows),
    }
    if args.only:
        cases = {k: v for k, v in cases.items() if k in ("forward", f"{LIB}:{args.only}")}
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--only", choices=("forward_only",), help="time only this case")
    common.add_arguments(parser, "default: 100 tiny, 10 medium")
    args = parser.parse_args(argv)
    common.setup(args)
    shape = SIZES[args.size]
    info = common.machine(args.device)
    print(" · ".join(f"{k}: {v}" for k, v in info.items()), f"· {args.dtype} · clock {args.clock}")
    cases = cases_for(shape, args)
    repeats = args.repeats or (100 if args.size == "tiny" else 10)
    sync, clock = common.synchronizer(args.device), common.CLOCKS[args.clock]
    samples, first = common.measure(cases, repeats, 3, sync, clock)
    if f"{LIB}:cache" in first:
        for name in (f"{LIB}:cache", f"{LIB}:cache_stop", f"{LIB}:cache_full"):
            torch.testing.assert_close(first[name], first["hooks:cache"], rtol=0, atol=0)
    forward = common.median_ms(samples["forward"])
    full = common.median_ms(samples.get(f"{LIB}:cache_full", samples["forward"]))
    cells = []
    for name, runs in samples.items():
        ms = common.median_ms(runs)
        cells.append([LABELS[name], f"{ms:.3f}", f"{ms / forward:.2f}", f"{ms / full:.2f}"])
    header = ["case", "median ms", "× forward", "× cache, full forward"]
    common.print_table(f"{shape.label}, {repeats} rounds", header, cells, args.markdown)
    if args.json:
        payload = {"machine": info, "args": vars(args), "samples_ns": samples}
        common.write_json(args.json, payload)


if __name__ == "__main__":
    main()
