"""Benchmark harness shared by ``bench_trace.py`` and ``bench_nnsight.py``.

A benchmark compares one library's traces with the *same* interventions written by hand with
``register_forward_hook``/``register_forward_pre_hook``, on the same model object and the same
input tensors, measured in the same process. This module holds everything both scripts need
so that their numbers mean the same thing:

* the models (random-weight ``lazytensor.tiny`` models, built once into a cache directory) and
  their deterministic token inputs;
* the hand-written hook references, one per experiment (:data:`HOOKS`);
* the timer: interleaved rounds (every case once per round, so slow drift of the machine hits
  all cases alike), warm-up first, ``time.perf_counter_ns``, CUDA synchronized around each run;
* the result rows and their tables (rich on the terminal, markdown for the docs) and JSON.

It imports neither lazytensor's tracing API nor nnsight: each script brings its own library.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

#: Experiments in table order, with the label the tables print.
EXPERIMENTS = {
    "one_save": "(a) one save",
    "saves_12": "(b) 12 saves",
    "neuron_forcing": "(c) neuron forcing",
    "patching": "(d) patching, 2 invokes",
    "ops_100": "(e) 100 small ops",
    "ops_1000": "(f) 1,000 small ops",
    "ops_5000": "(g) 5,000 small ops",
    "generate": "generate 8 tok, per-step edit",
}
SAVE_LAYER = 5  # (a): the layer whose output is saved
OPS_LAYER = 5  # (e): the layer whose output the chain of small ops starts from
PATCH_LAYER = 2  # (d): the layer patched across invokes
FORCING = {1: [7, 25], 3: [94]}  # (c): layer -> neurons of down_proj's input forced to 5.0
STEER_LAYER = 1  # generation: the MLP whose output is halved at every step
GENERATE = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
PER_OP_OPS = 1000  # recorded ops in the per-op measurement (the (f) rows)
LONG_OPS = 5000  # the (g) rows


# -- models and inputs -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    """One model configuration and input shape to benchmark."""

    arch: str  # "llama" | "gpt2"
    layers: int
    hidden: int
    heads: int
    batch: int
    seq: int
    #: Extra config fields (pairs); a shape with any is built in memory on the device, not on
    #: disk (a 1B model's random weights are quicker to draw there than to write and read).
    config: tuple = ()

    @property
    def label(self) -> str:
        name = "Llama-3.2-1B-shaped" if self.config else self.arch
        return f"{name} L={self.layers} d={self.hidden}, batch {self.batch} x seq {self.seq}"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the benchmarked modules live in one architecture's module tree."""

    layers: str  # the ModuleList of transformer blocks
    down_proj: str  # the MLP's output projection, relative to a block
    mlp: str  # the MLP, relative to a block

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"


LAYOUTS = {
    "llama": Layout("model.layers", "mlp.down_proj", "mlp"),
    "gpt2": Layout("transformer.h", "mlp.c_proj", "mlp"),
}

TINY = [Shape("llama", 12, 64, 4, 1, 16)]
MEDIUM = [
    Shape(arch, 12, hidden, heads, batch, seq)
    for arch, hidden, heads in (("gpt2", 768, 12), ("llama", 512, 8))
    for batch in (1, 8)
    for seq in (32, 128)
]
#: The GPU target's model: Llama-3.2-1B's widths (grouped-query attention, a 128k vocabulary,
#: tied embeddings), random weights, at batch 1.
LLAMA_1B = Shape(
    "llama", 16, 2048, 32, 1, 16,
    config=(("intermediate_size", 8192), ("num_key_value_heads", 8), ("vocab_size", 128256),
            ("tie_word_embeddings", True), ("rope_theta", 500000.0),
            ("max_position_embeddings", 2048)),
)  # fmt: skip


def model_dir(shape: Shape) -> pathlib.Path:
    """Build (once, cached across runs) the random-weight model for ``shape``; its directory."""
    from lazytensor.tiny import build_tiny_lm

    root = pathlib.Path(os.environ.get("LAZYTENSOR_BENCH_CACHE", tempfile.gettempdir()))
    path = root / f"lazytensor-bench-{shape.arch}-{shape.layers}x{shape.hidden}h{shape.heads}"
    if not (path / "config.json").exists():
        build_tiny_lm(path, shape.arch, layers=shape.layers, hidden=shape.hidden, heads=shape.heads)
    return path


