"""The tiny-model cases of ``bench_trace.py`` written with nnsight 0.8.1, for comparison.

nnsight is never a dependency of lazytensor: run this in its own virtual environment that
reuses this machine's torch and transformers::

    python -m venv /tmp/nnsight-venv --system-site-packages
    /tmp/nnsight-venv/bin/pip install nnsight==0.8.1      # must keep the installed torch
    /tmp/nnsight-venv/bin/python benchmarks/bench_nnsight.py --json nnsight.json \\
        --compare lazytensor.json

The plain forward and the hand-written hooks (:mod:`common`) are measured again here, in the
same process and interleaved with nnsight's traces, so that *added µs* and *× hooks* mean the
same as in ``bench_trace.py``. ``--compare`` reads ``bench_trace.py --json`` output and prints
lazytensor's added µs beside nnsight's, case by case.

nnsight runs a trace's body interleaved with the forward pass (a worker per invoke) rather than
recording a graph, so it has no "record only" time; its per-op cost is reported as the
difference between a trace with 1000 small ops and one with none, like lazytensor's.
"""

from __future__ import annotations

import argparse
import functools
import json
import warnings
from typing import Any

import common
from common import (
    FORCING,
    GENERATE,
    LONG_OPS,
    OPS_LAYER,
    PATCH_LAYER,
    PER_OP_OPS,
    SAVE_LAYER,
    STEER_LAYER,
)

LIB = "nnsight"


def _walk(envoy: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), envoy)


# -- the experiments, written with nnsight's API -------------------------------------------------
def one_save(model: Any, lay: common.Layout, x: dict) -> Any:
    with model.trace(**x):
        h = _walk(model, lay.layers)[SAVE_LAYER].output.save()
    return h


def saves_12(model: Any, lay: common.Layout, x: dict) -> Any:
    import nnsight

    # nnsight's idiom for a collection: save the container, append the values.
    with model.trace(**x):
        hs = nnsight.save([])
        for layer in _walk(model, lay.layers)[:12]:
            hs.append(layer.output)
    return hs


def neuron_forcing(model: Any, lay: common.Layout, x: dict) -> Any:
    which = common.forcing_rows(x["input_ids"].shape[0])
    with model.trace(**x):
        for layer, ids in FORCING.items():
            h = _walk(_walk(model, lay.layers)[layer], lay.down_proj).input
            h[which, -1, ids] = 5.0
        out = model.output.save()
    return out


def patching(model: Any, lay: common.Layout, clean: dict, corrupt: dict) -> Any:
    # nnsight runs each invoke as its own worker; a barrier hands the clean value across.
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(**clean):
            h = _walk(model, lay.layers)[PATCH_LAYER].output[:, -1]
            barrier()
        with tracer.invoke(**corrupt):
            barrier()
            _walk(model, lay.layers)[PATCH_LAYER].output[:, -1] = h
            patched = model.lm_head.output[:, -1].save()
    return patched


