"""The tiny-model cases of ``bench_trace.py`` written with nnsight 0.8.1, for comparison.

nnsight is never a dependency of lazytensor: run this in its own virtual environment that
reuses this machine's torch and transformers::

    python -m venv /tmp/nnsight-venv --system-site-packages
    /tmp/nnsight-venv/bin/pip install nnsight==0.8.1      # must keep the installed torch
    /tmp/nnsight-venv/bin/python benchmarks/bench_nnsight.py --with-lazytensor --markdown

The plain forward and the hand-written hooks (:mod:`common`) are measured again here, in the
same process and interleaved with nnsight's traces, so that *added µs* and *× hooks* mean the
same as in ``bench_trace.py``. Two ways to compare with lazytensor:

* ``--with-lazytensor`` (the one to trust on a machine whose speed drifts): lazytensor's cases
  from ``bench_trace.py`` run in this process too, on their own copy of the model, every round
  all cases of both libraries in a fresh random order; each library's added µs is paired by
  round against its own hooks (``common.paired_us``). This needs lazytensor importable in the
  nnsight environment (``--system-site-packages`` and lazytensor installed in the base one);
* ``--compare PATH`` reads ``bench_trace.py --json`` output of another process run.

nnsight runs a trace's body interleaved with the forward pass (a worker per invoke) rather than
recording a graph, so it has no "record only" time; its per-op cost is reported as the
difference between a trace with 1000 small ops and one with none, like lazytensor's.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
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


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Time nnsight's cases (and, ``--with-lazytensor``, lazytensor's) against hooks.

    Side by side, each library has its own copy of the model (nnsight wraps the one it is
    given) with its own hand-written hooks and plain forward, and every round runs all cases of
    both in a fresh random order: the two libraries meet the same drift of the machine, which
    two processes run one after the other do not (this VM's speed changes about 2x between
    phases lasting minutes). Returns each library's result, by name."""
    shape = common.TINY[0]
    groups = {LIB: cases_for(shape, args)}
    if args.with_lazytensor:
        import bench_trace

        groups[bench_trace.LIB] = bench_trace.cases_for(shape, args)[:3]
    sync, clock = common.synchronizer(args.device), common.CLOCKS[args.clock]
    shuffle = random.Random(0)
    repeats = args.repeats or 200
    samples: dict[str, list[int]] = {}
    for part, rounds, warmup in ((0, repeats, 10), (1, max(5, repeats // 5), 2),
                                 (2, max(5, repeats // 4), 2)):  # fmt: skip
        merged = {f"{lib}/{name}": fn for lib, cases in groups.items()
                  for name, fn in cases[part].items()}  # fmt: skip
        more, first = common.measure(merged, rounds, warmup, sync, clock, shuffle)
        for lib in groups:
            mine = {k.split("/", 1)[1]: v for k, v in first.items() if k.startswith(f"{lib}/")}
            common.check(mine, lib, exact=args.device == "cpu")
        samples |= more
    forward_of = {"patching": "forward_2x", "generate": "generate"}
    results = {}
    for lib in groups:
        mine = {k.split("/", 1)[1]: v for k, v in samples.items() if k.startswith(f"{lib}/")}
        results[lib] = {
            "shape": vars(shape) | {"label": shape.label},
            "rows": [vars(r) for r in common.rows_from(mine, lib, forward_of)],
            "per_op_us": {
                "record_and_replay": common.per_op_us(mine, lib),
                "eager_in_hook": common.per_op_us(mine, "hooks"),
                "added": common.added_per_op_us(mine, lib),
            },
            "samples_ns": mine,
        }
    return results


def report(lib: str, result: dict[str, Any], markdown: bool) -> None:
    header = [c.format(lib=lib) for c in common.COLUMNS]
    cells = [common.row_cells(common.Row(**r)) for r in result["rows"]]
    common.print_table(f"{lib} · {result['shape']['label']}", header, cells, markdown)
    p = result["per_op_us"]
    common.print_table(
        f"µs per small op, {lib} ({PER_OP_OPS} ops)",
        ["trace with ops − without", "eager, in a hook", "added per op"],
        [[f"{p['record_and_replay']:.2f}", f"{p['eager_in_hook']:.2f}", f"{p['added']:.2f}"]],
        markdown,
    )  # fmt: skip


def compare(ours: dict[str, Any], tiny: dict[str, Any], markdown: bool) -> None:
    """lazytensor's added µs (``tiny``: its result on the same shape) beside nnsight's."""
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
        lt_op, nn_op = (_added_per_op(r["per_op_us"]) for r in (tiny, ours))
        ratio = lt_op / nn_op if nn_op > 0 else float("nan")
        cells.append(["per small op (µs)", f"{lt_op:+.2f}", f"{nn_op:+.2f}", f"{ratio:.2f}",
                      "yes" if ratio <= 0.5 else "no"])  # fmt: skip
    common.print_table(
        "added µs over hand-written hooks: lazytensor vs nnsight",
        ["case", "lazytensor", "nnsight", "lazytensor / nnsight", "≤ 0.5?"],
        cells,
        markdown,
    )
    missed = [c[0] for c in cells if c[-1] == "no"]
    verdict = f"missed ({', '.join(missed)})" if missed else "met"
    print(f"target: lazytensor's added time ≤ ½ of nnsight's in every case: {verdict}")


def _added_per_op(p: dict[str, float]) -> float:
    if "added" in p:  # paired by round (common.added_per_op_us)
        return p["added"]
    return p["record_and_replay"] - p["eager_in_hook"]


def _from_file(path: str, label: str) -> dict[str, Any]:
    """The result for shape ``label`` in a ``bench_trace.py --json`` file."""
    theirs = json.loads(open(path).read())
    return next(r for r in theirs["results"] if r["shape"]["label"] == label)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser, "default: 200")
    parser.add_argument("--compare", metavar="PATH", help="bench_trace.py --json output")
    parser.add_argument(
        "--with-lazytensor",
        action="store_true",
        help="time lazytensor's cases too, interleaved in this process, and compare",
    )
    args = parser.parse_args(argv)
    common.setup(args)
    import nnsight

    warnings.filterwarnings("ignore", module="nnsight")  # per-trace notices, not failures
    info = common.machine(args.device) | {"nnsight": nnsight.__version__}
    print(" · ".join(f"{k}: {v}" for k, v in info.items()), f"· {args.dtype} · clock {args.clock}")
    results = run(args)
    for lib, result in results.items():
        report(lib, result, args.markdown)
    ours = results[LIB]
    if "lazytensor" in results:
        compare(ours, results["lazytensor"], args.markdown)
    elif args.compare:
        compare(ours, _from_file(args.compare, ours["shape"]["label"]), args.markdown)
    if args.json:
        payload = {"libraries": list(results), "machine": info, "args": vars(args)}
        common.write_json(args.json, payload | {"results": list(results.values())})


if __name__ == "__main__":
    main()
