"""Compiled replay: neuron forcing at batch 1, and generation, eager against ``compile=``.

The same experiment as ``bench_trace.py``'s (c), timed four ways, interleaved round by round
(:func:`common.measure`) on the same model object and inputs:

* ``forward``: the plain forward (``torch.no_grad``);
* ``hooks``: hand-written forward pre-hooks forcing the neurons, eager;
* ``eager trace``: the lazytensor trace, replayed by the executor;
* ``compiled trace``: the same trace with ``compile=<backend>`` (``inductor`` by default): the
  model and the interventions as one ``torch.compile``'d function; the first run of the
  structure records its schedule and the compile happens in the warm-up rounds.

And the same generation as ``bench_trace.py``'s (8 new tokens, an MLP's output halved at
every step), timed the same four ways: ``generate`` (plain), ``hooks generate`` (a hand-written
hook), ``eager generate`` (the lazytensor trace) and ``compiled generate`` (``compile=``: one
compiled function per kind of step, a static KV cache; see ``docs/architecture.md``).

With ``--server``, both experiments also run remote, against ``lazytensor serve --compile
<backend>`` started in its own process on loopback (worker processes, its defaults): ``remote
eager`` and ``remote compiled`` (``compile=<backend>``: the server compiles the run, or the
generation, in its worker process), next to the local hooks.

Each compiled result is checked against the eager trace's (``assert_close``). The target of
the speed issue is for a GPU (batch-1 neuron forcing on a 1B-class Llama in bf16 at ≥ 4× the
speed of hand-written eager hooks, with CUDA graphs); on a CPU the table reports the ratio.

Examples::

    python benchmarks/bench_compiled.py --size tiny
    python benchmarks/bench_compiled.py --size tiny --backend aot_eager --markdown
    python benchmarks/bench_compiled.py --size tiny --server     # also remote, compiled there
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import common
import torch
from common import FORCING, GENERATE, STEER_LAYER

import lazytensor as lt

LIB = "lazytensor"
SIZES = {
    "tiny": common.TINY[0],
    "small": common.Shape("llama", 12, 256, 4, 1, 16),
    "1b": common.LLAMA_1B,  # the GPU target's model, built in memory on the device
}


def forcing(
    lm: lt.LanguageModel,
    lay: common.Layout,
    rows: list,
    compile: Any,
    remote: Any = False,
    value: float = 5.0,
) -> Any:
    with lm.trace(rows, compile=compile, remote=remote):
        for layer, ids in FORCING.items():
            x = lm.get(f"{lay.layers}.{layer}.{lay.down_proj}").input
            x[:, -1, ids] = value
        out = lm.output.logits.save()
    return out


def agree(what: str, got: Any, want: Any, device: str, check: bool = True) -> None:
    """Compiled against eager: equal within ``assert_close``'s tolerances on a CPU (else an
    error); on a GPU, where the compiled kernels round differently, the relative error of the
    whole tensor and the share of equal elements are printed for the reader to judge (and
    with ``check=False``, on a CPU too)."""
    if check and not device.startswith("cuda"):
        torch.testing.assert_close(got, want)
        return
    g, w = got.double(), want.double()
    rel = (torch.linalg.vector_norm(g - w) / torch.linalg.vector_norm(w)).item()
    equal = (got == want).double().mean().item()
    print(f"{what}: relative error {rel:.2e}, {equal:.1%} of elements equal")


def generate(
    lm: lt.LanguageModel, lay: common.Layout, rows: list, compile: Any, remote: Any = False
) -> Any:
    with lm.generate(rows, compile=compile, remote=remote, **GENERATE) as tracer:
        with tracer.all():
            lm.get(f"{lay.layer(STEER_LAYER)}.{lay.mlp}").output[:] *= 0.5
        tokens = tracer.result.save()
    return tokens


def compile_seconds(run: Callable[[], Any]) -> float:
    """Run twice: the first run records the schedule, the second compiles."""
    start = time.perf_counter()
    run()
    run()
    return time.perf_counter() - start


def table(samples: dict, base: str, title: str, markdown: bool) -> float:
    """Print the cases' medians against ``base`` and the hooks (the second case); return the
    last case's speed over the hooks."""
    names = list(samples)
    hooks, first = common.median_ms(samples[names[1]]), common.median_ms(samples[base])
    cells = []
    for name, runs in samples.items():
        ms = common.median_ms(runs)
        cells.append([name, f"{ms:.3f}", f"{ms / first:.2f}", f"{hooks / ms:.2f}"])
    header = ["case", "median ms", f"× {base}", "speed × hooks"]
    common.print_table(title, header, cells, markdown)
    return hooks / common.median_ms(samples[names[-1]])