def small_ops(model: Any, lay: common.Layout, x: dict, n: int = 100) -> Any:
    with model.trace(**x):
        h = _walk(model, lay.layers)[OPS_LAYER].output
        for _ in range(n // 2):
            h = h * 1.0001 + 0.0
        h = h.save()
    return h


def generate(model: Any, lay: common.Layout, x: dict, pad: int) -> Any:
    # tracer.all() is an open loop over steps; nnsight runs what follows such a loop in a
    # separate invoke, so the generated ids are read in an empty one.
    with model.generate(pad_token_id=pad, **GENERATE) as tracer:
        with tracer.invoke(**x):
            for _ in tracer.all():
                _walk(_walk(model, lay.layers)[STEER_LAYER], lay.mlp).output[:] *= 0.5
        with tracer.invoke():
            tokens = tracer.result.save()
    return tokens


# -- running -------------------------------------------------------------------------------------
def cases_for(shape: common.Shape, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    from nnsight import TransformersModel

    hf, tokenizer = common.load(shape, args.device, args.dtype)
    model = TransformersModel(hf, tokenizer=tokenizer)
    lay = common.LAYOUTS[shape.arch]
    rows, other = common.token_rows(shape, seed=1), common.token_rows(shape, seed=2)
    x, y = common.model_inputs(rows, args.device), common.model_inputs(other, args.device)
    both = common.model_inputs(rows + other, args.device)
    pad = tokenizer.pad_token_id
    trace = {
        "forward": lambda: common.plain_forward(hf, x),
        "forward_2x": lambda: common.plain_forward(hf, both),
        "hooks:one_save": lambda: common.hooks_one_save(hf, lay, x),
        f"{LIB}:one_save": lambda: one_save(model, lay, x),
        "hooks:saves_12": lambda: common.hooks_saves_12(hf, lay, x),
        f"{LIB}:saves_12": lambda: saves_12(model, lay, x),
        "hooks:neuron_forcing": lambda: common.hooks_neuron_forcing(hf, lay, x).logits,
        f"{LIB}:neuron_forcing": lambda: neuron_forcing(model, lay, x).logits,
        "hooks:patching": lambda: common.hooks_patching(hf, lay, both),
        f"{LIB}:patching": lambda: patching(model, lay, x, y),
        "hooks:ops_100": lambda: common.hooks_ops(hf, lay, x),
        f"{LIB}:ops_100": lambda: small_ops(model, lay, x),
    }
    gen = {
        "generate": lambda: common.plain_generate(hf, x, pad),
        "hooks:generate": lambda: common.hooks_generate(hf, lay, x, pad),
        f"{LIB}:generate": lambda: generate(model, lay, x, pad),
    }
    per_op = {  # fewer rounds: (f) and (g) are long
        "hooks:ops_0": lambda: common.hooks_ops(hf, lay, x, 0),
        f"{LIB}:ops_0": lambda: small_ops(model, lay, x, 0),
    }
    for n in (PER_OP_OPS, LONG_OPS):
        per_op[f"hooks:ops_{n}"] = functools.partial(common.hooks_ops, hf, lay, x, n)
        per_op[f"{LIB}:ops_{n}"] = functools.partial(small_ops, model, lay, x, n)
    return trace, gen, per_op


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = common.TINY[0]
    trace, gen, per_op = cases_for(shape, args)
    sync, clock = common.synchronizer(args.device), common.CLOCKS[args.clock]
    repeats = args.repeats or 200
    samples, first = common.measure(trace, repeats, 10, sync, clock)
    more, first_gen = common.measure(gen, max(5, repeats // 5), 2, sync, clock)
    common.check(first | first_gen, LIB, exact=args.device == "cpu")
    samples |= more
    more, first_ops = common.measure(per_op, max(5, repeats // 4), 2, sync, clock)
    common.check(first_ops, LIB, exact=args.device == "cpu")
    samples |= more
    rows = common.rows_from(samples, LIB, {"patching": "forward_2x", "generate": "generate"})
    return {
        "shape": vars(shape) | {"label": shape.label},
        "rows": [vars(r) for r in rows],
        "per_op_us": {
            "record_and_replay": common.per_op_us(samples, LIB),
            "eager_in_hook": common.per_op_us(samples, "hooks"),
        },
        "samples_ns": samples,
    }


def report(result: dict[str, Any], markdown: bool) -> None:
    header = [c.format(lib=LIB) for c in common.COLUMNS]
    cells = [common.row_cells(common.Row(**r)) for r in result["rows"]]
    common.print_table(f"nnsight · {result['shape']['label']}", header, cells, markdown)
    p = result["per_op_us"]
    common.print_table(
        f"µs per small op, nnsight ({PER_OP_OPS} ops)",
        ["trace with ops − without", "eager, in a hook", "added per op"],
        [[f"{p['record_and_replay']:.2f}", f"{p['eager_in_hook']:.2f}",
          f"{p['record_and_replay'] - p['eager_in_hook']:.2f}"]],
        markdown,
    )  # fmt: skip


def compare(ours: dict[str, Any], path: str, markdown: bool) -> None:
    """lazytensor's added µs (from ``bench_trace.py --json``) beside nnsight's, per case."""
    theirs = json.loads(open(path).read())
    tiny = next(r for r in theirs["results"] if r["shape"]["label"] == ours["shape"]["label"])
    lt_added = {r["case"]: common.Row(**r).added_us for r in tiny["rows"]}
    cells = []
    for r in ours["rows"]:
        nn_added = common.Row(**r).added_us
        lt = lt_added.get(r["case"])
        if lt is None:
            continue
        ratio = lt / nn_added if nn_added > 0 else float("nan")
        met = "yes" if ratio <= 0.5 else "no"
        cells.append([r["case"], f"{lt:+.0f}", f"{nn_added:+.0f}", f"{ratio:.2f}", met])
    if "per_op_us" in tiny:
        lt_op = tiny["per_op_us"]["record_and_replay"] - tiny["per_op_us"]["eager_in_hook"]
        nn_op = ours["per_op_us"]["record_and_replay"] - ours["per_op_us"]["eager_in_hook"]
        cells.append(["per small op (µs)", f"{lt_op:+.2f}", f"{nn_op:+.2f}", "", ""])
    common.print_table(
        "added µs over hand-written hooks: lazytensor vs nnsight",
        ["case", "lazytensor", "nnsight", "lazytensor / nnsight", "≤ 0.5?"],
        cells,
        markdown,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser, "default: 200")
    parser.add_argument("--compare", metavar="PATH", help="bench_trace.py --json output")
    args = parser.parse_args(argv)
    common.setup(args)
    import nnsight

    warnings.filterwarnings("ignore", module="nnsight")  # per-trace notices, not failures
    info = common.machine(args.device) | {"nnsight": nnsight.__version__}
    print(" · ".join(f"{k}: {v}" for k, v in info.items()), f"· {args.dtype} · clock {args.clock}")
    result = run(args)
    report(result, args.markdown)
    if args.compare:
        compare(result, args.compare, args.markdown)
    if args.json:
        common.write_json(args.json, {"library": LIB, "machine": info, "args": vars(args),
                                      "results": [result]})  # fmt: skip


if __name__ == "__main__":
    main()
