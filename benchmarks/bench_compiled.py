"""Compiled replay: neuron forcing at batch 1, eager against ``compile=``, in one process.

The same experiment as ``bench_trace.py``'s (c), timed four ways, interleaved round by round
(:func:`common.measure`) on the same model object and inputs:

* ``forward``: the plain forward (``torch.no_grad``);
* ``hooks``: hand-written forward pre-hooks forcing the neurons, eager;
* ``eager trace``: the lazytensor trace, replayed by the executor;
* ``compiled trace``: the same trace with ``compile=<backend>`` (``inductor`` by default): the
  model and the interventions as one ``torch.compile``'d function; the first run of the
  structure records its schedule and the compile happens in the warm-up rounds.

Each compiled result is checked against the eager trace's (``assert_close``). The target of
the speed issue is for a GPU (batch-1 neuron forcing on a 1B-class Llama in bf16 at ≥ 4× the
speed of hand-written eager hooks, with CUDA graphs); on a CPU the table reports the ratio.

Examples::

    python benchmarks/bench_compiled.py --size tiny
    python benchmarks/bench_compiled.py --size tiny --backend aot_eager --markdown
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common
import torch
from common import FORCING

import lazytensor as lt

LIB = "lazytensor"
SIZES = {"tiny": common.TINY[0], "small": common.Shape("llama", 12, 256, 4, 1, 16)}


def forcing(lm: lt.LanguageModel, lay: common.Layout, rows: list, compile: Any) -> Any:
    with lm.trace(rows, compile=compile):
        for layer, ids in FORCING.items():
            x = lm.get(f"{lay.layers}.{layer}.{lay.down_proj}").input
            x[:, -1, ids] = 5.0
        out = lm.output.logits.save()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    common.add_arguments(parser, "default: 50")
    args = parser.parse_args(argv)
    common.setup(args)
    shape = SIZES[args.size]
    info = common.machine(args.device)
    print(" · ".join(f"{k}: {v}" for k, v in info.items()), f"· {args.dtype} · clock {args.clock}")
    model, tokenizer = common.load(shape, args.device, args.dtype)
    lm = lt.LanguageModel(model, tokenizer=tokenizer)
    lay = common.LAYOUTS[shape.arch]
    rows = common.token_rows(shape, seed=1)
    x = common.model_inputs(rows, args.device)
    start = time.perf_counter()
    forcing(lm, lay, rows, args.backend)  # records the schedule
    forcing(lm, lay, rows, args.backend)  # compiles
    compile_s = time.perf_counter() - start
    cases = {
        "forward": lambda: common.plain_forward(model, x),
        "hooks": lambda: common.hooks_neuron_forcing(model, lay, x),
        "eager trace": lambda: forcing(lm, lay, rows, False),
        "compiled trace": lambda: forcing(lm, lay, rows, args.backend),
    }
    repeats = args.repeats or 50
    sync, clock = common.synchronizer(args.device), common.CLOCKS[args.clock]
    samples, first = common.measure(cases, repeats, 3, sync, clock)
    torch.testing.assert_close(first["compiled trace"], first["eager trace"])
    torch.testing.assert_close(first["hooks"].logits, first["eager trace"], rtol=0, atol=0)
    hooks = common.median_ms(samples["hooks"])
    forward = common.median_ms(samples["forward"])
    cells = []
    for name, runs in samples.items():
        ms = common.median_ms(runs)
        cells.append([name, f"{ms:.3f}", f"{ms / forward:.2f}", f"{hooks / ms:.2f}"])
    header = ["case", "median ms", "× forward", "speed × hooks"]
    title = f"{shape.label}, {repeats} rounds, backend {args.backend}, compile {compile_s:.1f} s"
    common.print_table(title, header, cells, args.markdown)
    speed = hooks / common.median_ms(samples["compiled trace"])
    verdict = "met" if speed >= 4 else "missed"
    where = "GPU target" if args.device.startswith("cuda") else "GPU target, on a CPU"
    print(f"compiled trace at {speed:.2f}× the speed of eager hooks ({where} ≥ 4×): {verdict}")
    if args.json:
        common.write_json(args.json, {"machine": info, "args": vars(args), "samples_ns": samples})


if __name__ == "__main__":
    main()
