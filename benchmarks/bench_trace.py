"""What a lazytensor trace costs over the same interventions written by hand with hooks.

For each model shape it times, in one process and interleaved round by round: the plain forward
(under ``torch.no_grad``), each experiment written with ``register_forward_hook``/``_pre_hook``
(:mod:`common`), and the same experiment as a lazytensor trace, on the same model object and the
same input tensors. Each trace's result from the first round is checked against its hook
reference, so both are known to do the same work.

* ``--size tiny``: a 12-layer, d=64 Llama at batch 1, seq 16. The forward pass is negligible,
  so the table's *added µs* column is the per-trace cost of lazytensor. Also: generation with a
  per-step edit, and microseconds per recorded op.
* ``--size medium``: a GPT-2-small-shaped model (12 layers, d=768) and a 12-layer d=512 Llama,
  at batch 1 and 8, seq 32 and 128. The *× hooks* column is the headline.
* ``--size 1b``: a Llama-3.2-1B-shaped model (random weights, drawn on the device) at batch 1,
  seq 16: the GPU target's model (eager traces within 1.05× of hooks).

Examples::

    python benchmarks/bench_trace.py --size tiny
    python benchmarks/bench_trace.py --size all --json bench.json --markdown
    python benchmarks/bench_trace.py --size medium --device cuda --dtype bfloat16
    python benchmarks/bench_trace.py --size 1b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import random
import time
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

import lazytensor as lt

LIB = "lazytensor"
#: The speed issue's target for one recorded op (record + plan + replay, over the op itself).
#: The other per-trace target (≤ ½ nnsight's added time) is judged by ``bench_nnsight.py
#: --compare``, which has both libraries' numbers.
PER_OP_TARGET_US = 1.5


# -- the experiments as traces -------------------------------------------------------------------
def _walk(envoy: Any, path: str) -> Any:
    """``envoy.a.b.c`` for ``path="a.b.c"``, written as a user would (attribute access)."""
    return functools.reduce(getattr, path.split("."), envoy)


def one_save(lm: lt.LanguageModel, lay: common.Layout, rows: list) -> Any:
    with lm.trace(rows):
        h = _walk(lm, lay.layers)[SAVE_LAYER].output.save()
    return h


def saves_12(lm: lt.LanguageModel, lay: common.Layout, rows: list) -> Any:
    with lm.trace(rows):
        hs = [layer.output.save() for layer in _walk(lm, lay.layers)[:12]]
    return [h for h in hs]


def neuron_forcing(lm: lt.LanguageModel, lay: common.Layout, rows: list) -> Any:
    which = common.forcing_rows(len(rows))
    with lm.trace(rows):
        for layer, ids in FORCING.items():
            x = _walk(_walk(lm, lay.layers)[layer], lay.down_proj).input
            x[which, -1, ids] = 5.0
        out = lm.output.save()
    return out


def patching(lm: lt.LanguageModel, lay: common.Layout, clean: list, corrupt: list) -> Any:
    with lm.trace() as tracer:
        with tracer.invoke(clean):
            h = _walk(lm, lay.layers)[PATCH_LAYER].output[:, -1].save()
        with tracer.invoke(corrupt):
            _walk(lm, lay.layers)[PATCH_LAYER].output[:, -1] = h
            patched = lm.lm_head.output[:, -1].save()
    return patched


def small_ops(lm: lt.LanguageModel, lay: common.Layout, rows: list, n: int = 100) -> Any:
    with lm.trace(rows):
        h = _walk(lm, lay.layers)[OPS_LAYER].output
        for _ in range(n // 2):
            h = h * 1.0001 + 0.0
        h.save()
    return h


def recording_ns(
    lm: lt.LanguageModel, lay: common.Layout, rows: list, n: int, clock: Any = time.perf_counter_ns
) -> int:
    """Nanoseconds spent recording ``n`` small ops inside a trace (its run not included)."""
    with lm.trace(rows):
        h = _walk(lm, lay.layers)[OPS_LAYER].output
        start = clock()
        for _ in range(n // 2):
            h = h * 1.0001 + 0.0
        elapsed = clock() - start
        h.save()
    return elapsed


def generate(lm: lt.LanguageModel, lay: common.Layout, rows: list) -> Any:
    with lm.generate(rows, **GENERATE) as tracer:
        with tracer.all():
            _walk(_walk(lm, lay.layers)[STEER_LAYER], lay.mlp).output[:] *= 0.5
        tokens = tracer.result.save()
    return tokens


# -- one shape -----------------------------------------------------------------------------------
def cases_for(
    shape: common.Shape, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any]:
    """The timed cases of one shape: (trace group, generation group, per-op group, lm)."""
    model, tokenizer = common.load(shape, args.device, args.dtype)
    lm = lt.LanguageModel(model, tokenizer=tokenizer)
    lay = common.LAYOUTS[shape.arch]
    rows, other = common.token_rows(shape, seed=1), common.token_rows(shape, seed=2)
    x = common.model_inputs(rows, args.device)
    both = common.model_inputs(rows + other, args.device)  # (2B, T): the two invokes of (d)
    pad = tokenizer.pad_token_id
    trace = {
        "forward": lambda: common.plain_forward(model, x),
        "forward_2x": lambda: common.plain_forward(model, both),
        "hooks:one_save": lambda: common.hooks_one_save(model, lay, x),
        f"{LIB}:one_save": lambda: one_save(lm, lay, rows),
        "hooks:saves_12": lambda: common.hooks_saves_12(model, lay, x),
        f"{LIB}:saves_12": lambda: saves_12(lm, lay, rows),
        "hooks:neuron_forcing": lambda: common.hooks_neuron_forcing(model, lay, x).logits,
        f"{LIB}:neuron_forcing": lambda: neuron_forcing(lm, lay, rows).logits,
        "hooks:patching": lambda: common.hooks_patching(model, lay, both),
        f"{LIB}:patching": lambda: patching(lm, lay, rows, other),
        "hooks:ops_100": lambda: common.hooks_ops(model, lay, x),
        f"{LIB}:ops_100": lambda: small_ops(lm, lay, rows),
    }
    gen = {
        "generate": lambda: common.plain_generate(model, x, pad),
        "hooks:generate": lambda: common.hooks_generate(model, lay, x, pad),
        f"{LIB}:generate": lambda: generate(lm, lay, rows),
    }
    per_op = {  # fewer rounds: (f) and (g) are long
        "hooks:ops_0": lambda: common.hooks_ops(model, lay, x, 0),
        f"{LIB}:ops_0": lambda: small_ops(lm, lay, rows, 0),
    }
    for n in (PER_OP_OPS, LONG_OPS):
        per_op[f"hooks:ops_{n}"] = functools.partial(common.hooks_ops, model, lay, x, n)
        per_op[f"{LIB}:ops_{n}"] = functools.partial(small_ops, lm, lay, rows, n)
    return trace, gen, per_op, (lm, lay, rows)


def run_shape(shape: common.Shape, args: argparse.Namespace, tiny: bool) -> dict[str, Any]:
    trace, gen, per_op, (lm, lay, rows) = cases_for(shape, args)
    sync, clock = common.synchronizer(args.device), common.CLOCKS[args.clock]
    repeats = args.repeats or _default_repeats(args, tiny)
    # Warm-up rounds; a medium model on a CPU is too slow for any (its medians take the hit).
    warmup = 10 if tiny else 3 if args.device != "cpu" else 0
    shuffle = random.Random(0)
    samples, first = common.measure(trace, repeats, warmup, sync, clock, shuffle)
    if tiny or args.generate:
        more, first_gen = common.measure(gen, max(5, repeats // 5), 2, sync, clock, shuffle)
        samples, first = samples | more, first | first_gen
    common.check(first, LIB, exact=args.device == "cpu")
    result: dict[str, Any] = {"shape": vars(shape) | {"label": shape.label}}
    if tiny:
        more, first_ops = common.measure(per_op, max(5, repeats // 4), 2, sync, clock, shuffle)
        common.check(first_ops, LIB, exact=args.device == "cpu")
        samples |= more
        record = [
            recording_ns(lm, lay, rows, PER_OP_OPS, clock) for _ in range(max(5, repeats // 4))
        ]
        result["per_op_us"] = {
            "record": common.median_ms(record) * 1e3 / PER_OP_OPS,
            "record_and_replay": common.per_op_us(samples, LIB),
            "eager_in_hook": common.per_op_us(samples, "hooks"),
            "added": common.added_per_op_us(samples, LIB),
        }
    forward_of = {"patching": "forward_2x", "generate": "generate"}
    result["rows"] = [vars(r) for r in common.rows_from(samples, LIB, forward_of)]
    result["samples_ns"] = samples
    return result


def _default_repeats(args: argparse.Namespace, tiny: bool) -> int:
    if tiny:
        return 200
    return 3 if args.device == "cpu" else 50


# -- output --------------------------------------------------------------------------------------
def report(results: list[dict[str, Any]], markdown: bool) -> None:
    header = [c.format(lib=LIB) for c in common.COLUMNS]
    for result in results:
        cells = [common.row_cells(common.Row(**r)) for r in result["rows"]]
        common.print_table(result["shape"]["label"], header, cells, markdown)
        if "per_op_us" in result:
            p = result["per_op_us"]
            common.print_table(
                f"µs per small op ({PER_OP_OPS} ops, {result['shape']['label']})",
                ["record only", "record + replay", "eager, in a hook", "added per op"],
                [[f"{p['record']:.2f}", f"{p['record_and_replay']:.2f}",
                  f"{p['eager_in_hook']:.2f}", f"{p['added']:.2f}"]],
                markdown,
            )  # fmt: skip
            added = p["added"]
            verdict = "met" if added <= PER_OP_TARGET_US else "missed"
            print(f"target: ≤ {PER_OP_TARGET_US} µs added per recorded op end to end: "
                  f"{added:.2f} µs, {verdict}")  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "medium", "all", "1b"), default="tiny")
    common.add_arguments(parser, "default: 200 tiny; medium 3 on cpu, 50 on cuda")
    parser.add_argument("--generate", action="store_true", help="time generation on medium too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    common.setup(args)
    shapes = [(s, True) for s in common.TINY] if args.size in ("tiny", "all") else []
    if args.size in ("medium", "all"):
        shapes += [(s, False) for s in common.MEDIUM]
    if args.size == "1b":  # the GPU target's model (built in memory: a GPU, or patience)
        shapes = [(common.LLAMA_1B, False)]
    info = common.machine(args.device)
    print(" · ".join(f"{k}: {v}" for k, v in info.items()), f"· {args.dtype} · clock {args.clock}")
    results = []
    for shape, tiny in shapes:
        results.append(run_shape(shape, args, tiny))
        report(results[-1:], args.markdown)
    if args.json:
        common.write_json(args.json, {"library": LIB, "machine": info, "args": vars(args),
                                      "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
