"""Many users, one server: requests per second and latency as concurrent users are added.

Starts ``lazytensor serve`` serving the tiny llama of :func:`lazytensor.tiny.cached_tiny_lm`
in its own process on ``127.0.0.1``, then runs ``N`` users at once (1, 4, 16, 64 by default)
for a fixed time. Each user is a thread of this process with its own connection
(``lt.connect``), looping its own trace: it forces one neuron of its own (user ``i`` sets
neuron ``i`` of layer 1's MLP) and saves the last position's logits, on the same prompt, so
the server may run waiting users' traces as one forward pass (:mod:`lazytensor_server.batching`).

Each number of users runs on three servers: with batching and worker processes (the defaults),
with ``--max-batch-jobs 1`` (every request runs alone), and with ``--workers thread`` (jobs
on a thread of the server's process). ``--restart`` also times a job stopped past
``--max-seconds`` inside one op (its worker process is killed) and the request after it.
The table gives requests per second, the ratio to the same server's one-user rate, p50 and
p99 latency over every request of every user, and how many requests shared a forward pass on
average (from the server's log). The
target: with batching, 16 users get at least 6x the one-user requests per second.

Usage::

    python benchmarks/bench_serve.py                              # 1,4,16,64 users, 3 s each
    python benchmarks/bench_serve.py --users 1,16 --duration 5 --json out.json

The table goes to stdout in Markdown; ``docs/benchmarks.md`` ("Many users, one server")
holds a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from common import markdown_table

import lazytensor as lt
from lazytensor.tiny import cached_tiny_lm

PROMPT = "The Eiffel Tower is in"
TARGET_USERS, TARGET_RATIO = 16, 6.0
CLIENT_TIMEOUT = 120.0  # seconds; a request that never answers fails the run instead of hanging
SERVING = re.compile(r"serving .* on (tcp://\S+)\r?\n")
FORWARD = re.compile(r"ran (\d+) requests in one forward")


def user_trace(lm: lt.LanguageModel, remote: Any, user: int) -> torch.Tensor:
    """One user's trace: force its own neuron, save the last position's logits (1, vocab)."""
    with lm.trace(PROMPT, remote=remote):
        lm.model.layers[1].mlp.down_proj.input[:, -1, [user % 64]] = 5.0  # (1, T, neurons)
        logits = lm.output.logits[:, -1].save()
    return logits


@contextlib.contextmanager
def server(path: str, log_path: str, threads: int, *extra: str) -> Iterator[str]:
    """``lazytensor serve`` in its own process (``threads`` torch threads: 0, torch's
    default); yields its endpoint; SIGTERM when done."""
    command = [sys.executable, "-m", "lazytensor", "serve", path, "--name", "llama", "--port", "0"]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*command, *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while (bound := SERVING.search(_read(log_path))) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start:\n{_read(log_path)}")
                time.sleep(0.05)
            yield bound.group(1)
        finally:
            proc.send_signal(signal.SIGTERM)
            if proc.wait(60) != 0:
                print(f"server exited with {proc.returncode}:\n{_read(log_path)}", file=sys.stderr)


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def run_users(lm, endpoint: str, users: int, duration: float) -> dict[str, float]:
    """``users`` threads loop their traces for ``duration`` s; rate and latency of all."""
    clients = [lt.connect(endpoint, timeout=CLIENT_TIMEOUT) for _ in range(users)]
    latencies: list[list[float]] = [[] for _ in range(users)]
    start_line = threading.Barrier(users + 1)
    failures: list[BaseException] = []
    stop_at = [float("inf")]

    def work(i: int) -> None:
        try:
            user_trace(lm, clients[i], i)  # warm this client's socket
            start_line.wait()
            while time.perf_counter() < stop_at[0]:
                start = time.perf_counter()
                user_trace(lm, clients[i], i)
                latencies[i].append(time.perf_counter() - start)
        except BaseException as exc:  # reported below, after the threads end
            failures.append(exc)
            start_line.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(users)]
    for thread in threads:
        thread.start()
    start_line.wait()
    began = time.perf_counter()
    stop_at[0] = began + duration
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for client in clients:
        client.close()
    if failures:
        raise RuntimeError(f"a user failed: {failures[0]!r}")
    done = sorted(t for per_user in latencies for t in per_user)
    return {
        "rps": len(done) / elapsed,
        "p50_ms": statistics.median(done) * 1e3,
        "p99_ms": done[min(len(done) - 1, int(0.99 * len(done)))] * 1e3,
        "slowest_user_rps": min(len(t) for t in latencies) / elapsed,
    }


def check_results(lm, endpoint: str) -> None:
    """Before timing: users' results on this server equal the same traces run locally."""
    got: dict[int, torch.Tensor] = {}

    def one(i: int) -> None:
        client = lt.connect(endpoint, timeout=CLIENT_TIMEOUT)
        try:
            got[i] = user_trace(lm, client, i)
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8, "a user failed"
    for i, logits in got.items():
        torch.testing.assert_close(logits, user_trace(lm, False, i))


