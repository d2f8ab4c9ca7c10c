"""How a trace's cost grows with its ops, what a node costs in memory, and whether traces leak.

Three measurements on the tiny Llama of ``common.TINY``, in one process:

* **per-op cost**: a chain of ``n`` small ops (``h * 1.0001 + 0.0`` on a layer's output) for
  ``n`` = 10, 100, 1,000, 10,000, as a trace and as the same loop in a hand-written hook; the
  added µs per op (trace − hook, over ``n``), median of interleaved rounds, and the target of
  the speed issue (≤ 1.5 µs per recorded op end to end): "met" / "missed" (``--clock cpu``
  times this process's CPU time, for a machine shared with other jobs);
* **recording by kind of op**: µs to record one op of each kind a research loop writes (a Python
  operator, an index read and write, a tensor method, a torch function), 1,000 of them in a
  trace (its run not included), beside the same op run eagerly on the real tensor;
* **memory per node**: Python heap bytes (``tracemalloc``) held by a recorded graph of 10,000
  nodes, per node;
* **leaks and peak**: resident memory (``VmRSS``) before and after 10,000 local traces and 2,000
  remote ones (an in-process server), and the peak resident memory a trace adds over the
  model's own forward (``VmHWM`` after resetting it, Linux only).

Example::

    python benchmarks/bench_scaling.py --markdown
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import time
import tracemalloc
from typing import Any

import common
import torch

import lazytensor as lt

LIB = "lazytensor"
TARGET_US = 1.5
COUNTS = (10, 100, 1_000, 10_000)


def chain(lm: lt.LanguageModel, rows: list, n: int) -> Any:
    with lm.trace(rows):
        h = lm.model.layers[common.OPS_LAYER].output
        for _ in range(n // 2):
            h = h * 1.0001 + 0.0
        out = h.save()
    return out


def hooked(model: torch.nn.Module, x: dict, n: int) -> Any:
    return common.hooks_ops(model, common.LAYOUTS["llama"], x, n)


def per_op(lm, model, rows, x, repeats: int, clock: Any = time.perf_counter_ns) -> list[list[str]]:
    """Added µs per op: ((trace of n ops − trace of none) − (hook of n ops − hook of none)) / n,
    so what the forward costs (and where a trace's forward ends) cancels out."""
    cells = []
    for n in COUNTS:
        rounds = max(15, repeats // max(1, n // 100))  # a long chain needs rounds too: noise
        cases = {
            "trace": lambda n=n: chain(lm, rows, n),
            "trace_0": lambda: chain(lm, rows, 0),
            "hooks": lambda n=n: hooked(model, x, n),
            "hooks_0": lambda: hooked(model, x, 0),
        }
        samples, first = common.measure(cases, rounds, 1, lambda: None, clock)
        torch.testing.assert_close(first["trace"], first["hooks"], rtol=0, atol=0)
        ms = {k: statistics.median(v) / 1e6 for k, v in samples.items()}
        trace, hooks = ms["trace"] - ms["trace_0"], ms["hooks"] - ms["hooks_0"]
        added = (trace - hooks) * 1e3 / n
        verdict = "met" if added <= TARGET_US else "missed"
        cells.append([f"{n:,}", f"{trace:.2f}", f"{hooks:.2f}", f"{added:.2f}",
                      f"{verdict} (≤ {TARGET_US} µs)"])  # fmt: skip
    return cells


#: Recording by kind of op: name -> one op on ``h`` (a proxy in a trace, the real tensor eagerly).
KINDS: dict[str, Any] = {
    "operator `h * 1.0001`": lambda h: h * 1.0001,
    "index read `h[:, -1]`": lambda h: h[:, -1],
    "index write `h[:, 0] = 0.0`": lambda h: h.__setitem__((slice(None), 0), 0.0),
    "method `h.sum(-1)`": lambda h: h.sum(-1),
    "torch function `torch.relu(h)`": lambda h: torch.relu(h),
}


def by_kind(lm, rows, model, repeats: int, n: int = 1_000) -> list[list[str]]:
    """Per kind of op: µs to record one (median over ``repeats`` traces of ``n`` ops each), and
    the same op eagerly on the layer output's real value."""
    real = torch.zeros(len(rows), len(rows[0]), model.config.hidden_size)  # h's shape
    cells = []
    for name, op in KINDS.items():
        recorded, eager = [], []
        for _ in range(repeats):
            with lm.trace(rows):
                h = lm.model.layers[common.OPS_LAYER].output * 1.0
                start = time.perf_counter_ns()
                for _ in range(n):
                    op(h)
                recorded.append(time.perf_counter_ns() - start)
                h.save()
            start = time.perf_counter_ns()
            for _ in range(n):
                op(real)
            eager.append(time.perf_counter_ns() - start)
        rec, run = statistics.median(recorded) / n / 1e3, statistics.median(eager) / n / 1e3
        cells.append([name, f"{rec:.2f}", f"{run:.2f}", f"{rec / run:.2f}"])
    return cells


def bytes_per_node(lm: lt.LanguageModel, rows: list, n: int = 10_000) -> float:
    gc.collect()
    tracemalloc.start()
    with lm.trace(rows) as tracer:
        h = lm.model.layers[common.OPS_LAYER].output
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(n // 2):
            h = h * 1.0001 + 0.0
        held = tracemalloc.get_traced_memory()[0] - before
        h.save()
    tracemalloc.stop()
    return held / len(tracer.graph.nodes)


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); 0 where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def peak_added(lm, model, rows, x) -> float:
    """KiB of peak resident memory a trace (12 saves) adds over the model's forward."""
    peaks = []
    for fn in (lambda: common.plain_forward(model, x), lambda: saves(lm, rows)):
        gc.collect()
        _reset_peak()
        base = _status("VmRSS")
        fn()
        peaks.append(_status("VmHWM") - base)
    return peaks[1] - peaks[0]


def saves(lm: lt.LanguageModel, rows: list) -> list:
    with lm.trace(rows):
        kept = [layer.output.save() for layer in lm.model.layers]
    return kept


def leak(run, count: int) -> tuple[float, float]:
    """Resident MiB after a warm-up of 200 runs, and growth over ``count`` more."""
    for _ in range(200):
        run()
    gc.collect()
    start = _status("VmRSS")
    began = time.perf_counter()
    for _ in range(count):
        run()
    gc.collect()
    return start / 1024, (_status("VmRSS") - start) / 1024, time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser, "default: 30 at 100 ops, fewer for more")
    parser.add_argument("--traces", type=int, default=10_000, help="local traces in the leak test")
    args = parser.parse_args(argv)
    common.setup(args)
    shape = common.TINY[0]
    info = common.machine(args.device)
    print(" · ".join(f"{k}: {v}" for k, v in info.items()))
    model, tokenizer = common.load(shape, args.device, args.dtype)
    lm = lt.LanguageModel(model, tokenizer=tokenizer)
    rows = common.token_rows(shape, seed=1)
    x = common.model_inputs(rows, args.device)
    header = ["ops", f"{LIB} ms for the ops", "hooks ms for the ops", "added µs per op", "target"]
    cells = per_op(lm, model, rows, x, args.repeats or 30, common.CLOCKS[args.clock])
    common.print_table(f"{shape.label}: a chain of n small ops", header, cells, args.markdown)
    header = ["op (1,000 in a trace)", "record µs per op", "eager µs per op", "record / eager"]
    cells = by_kind(lm, rows, model, max(5, (args.repeats or 30) // 3))
    common.print_table("recording by kind of op", header, cells, args.markdown)
    per_node = bytes_per_node(lm, rows)
    peak = peak_added(lm, model, rows, x)
    local = leak(lambda: saves(lm, rows), args.traces)
    remote = _remote_leak(lm, rows, args.traces // 5)
    cells = [
        ["Python heap per recorded node", f"{per_node:.0f} B"],
        ["peak RSS a 12-save trace adds over the forward", f"{peak:+d} KiB"],
        [f"RSS growth over {args.traces:,} local traces", _growth(local)],
        [f"RSS growth over {args.traces // 5:,} remote traces", _growth(remote)],
    ]
    common.print_table("memory", ["what", "measured"], cells, args.markdown)


def _growth(result: tuple[float, float, float]) -> str:
    start, grew, seconds = result
    return f"{grew * 1024:+.0f} KiB (from {start:.0f} MiB, {seconds:.0f} s)"


def _remote_leak(lm: lt.LanguageModel, rows: list, count: int) -> tuple[float, float, float]:
    """The same traces through a server in this process (``in_process``: no sockets)."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "server"))
    from lazytensor.frontend.served import in_process
    from lazytensor_server.registry import ServedModel
    from lazytensor_server.service import Service

    service = Service([ServedModel.wrap("bench", lm._module, lm.tokenizer)])
    client = in_process(service, timeout=60.0)
    named = lt.LanguageModel(lm._module, tokenizer=lm.tokenizer)
    object.__setattr__(named, "_name", "bench")  # what the server calls it

    def run() -> Any:
        with named.trace(rows, remote=client):
            kept = [layer.output.save() for layer in named.model.layers]
        return kept

    try:
        return leak(run, count)
    finally:
        service.shutdown(grace=5.0)


if __name__ == "__main__":
    main()
