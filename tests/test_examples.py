"""Every script in ``examples/`` and ``python -m lazytensor demo [--local]`` run as written.

Each runs as its own subprocess with this interpreter, from the repository root, with the hub
switched off. Most of a run's time is importing torch and transformers, so all of them are
started at once when the first test needs one, and each test then waits for its own, with a
time limit. Output goes to per-run files in a temporary directory, never to shared paths.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
TIMEOUT_S = 300.0

COMMANDS = {name: ["examples/" + name] for name in EXAMPLES}
COMMANDS["demo"] = ["-m", "lazytensor", "demo", "--local"]
COMMANDS["demo-remote"] = ["-m", "lazytensor", "demo"]  # the main job: an embedded server

#: Text each run must print: the checks the scripts report on themselves.
EXPECTED = {
    "activation_patching.py": "logit difference = 0.00e+00",
    "logit_lens.py": "equals the model's prediction: True",
    "steering_generation.py": "spells the generated tokens: True",
    "demo": "forced top-5",
    "demo-remote": "remote equals local: True",
}


@dataclass
class Run:
    process: subprocess.Popen
    stdout: pathlib.Path
    stderr: pathlib.Path
    started: float


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Start every command at once; stop any that are still running at the end."""
    folder = tmp_path_factory.mktemp("examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    started: dict[str, Run] = {}
    try:
        for name, args in COMMANDS.items():
            out, err = folder / f"{name}.out", folder / f"{name}.err"
            with out.open("wb") as stdout, err.open("wb") as stderr:
                process = subprocess.Popen(
                    [sys.executable, *args], cwd=ROOT, env=env, stdout=stdout, stderr=stderr
                )
            started[name] = Run(process, out, err, time.monotonic())
        yield started
    finally:
        for run in started.values():
            if run.process.poll() is None:
                run.process.kill()
            run.process.wait()


def test_every_example_is_covered() -> None:
    assert {"read_activations.py", "neuron_forcing.py", "activation_patching.py"} <= set(EXAMPLES)
    assert {"logit_lens.py", "steering_generation.py"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_runs_as_written(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    left = TIMEOUT_S - (time.monotonic() - run.started)
    try:
        code = run.process.wait(timeout=max(left, 1.0))
    except subprocess.TimeoutExpired:
        run.process.kill()
        run.process.wait()
        pytest.fail(f"{' '.join(COMMANDS[name])} did not finish within {TIMEOUT_S:.0f} s")
    stdout = run.stdout.read_text(encoding="utf-8", errors="replace")
    stderr = run.stderr.read_text(encoding="utf-8", errors="replace")
    assert code == 0, f"{name} exited with {code}:\n{stderr[-3000:]}"
    assert stdout.strip(), f"{name} printed nothing:\n{stderr[-3000:]}"
    assert EXPECTED.get(name, "") in stdout, stdout