def load(shape: Shape, device: str, dtype: str) -> tuple[torch.nn.Module, Any]:
    """The Hugging Face model (eval mode, on ``device`` in ``dtype``) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    if shape.config:
        return _in_memory(shape, device, dtype)
    path = model_dir(shape)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def _in_memory(shape: Shape, device: str, dtype: str) -> tuple[torch.nn.Module, Any]:
    """A random-weight model of ``shape`` drawn on ``device``, with the tiny tokenizer (the
    benchmarks' token ids are below 500, and only its special ids are read)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lazytensor.tiny import build_tokenizer

    root = pathlib.Path(os.environ.get("LAZYTENSOR_BENCH_CACHE", tempfile.gettempdir()))
    path = root / "lazytensor-bench-tokenizer"
    if not (path / "tokenizer.json").exists():
        build_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    special = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    config = LlamaConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, **dict(shape.config), **special,
    )  # fmt: skip
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    for name, value in special.items():
        setattr(model.generation_config, name, value)
    return model.eval(), tokenizer


def token_rows(shape: Shape, seed: int) -> list[list[int]]:
    """``batch`` rows of ``seq`` random token ids, none of them the special (pad) token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 500, (shape.batch, shape.seq), generator=gen)  # (B, T)
    return ids.tolist()


def model_inputs(rows: list[list[int]], device: str) -> dict[str, torch.Tensor]:
    """What a trace passes to the model for unpadded rows: ``input_ids`` and an all-ones mask."""
    ids = torch.tensor(rows, device=device)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def forcing_rows(batch: int) -> slice:
    """Rows of experiment (c): ``3:`` as in the issue, ``1:``/``0:`` when the batch is smaller."""
    return slice(3 if batch >= 4 else 1 if batch >= 2 else 0, None)


# -- the hand-written references ---------------------------------------------------------------
class _Hooks:
    """Register hooks for one run and remove them afterwards, even on error."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.handles = model, []

    def post(self, path: str, fn: Callable) -> None:
        self.handles.append(self.model.get_submodule(path).register_forward_hook(fn))

    def pre(self, path: str, fn: Callable) -> None:
        self.handles.append(self.model.get_submodule(path).register_forward_pre_hook(fn))

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def plain_forward(model: torch.nn.Module, inputs: dict) -> Any:
    with torch.no_grad():
        return model(**inputs)


def hooks_one_save(model: torch.nn.Module, lay: Layout, inputs: dict) -> Any:
    saved = []
    with _Hooks(model) as hooks, torch.no_grad():
        hooks.post(lay.layer(SAVE_LAYER), lambda m, a, out: saved.append(out))
        model(**inputs)
    return saved[0]


def hooks_saves_12(model: torch.nn.Module, lay: Layout, inputs: dict) -> Any:
    saved = []
    with _Hooks(model) as hooks, torch.no_grad():
        for i in range(12):
            hooks.post(lay.layer(i), lambda m, a, out: saved.append(out))
        model(**inputs)
    return saved


def hooks_neuron_forcing(model: torch.nn.Module, lay: Layout, inputs: dict) -> Any:
    rows = forcing_rows(inputs["input_ids"].shape[0])

    def force(ids: list[int]) -> Callable:
        def hook(module, args):
            args[0][rows, -1, ids] = 5.0  # in place, as the trace does

        return hook

    with _Hooks(model) as hooks, torch.no_grad():
        for layer, ids in FORCING.items():
            hooks.pre(f"{lay.layer(layer)}.{lay.down_proj}", force(ids))
        return model(**inputs)


def hooks_patching(model: torch.nn.Module, lay: Layout, inputs: dict) -> Any:
    """``inputs`` holds the clean rows, then as many corrupted rows (one batched forward)."""
    half = inputs["input_ids"].shape[0] // 2
    saved = []

    def patch(module, args, out):
        out[half:, -1] = out[:half, -1]  # (B, D) <- (B, D)

    with _Hooks(model) as hooks, torch.no_grad():
        hooks.post(lay.layer(PATCH_LAYER), patch)
        hooks.post("lm_head", lambda m, a, out: saved.append(out[half:, -1]))
        model(**inputs)
    return saved[0]