@dataclass
class Bench:
    """What both tables time on: the model, its inputs, the options."""

    label: str
    args: argparse.Namespace
    model: torch.nn.Module
    lm: lt.LanguageModel
    lay: common.Layout
    rows: list
    x: dict
    sync: Callable[[], None]
    clock: Callable[[], int]

    def forcing(self) -> dict[str, list[int]]:
        lm, lay, rows, x, backend = self.lm, self.lay, self.rows, self.x, self.args.backend
        model = self.model
        compile_s = compile_seconds(lambda: forcing(lm, lay, rows, backend))
        cases = {
            "forward": lambda: common.plain_forward(model, x),
            "hooks": lambda: common.hooks_neuron_forcing(model, lay, x),
            "eager trace": lambda: forcing(lm, lay, rows, False),
            "compiled trace": lambda: forcing(lm, lay, rows, backend),
        }
        repeats = self.args.repeats
        samples, first = common.measure(cases, repeats, 3, self.sync, self.clock)
        device = self.args.device
        agree("compiled trace vs eager", first["compiled trace"], first["eager trace"], device)
        agree("(the forcing's own effect: eager vs the plain forward)", first["forward"].logits,
              first["eager trace"], device, check=False)  # fmt: skip
        exact = {} if device.startswith("cuda") else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(first["hooks"].logits, first["eager trace"], **exact)
        self.constants()
        title = f"{self.label}, {repeats} rounds, backend {backend}, compile {compile_s:.1f} s"
        speed = table(samples, "forward", title, self.args.markdown)
        verdict = "met" if speed >= 4 else "missed"
        where = "GPU target" if self.args.device.startswith("cuda") else "GPU target, on a CPU"
        print(f"compiled trace at {speed:.2f}× the speed of eager hooks ({where} ≥ 4×): {verdict}")
        return samples

    def constants(self) -> None:
        """A new forced value reuses the compiled program (timed), and a result stays valid
        after the next run (CUDA graphs replay into the same output memory)."""
        lm, lay, rows, backend, device = (
            self.lm,
            self.lay,
            self.rows,
            self.args.backend,
            self.args.device,
        )
        start = time.perf_counter()
        results = {v: forcing(lm, lay, rows, backend, value=v) for v in (-3.0, 11.0)}
        self.sync()
        ms = (time.perf_counter() - start) * 1e3 / 2
        print(f"two new forced values, compiled: {ms:.2f} ms a run (a recompile takes seconds)")
        for v, got in results.items():
            agree(
                f"forced to {v}, kept across runs",
                got,
                forcing(lm, lay, rows, False, value=v),
                device,
            )
        if torch.equal(results[-3.0], results[11.0]):
            raise AssertionError("runs with different forced values gave the same logits")

    def generation(self, pad: int) -> dict[str, list[int]]:
        lm, lay, rows, x, backend = self.lm, self.lay, self.rows, self.x, self.args.backend
        model = self.model
        compile_s = compile_seconds(lambda: generate(lm, lay, rows, backend))
        cases = {
            "generate": lambda: common.plain_generate(model, x, pad),
            "hooks generate": lambda: common.hooks_generate(model, lay, x, pad),
            "eager generate": lambda: generate(lm, lay, rows, False),
            "compiled generate": lambda: generate(lm, lay, rows, backend),
        }
        rounds = max(3, self.args.repeats // 5)  # a generation is several forwards
        samples, first = common.measure(cases, rounds, 2, self.sync, self.clock)
        device = self.args.device
        agree(
            "compiled generate vs eager",
            first["compiled generate"],
            first["eager generate"],
            device,
        )
        agree("hooks generate vs eager", first["hooks generate"], first["eager generate"], device)
        title = (
            f"{self.label}, {GENERATE['max_new_tokens']} new tokens, MLP halved at every step, "
            f"{rounds} rounds, backend {backend}, compile {compile_s:.1f} s"
        )
        speed = table(samples, "generate", title, self.args.markdown)
        print(f"compiled generate at {speed:.2f}× the speed of eager hooks")
        return samples

    def remote(self, endpoint: str, name: str, pad: int) -> dict[str, list[int]]:
        """Both experiments remote, eager and compiled on the server, beside the local hooks."""
        lay, rows, backend, model, x = self.lay, self.rows, self.args.backend, self.model, self.x
        client = lt.connect(endpoint, timeout=600.0)
        served = self.lm  # loaded from the directory the server serves, named by its path
        if served._name != name:
            raise RuntimeError(f"the model is named {served._name!r}, the server's {name!r}")
        try:
            compile_s = compile_seconds(lambda: forcing(served, lay, rows, backend, client))
            compile_s += compile_seconds(lambda: generate(served, lay, rows, backend, client))
            cases = {
                "hooks": lambda: common.hooks_neuron_forcing(model, lay, x),
                "remote eager trace": lambda: forcing(served, lay, rows, False, client),
                "remote compiled trace": lambda: forcing(served, lay, rows, backend, client),
                "hooks generate": lambda: common.hooks_generate(model, lay, x, pad),
                "remote eager generate": lambda: generate(served, lay, rows, False, client),
                "remote compiled generate": lambda: generate(served, lay, rows, backend, client),
            }
            rounds = max(3, self.args.repeats // 5)
            samples, first = common.measure(cases, rounds, 2, self.sync, self.clock)
        finally:
            client.close()
        for kind in ("trace", "generate"):
            got, want = first[f"remote compiled {kind}"], first[f"remote eager {kind}"]
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(first["remote eager generate"], first["hooks generate"])
        title = (f"{self.label}, remote (lazytensor serve --compile {backend}, its own process), "
                 f"{rounds} rounds, compile on the server {compile_s:.1f} s")  # fmt: skip
        for kind, hooks in (("trace", "hooks"), ("generate", "hooks generate")):
            eager, compiled = f"remote eager {kind}", f"remote compiled {kind}"
            part = {eager: samples[eager], hooks: samples[hooks], compiled: samples[compiled]}
            speed = table(part, hooks, f"{title}: {kind}", self.args.markdown)
            print(f"{compiled} at {speed:.2f}× the speed of local eager hooks")
        return samples


@contextlib.contextmanager
def serving(path: str, backend: str, threads: int) -> Iterator[str]:
    """``lazytensor serve PATH --compile BACKEND`` in its own process on a free loopback port,
    with ``threads`` torch threads; yields its endpoint once it serves."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "lazytensor", "serve", path, "--name", path, "--port", "0",
               "--compile", backend]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while True:
                log.seek(0)
                bound = re.search(r"serving .* on (tcp://\S+)\n", log.read())
                if bound is not None:
                    break
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start:\n{log.read()}")
                time.sleep(0.1)
            yield bound.group(1)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument(
        "--server", action="store_true", help="also remote: a `lazytensor serve --compile` process"
    )
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
    sync, clock = common.synchronizer(args.device), common.CLOCKS[args.clock]
    args.repeats = args.repeats or 50
    bench = Bench(shape.label, args, model, lm, lay, rows, x, sync, clock)
    samples = {**bench.forcing(), **bench.generation(tokenizer.pad_token_id)}
    if args.server:
        if shape.config:
            raise SystemExit("--server serves a model from disk: not the in-memory --size 1b")
        path = str(common.model_dir(shape))
        with serving(path, args.backend, torch.get_num_threads()) as endpoint:
            samples.update(bench.remote(endpoint, path, tokenizer.pad_token_id))
    if args.json:
        common.write_json(args.json, {"machine": info, "args": vars(args), "samples_ns": samples})


if __name__ == "__main__":
    main()
