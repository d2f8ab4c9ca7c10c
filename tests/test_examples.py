"""Every script in ``examples/`` and ``python -m lazytensor demo [--local]`` run as written.

Each runs as its own subprocess with this interpreter, from the repository root, with the hub
switched off. Most of a run's time is importing torch and transformers, so two run at a time
(the development machine has two cores; more at once only makes each one slower and risks the
time limit): the runs this session selected start in order when the first test needs one, and
each test then waits for its own. The time limit counts from a run's own start. Output goes to
per-run files in a temporary directory, never to shared paths.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
TIMEOUT_S = 300.0
PARALLEL = 2

COMMANDS = {name: ["examples/" + name] for name in EXAMPLES}
COMMANDS["demo"] = ["-m", "lazytensor", "demo", "--local"]
COMMANDS["demo-remote"] = ["-m", "lazytensor", "demo"]  # the main job: an embedded server

#: Text each run must print: the checks the scripts report on themselves.
EXPECTED = {
    "activation_patching.py": "logit difference = 0.00e+00",
    "attention_pattern.py": "patterns equal eager attention's: True",
    "logit_lens.py": "equals the model's prediction: True",
    "steering_generation.py": "spells the generated tokens: True",
    "sae_cache.py": "equals a forward hook on a full forward: True",
    "skip_and_edit.py": "skip equals a replacing hook: True",
    "demo": "forced top-5",
    "demo-remote": "remote equals local: True",
}


@dataclass
class Done:
    """How a run ended: its exit code (None: killed at the time limit) and its output."""

    code: int | None
    stdout: str
    stderr: str


class Runner:
    """Runs commands at most :data:`PARALLEL` at a time; kills what is left on :meth:`close`."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="example")
        self.running: set[subprocess.Popen] = set()
        self.closed = False
        self.lock = threading.Lock()

    def submit(self, name: str) -> Future[Done]:
        return self.pool.submit(self._run, name)

    def _run(self, name: str) -> Done:
        out, err = self.folder / f"{name}.out", self.folder / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr, self.lock:
            if self.closed:
                raise RuntimeError("the runner was closed before this run started")
            process = subprocess.Popen(
                [sys.executable, *COMMANDS[name]],
                cwd=ROOT,
                env=self.env,
                stdout=stdout,
                stderr=stderr,
            )
            self.running.add(process)
        try:
            code: int | None = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
        finally:
            with self.lock:
                self.running.discard(process)
        read = {"encoding": "utf-8", "errors": "replace"}
        return Done(code, out.read_text(**read), err.read_text(**read))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for process in self.running:
                process.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Done]]]:
    """Start the selected commands, in test order, two at a time; stop them at the end."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if isinstance(item, pytest.Function)  # not a doctest item
        and item.module is request.module
        and item.originalname == "test_runs_as_written"
    ]
    runner = Runner(tmp_path_factory.mktemp("examples"))
    try:
        yield {name: runner.submit(name) for name in selected}
    finally:
        runner.close()


def test_every_example_is_covered() -> None:
    assert {"read_activations.py", "neuron_forcing.py", "activation_patching.py"} <= set(EXAMPLES)
    assert {"logit_lens.py", "steering_generation.py"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_runs_as_written(runs: dict[str, Future[Done]], name: str) -> None:
    done = runs[name].result()  # each run is bounded by TIMEOUT_S from its own start
    command = " ".join(COMMANDS[name])
    assert done.code is not None, f"{command} did not finish within {TIMEOUT_S:.0f} s"
    assert done.code == 0, f"{name} exited with {done.code}:\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"{name} printed nothing:\n{done.stderr[-3000:]}"
    assert EXPECTED.get(name, "") in done.stdout, done.stdout