def hooks_ops(model: torch.nn.Module, lay: Layout, inputs: dict, n: int = 100) -> Any:
    saved = []

    def chain(module, args, out):
        h = out
        for _ in range(n // 2):
            h = h * 1.0001 + 0.0
        saved.append(h)

    with _Hooks(model) as hooks, torch.no_grad():
        hooks.post(lay.layer(OPS_LAYER), chain)
        model(**inputs)
    return saved[0]


def plain_generate(model: torch.nn.Module, inputs: dict, pad: int) -> Any:
    return model.generate(**inputs, pad_token_id=pad, **GENERATE)


def hooks_generate(model: torch.nn.Module, lay: Layout, inputs: dict, pad: int) -> Any:
    def steer(module, args, out):
        out[:] *= 0.5

    with _Hooks(model) as hooks:
        hooks.post(f"{lay.layer(STEER_LAYER)}.{lay.mlp}", steer)
        return model.generate(**inputs, pad_token_id=pad, **GENERATE)


# -- timing ------------------------------------------------------------------------------------
def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading a timer: waits for queued CUDA work, if any."""
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


#: ``--clock`` choices: wall time, or this process's CPU time. CPU time leaves out the time
#: the process waits for a core, so it stays usable on a machine shared with other jobs; it
#: is meaningful only on CPU with one torch thread (a GPU's work is not CPU time).
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}


def measure(
    cases: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    sync: Callable[[], None],
    clock: Callable[[], int] = time.perf_counter_ns,
    shuffle: random.Random | None = None,
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Time each case: ``warmup`` untimed rounds, then ``repeats`` timed rounds.

    Each round runs every case once, so the cases share the machine's drift: in order, or in
    an order drawn from ``shuffle`` each round, so that no case always follows the same one
    (what the one before leaves in the caches, or a slow phase starting mid-round, hits every
    case alike). Shuffled, the cases of one experiment (``hooks:x``, ``<library>:x``, with any
    ``<library>/`` prefix; all ``ops_<n>`` count as one) run next to each other, so that
    :func:`paired_us` compares runs a few milliseconds apart.

    Returns:
        Nanoseconds per run of each case, and each case's result from the first round (for
        :func:`check`, so that checking costs no extra runs of a slow model).
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[int]] = {name: [] for name in cases}
    first: dict[str, Any] = {}
    groups: dict[str, list[tuple[str, Callable[[], Any]]]] = {}
    for name, fn in cases.items():
        groups.setdefault(_experiment(name), []).append((name, fn))
    order = list(cases.items())
    for _ in range(repeats):
        if shuffle is not None:
            batches = list(groups.values())
            shuffle.shuffle(batches)
            for batch in batches:
                shuffle.shuffle(batch)
            order = [case for batch in batches for case in batch]
        for name, fn in order:
            sync()
            start = clock()
            result = fn()
            sync()
            samples[name].append(clock() - start)
            first.setdefault(name, result)
    return samples, first


def _experiment(name: str) -> str:
    """The experiment a case of :func:`measure` belongs to: ``lazytensor/hooks:ops_100`` ->
    ``ops``, ``nnsight:patching`` -> ``patching``, ``forward`` -> ``forward``."""
    exp = name.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return "ops" if exp.startswith("ops_") else exp


def median_ms(samples: list[int]) -> float:
    return statistics.median(samples) / 1e6


def paired_us(mine: list[int], theirs: list[int]) -> float:
    """The median over rounds of ``mine - theirs`` in µs, each difference taken within one round
    of :func:`measure`. On a machine whose speed drifts (this VM's runs slow down about 2x for
    minutes at a time) it is far steadier than a difference of two medians, which can put one
    median in a fast phase and the other in a slow one."""
    return statistics.median(a - b for a, b in zip(mine, theirs, strict=True)) / 1e3


def per_op_us(samples: dict[str, list[int]], who: str) -> float:
    """Microseconds per small op: (trace with ``PER_OP_OPS`` ops − trace with none) / ops."""
    ms = median_ms(samples[f"{who}:ops_1000"]) - median_ms(samples[f"{who}:ops_0"])
    return ms * 1e3 / PER_OP_OPS


def added_per_op_us(samples: dict[str, list[int]], library: str) -> float:
    """µs the library adds per small op over the same op eager in a hook, paired by round:
    the median of ((library with ops − without) − (hooks with ops − without)) / ops."""
    lib, hooks = (
        [a - b for a, b in zip(samples[f"{who}:ops_1000"], samples[f"{who}:ops_0"], strict=True)]
        for who in (library, "hooks")
    )
    return paired_us(lib, hooks) / PER_OP_OPS


def check(results: dict[str, Any], library: str, exact: bool = True) -> None:
    """Every ``<library>:<exp>`` result equals its ``hooks:<exp>`` reference.

    Both ran the same ops on the same tensors in the same order, so on a CPU they agree to the
    bit (``exact``); a GPU may pick different kernels for the two runs, so there the usual
    tolerances of the dtype apply.
    """
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    for name, value in results.items():
        exp = name.split(":", 1)[1] if name.startswith(f"{library}:") else None
        if exp is not None and f"hooks:{exp}" in results:
            try:
                torch.testing.assert_close(value, results[f"hooks:{exp}"], **tolerance)
            except AssertionError as exc:
                raise AssertionError(f"{name} differs from its hook reference: {exc}") from None


def add_arguments(parser: Any, default_repeats: str) -> None:
    """The options both benchmark scripts take."""
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--repeats", type=int, default=0, help=f"timed rounds ({default_repeats})")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, see docs/benchmarks.md; 0 = torch's default)",
    )
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="see CLOCKS")
    parser.add_argument("--json", metavar="PATH", help="write raw samples and medians here")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")


def setup(args: Any) -> None:
    """Apply the shared options: torch threads and a fixed seed."""
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        raise SystemExit("--clock cpu measures only CPU runs with --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


# -- results -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One experiment on one shape: medians of the forward, the hooks and the library."""

    case: str
    forward_ms: float
    hooks_ms: float
    library_ms: float
    #: :func:`paired_us` of the library's runs and the hooks' (``None``: not measured so).
    paired_added_us: float | None = None

    @property
    def added_us(self) -> float:
        if self.paired_added_us is not None:
            return self.paired_added_us
        return (self.library_ms - self.hooks_ms) * 1e3

    @property
    def x_hooks(self) -> float:
        return self.library_ms / self.hooks_ms

    @property
    def x_forward(self) -> float:
        return self.library_ms / self.forward_ms


def rows_from(samples: dict[str, list[int]], library: str, forward_of: dict[str, str]) -> list[Row]:
    """Rows for every experiment measured as ``hooks:<exp>`` and ``<library>:<exp>``; the
    added µs are paired by round (:func:`paired_us`), the other columns are medians."""
    rows = []
    for exp, label in EXPERIMENTS.items():
        if f"{library}:{exp}" not in samples:
            continue
        rows.append(
            Row(
                label,
                median_ms(samples[forward_of.get(exp, "forward")]),
                median_ms(samples[f"hooks:{exp}"]),
                median_ms(samples[f"{library}:{exp}"]),
                paired_us(samples[f"{library}:{exp}"], samples[f"hooks:{exp}"]),
            )
        )
    return rows


COLUMNS = ("case", "forward ms", "hooks ms", "{lib} ms", "added µs", "× hooks", "× forward")


def row_cells(row: Row) -> list[str]:
    return [
        row.case,
        f"{row.forward_ms:.3f}",
        f"{row.hooks_ms:.3f}",
        f"{row.library_ms:.3f}",
        f"{row.added_us:+.0f}",
        f"{row.x_hooks:.3f}",
        f"{row.x_forward:.2f}",
    ]


def print_table(title: str, header: list[str], cells: list[list[str]], markdown: bool) -> None:
    """A rich table on the terminal, or a markdown table (for ``docs/benchmarks.md``)."""
    if markdown:
        print(f"\n**{title}**\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|")
        for line in cells:
            print("| " + " | ".join(line) + " |")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for line in cells:
        table.add_row(*line)
    Console(width=max(Console().width, 120)).print(table)


def machine(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def write_json(path: str, payload: dict[str, Any]) -> None:
    pathlib.Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def markdown_table(title: str, rows: list[dict]) -> str:
    """``rows`` (dicts with the same keys) as a Markdown table under ``title``; "" if none."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.rjust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([f"\n{title}\n", line, rule, *body])


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