def bench(lm, path: str, args) -> list[dict]:
    rows = []
    modes = (
        ("batched", ()),
        ("alone", ("--max-batch-jobs", "1")),
        ("threads", ("--workers", "thread")),
    )
    for mode, extra in modes:
        if mode not in args.modes:
            continue
        log_path = os.path.join(tempfile.gettempdir(), f"bench_serve_{mode}.log")
        with server(path, log_path, args.server_threads, *extra) as endpoint:
            check_results(lm, endpoint)
            base = None
            for users in args.users:
                before = len(FORWARD.findall(_read(log_path)))
                sizes_before = sum(map(int, FORWARD.findall(_read(log_path))))
                measured = run_users(lm, endpoint, users, args.duration)
                log = _read(log_path)
                merged = FORWARD.findall(log)[before:]
                requests = measured["rps"] * args.duration
                together = sum(map(int, FORWARD.findall(log))) - sizes_before
                forwards = len(merged) + max(0.0, requests - together)  # the rest ran alone
                base = base or measured["rps"]
                rows.append(
                    {
                        "server": mode,
                        "users": users,
                        "req_per_s": measured["rps"],
                        "x_1_user": measured["rps"] / base,
                        "p50_ms": measured["p50_ms"],
                        "p99_ms": measured["p99_ms"],
                        "req_per_forward": requests / forwards if forwards else 1.0,
                    }
                )
                print(markdown_table("", rows[-1:]).splitlines()[-1], flush=True)
    return rows


def restart(lm, path: str, args) -> list[dict]:
    """What a stopped job costs: a request that overruns ``--max-seconds 1`` inside one op
    (its worker process is killed), then the next user's request, which waits for the fresh
    worker process; against the same request on a warm server."""
    log_path = os.path.join(tempfile.gettempdir(), "bench_serve_restart.log")
    rows = []
    with server(path, log_path, args.server_threads, "--max-seconds", "1") as endpoint:
        client = lt.connect(endpoint, timeout=CLIENT_TIMEOUT)
        try:
            user_trace(lm, client, 0)
            for _ in range(3):
                start = time.perf_counter()
                user_trace(lm, client, 0)
                warm = time.perf_counter() - start
                start = time.perf_counter()
                try:
                    with lm.trace(PROMPT, remote=client):
                        big = torch.ones(8192, 8192)
                        (big @ big).sum().save()  # one op of many seconds
                except TimeoutError:
                    pass
                stopped = time.perf_counter() - start
                start = time.perf_counter()
                user_trace(lm, client, 0)
                after = time.perf_counter() - start
                row = {"max_seconds": 1.0, "overrun_request_s": stopped}
                rows.append({**row, "next_request_ms": after * 1e3, "warm_request_ms": warm * 1e3})
        finally:
            client.close()
    return rows


def summary(rows: list[dict]) -> str:
    batched = {r["users"]: r for r in rows if r["server"] == "batched"}
    if TARGET_USERS not in batched:
        return f"summary: no batched run at {TARGET_USERS} users"
    ratio = batched[TARGET_USERS]["x_1_user"]
    verdict = "met" if ratio >= TARGET_RATIO else "missed"
    return (
        f"summary: {TARGET_USERS} users get {ratio:.1f}x the one-user requests/s with batching, "
        f"target >= {TARGET_RATIO:g}x: {verdict}"
    )


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the users' side records and decodes; the server gets the cores
    torch.manual_seed(0)
    path = str(cached_tiny_lm("llama"))
    lm = lt.LanguageModel(path)
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, python {m['python']}")
    rows = bench(lm, path, args) if args.modes else []
    if rows:
        print(markdown_table(f"Many users, one server ({args.duration:g} s per point)", rows))
        print("\n" + summary(rows))
    restarts = restart(lm, path, args) if args.restart else []
    if restarts:
        print(
            markdown_table("A job stopped past its time limit, and the request after it", restarts)
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": m, "args": vars(args), "rows": rows, "restarts": restarts},
                      out, indent=2)  # fmt: skip
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=_ints, default=[1, 4, 16, 64], help="e.g. 1,4,16,64")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per point")
    parser.add_argument(
        "--modes", type=_names, default=["batched", "alone", "threads"],
        help="servers to measure: batched (default flags: worker processes), alone "
        "(--max-batch-jobs 1), threads (--workers thread); '' for none",
    )  # fmt: skip
    parser.add_argument(
        "--restart", action="store_true",
        help="also time a job stopped past --max-seconds and the request after it",
    )  # fmt: skip
    parser.add_argument(
        "--server-threads", type=int, default=1,
        help="torch threads of the server process (OMP_NUM_THREADS; 0: torch's default). On a "
        "small shared machine one thread is fastest: idle spinning threads fight the users",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def _names(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


if __name__ == "__main__":
    sys.exit(main())
