"""Remote execution on loopback: added latency, transfer rate, requests per second.

Runs a real ZeroMQ server on ``127.0.0.1`` serving the tiny llama of
:func:`lazytensor.tiny.cached_tiny_lm`, in one or both of two placements:

* ``process``: a separate server process (this script with ``--serve``), so client and server
  do not share a GIL. This is how a real server runs; the summary uses it.
* ``thread``: :class:`~lazytensor_server.service.Service` behind an
  :class:`~lazytensor_server.app.App` on a thread of this process (as ``lazytensor demo`` and
  the tests do); client and server compete for one GIL.

It measures, each as the median of repeated runs in this process:

* ``latency``: a trace with one save, remote minus the same trace run locally (target < 2 ms);
  also the round trip of a bare ``models`` request, the floor of any request;
* ``transfer``: saving one large tensor built in the trace (``torch.zeros(n) + logit``), GB/s
  of payload end to end, and net of the same trace run locally (target > 1 GB/s);
* ``codec``: :func:`lazytensor.protocol.codec.encode` and
  :func:`~lazytensor.protocol.codec.decode` of a result message alone, next to what the
  machine gives: ``clone`` (a copy into fresh memory, as decode makes) and the same bytes
  through a bare ZeroMQ PUSH/PULL pair on loopback;
* ``rps``: requests per second with 1, 4 and 16 threads, each with its own
  ``lt.connect(endpoint)`` client, each running the one-save trace in a loop.

Usage::

    python benchmarks/bench_remote.py                     # both placements, default sizes
    python benchmarks/bench_remote.py --server process --repeats 30 --json out.json
    python benchmarks/bench_remote.py --profile           # then cProfile client and server

The tables go to stdout in Markdown; ``docs/protocol.md`` ("Measured on loopback") holds a run.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import lazytensor as lt
from lazytensor.protocol import codec as wire
from lazytensor.tiny import cached_tiny_lm

PROMPT = "The Eiffel Tower is in"
TARGET_LATENCY_MS = 2.0
TARGET_GBPS = 1.0
MIB = 2**20
CLIENT_TIMEOUT = 120.0  # seconds; a request that never answers fails the run instead of hanging


# -- timing ---------------------------------------------------------------------------------
def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_save(lm: lt.LanguageModel, remote: Any) -> torch.Tensor:
    """The small trace: one save of the logits (1, T, vocab)."""
    with lm.trace(PROMPT, remote=remote):
        logits = lm.output.logits.save()
    return logits


def big_save(lm: lt.LanguageModel, remote: Any, numel: int) -> torch.Tensor:
    """A trace that saves one float32 tensor of ``numel`` elements, built on the server."""
    with lm.trace(PROMPT, remote=remote):
        big = (torch.zeros(numel) + lm.output.logits[0, -1, 0]).save()  # (numel,)
    return big


# -- servers --------------------------------------------------------------------------------
def serve(path: str, threads: int) -> None:
    """``--serve``: run a server until SIGTERM, printing its endpoint on the first line."""
    from lazytensor_server.app import App
    from lazytensor_server.registry import load
    from lazytensor_server.service import Service

    if threads:
        torch.set_num_threads(threads)
    app = App(Service([load(path, "llama")]), "tcp://127.0.0.1:0", grace=5.0)

    def announce() -> None:
        app.bound.wait()
        print(app.endpoint, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    stats_path = os.environ.get("BENCH_SERVER_PROFILE")
    if not stats_path:
        app.run()
        return
    loop, worker = cProfile.Profile(), cProfile.Profile()  # cProfile sees one thread each
    for job_runner in app.service.workers.values():
        job_runner.run_batch = functools.partial(_profiled, worker, job_runner.run_batch)
    loop.runcall(app.run)
    loop.dump_stats(stats_path + ".loop")
    worker.dump_stats(stats_path + ".worker")


def _profiled(profile: cProfile.Profile, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` under ``profile``, or unprofiled where one is already active.

    From Python 3.12 cProfile sits on ``sys.monitoring``, one tool per process: there the
    loop thread's profile is the only one, and the worker's stays empty.
    """
    try:
        profile.enable()
    except ValueError:
        return fn(*args)
    try:
        return fn(*args)
    finally:
        profile.disable()


@contextmanager
def server_process(
    path: str, threads: int = 0, profile_to: str | None = None
) -> Iterator[tuple[str, int]]:
    """A server in a child process; yields (endpoint, pid); stops it with SIGTERM."""
    env = dict(os.environ, BENCH_SERVER_PROFILE=profile_to or "")
    command = [sys.executable, os.path.abspath(__file__), "--serve", path]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            [*command, "--torch-threads", str(threads)],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
        )
        try:
            endpoint = ""
            for line in proc.stdout:  # skip anything a library printed before the endpoint
                if line.startswith("tcp://"):
                    endpoint = line.strip()
                    break
            if not endpoint:
                errors.seek(0)
                raise RuntimeError(f"the server process did not start:\n{errors.read()}")
            yield endpoint, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            if proc.wait(60) != 0:
                errors.seek(0)
                print(f"server exited with {proc.returncode}:\n{errors.read()}", file=sys.stderr)


@contextmanager
def server_thread(path: str, threads: int = 0) -> Iterator[tuple[str, int]]:
    """A server on a thread of this process; yields (endpoint, this pid)."""
    from lazytensor_server.app import App
    from lazytensor_server.registry import load
    from lazytensor_server.service import Service

    app = App(Service([load(path, "llama")]), "tcp://127.0.0.1:0", grace=5.0)
    thread = threading.Thread(target=app.run, kwargs={"signals": False}, daemon=True)
    thread.start()
    app.bound.wait(30)
    try:
        yield app.endpoint, os.getpid()
    finally:
        app.stop()
        thread.join(30)  # App.stop does not wait; exiting before the loop ends breaks it


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- measurements ---------------------------------------------------------------------------
def bench_latency(lm: lt.LanguageModel, endpoint: str, placement: str, repeats: int) -> list[dict]:
    client = lt.connect(endpoint, timeout=CLIENT_TIMEOUT)
    try:
        expected = one_save(lm, False)
        if not torch.equal(one_save(lm, client), expected):
            raise AssertionError("remote logits differ from local ones")
        local = median_time(lambda: one_save(lm, False), repeats, warmup=3)
        remote = median_time(lambda: one_save(lm, client), repeats, warmup=3)
        ping = median_time(client.models, repeats, warmup=3)
    finally:
        client.close()
    added = (remote - local) * 1e3
    return [
        {
            "server": placement,
            "local_ms": local * 1e3,
            "remote_ms": remote * 1e3,
            "added_ms": added,
            "models_rtt_ms": ping * 1e3,
            "target_met": added < TARGET_LATENCY_MS,
        }
    ]


def bench_transfer(
    lm: lt.LanguageModel, endpoint: str, placement: str, sizes: list[int], repeats: int, pid: int
):
    rows = []
    client = lt.connect(endpoint, timeout=CLIENT_TIMEOUT)
    try:
        for mib in sizes:
            numel = mib * MIB // 4
            local = median_time(lambda n=numel: big_save(lm, False, n), repeats, warmup=1)
            remote = median_time(lambda n=numel: big_save(lm, client, n), repeats, warmup=1)
            gb = mib * MIB / 1e9
            net = remote - local
            rows.append(
                {
                    "server": placement,
                    "MiB": mib,
                    "local_ms": local * 1e3,
                    "remote_ms": remote * 1e3,
                    "end_to_end_GBps": gb / remote,
                    "net_GBps": gb / net if net > 0 else float("inf"),
                    "server_rss_MiB": rss_mib(pid),
                    "target_met": gb / remote > TARGET_GBPS,
                }
            )
    finally:
        client.close()
    return rows


def bench_codec(sizes: list[int], repeats: int) -> list[dict]:
    """Encode and decode of a result message alone, next to what the machine can do."""
    rows = []
    for mib in sizes:
        tensor = torch.rand(mib * MIB // 4)
        body = {"id": "0" * 32, "values": {7: tensor}}
        frames = wire.encode("result", body)
        encode = median_time(lambda b=body: wire.encode("result", b), repeats)
        decode = median_time(lambda f=frames: wire.decode(f), repeats)
        clone = median_time(tensor.clone, repeats)  # a copy into fresh memory, as decode does
        gb = mib * MIB / 1e9
        rows.append(
            {
                "MiB": mib,
                "encode_ms": encode * 1e3,
                "decode_ms": decode * 1e3,
                "decode_GBps": gb / decode,
                "clone_GBps": gb / clone,
                "raw_zmq_GBps": gb / zmq_loopback(frames[2], repeats),
            }
        )
    return rows


def zmq_loopback(payload: Any, repeats: int) -> float:
    """Median seconds to move ``payload`` through a bare PUSH/PULL pair on tcp loopback."""
    import zmq

    context = zmq.Context.instance()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")

        def once() -> None:
            push.send(payload, copy=False)
            pull.recv(copy=False)

        return median_time(once, repeats)
    finally:
        push.close(0)
        pull.close(0)


def bench_rps(lm, endpoint: str, placement: str, counts, repeats: int, duration: float):
    rows = []
    for count in counts:
        runs = [_rps_run(lm, endpoint, count, duration) for _ in range(repeats)]
        rows.append(
            {
                "server": placement,
                "clients": count,
                "rps": statistics.median(r for r, _ in runs),
                "p50_ms": statistics.median(p for _, p in runs),
            }
        )
    return rows


def _rps_run(lm, endpoint: str, count: int, duration: float) -> tuple[float, float]:
    """One run: ``count`` threads loop the one-save trace for ``duration`` seconds."""
    clients = [lt.connect(endpoint, timeout=CLIENT_TIMEOUT) for _ in range(count)]
    latencies: list[list[float]] = [[] for _ in range(count)]
    start_line = threading.Barrier(count + 1)
    failures: list[BaseException] = []
    stop_at = [0.0]

    def work(i: int) -> None:
        try:
            one_save(lm, clients[i])  # warm this client's socket
            start_line.wait()
            while time.perf_counter() < stop_at[0]:
                start = time.perf_counter()
                one_save(lm, clients[i])
                latencies[i].append(time.perf_counter() - start)
        except BaseException as exc:  # reported below, after the threads end
            failures.append(exc)
            start_line.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + 1e9
    start_line.wait()
    began = time.perf_counter()
    stop_at[0] = began + duration
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for client in clients:
        client.close()
    if failures:
        raise RuntimeError(f"a client failed during the rps run: {failures[0]!r}")
    done = [t for per_client in latencies for t in per_client]
    return len(done) / elapsed, statistics.median(done) * 1e3


def profile(lm, path: str, args) -> None:
    """cProfile both sides: the one-save trace, then the largest transfer, on a process server."""
    server_stats = os.path.join(tempfile.gettempdir(), "bench_remote_server.prof")
    with server_process(path, args.torch_threads, profile_to=server_stats) as (endpoint, _):
        client = lt.connect(endpoint, timeout=CLIENT_TIMEOUT)
        numel = max(args.sizes) * MIB // 4
        for title, fn, count in (
            ("one-save trace", lambda: one_save(lm, client), args.repeats * 5),
            (f"{max(args.sizes)} MiB save", lambda: big_save(lm, client, numel), 3),
        ):
            fn()
            stats = cProfile.Profile()
            stats.runcall(lambda f=fn, n=count: [f() for _ in range(n)])
            print(f"\ncProfile, client, {count} x {title} (tottime):")
            print(_top(pstats.Stats(stats), args.profile_top))
        client.close()
    for part in ("loop", "worker"):
        print(f"\ncProfile, server {part} thread, both runs above plus warm-up (tottime):")
        try:
            print(_top(pstats.Stats(f"{server_stats}.{part}"), args.profile_top))
        except (TypeError, OSError) as exc:  # an empty profile (Python 3.12+: see _profiled)
            print(f"(no profile: {exc})")


def _top(stats: pstats.Stats, count: int) -> str:
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(count)
    return out.getvalue()


# -- report ---------------------------------------------------------------------------------
def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    import zmq

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "torch_threads": torch.get_num_threads(),
    }


def table(title: str, rows: list[dict]) -> str:
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
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.serve:
        serve(args.serve, args.torch_threads)
        return 0
    torch.manual_seed(0)
    path = str(cached_tiny_lm("llama"))
    lm = lt.LanguageModel(path)
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    results["codec"] = bench_codec(args.sizes, args.repeats)
    for placement in args.server:
        start = server_process if placement == "process" else server_thread
        with start(path, args.torch_threads) as (endpoint, pid):
            run_placement(lm, endpoint, placement, pid, args, results)
    report(results)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    if args.profile:
        profile(lm, path, args)
    return 0


def run_placement(lm, endpoint: str, placement: str, pid: int, args, results: dict) -> None:
    slow = max(3, args.repeats // 3)
    for key, rows in (
        ("latency", lambda: bench_latency(lm, endpoint, placement, args.repeats)),
        ("transfer", lambda: bench_transfer(lm, endpoint, placement, args.sizes, slow, pid)),
        ("rps", lambda: bench_rps(lm, endpoint, placement, args.clients, slow, args.duration)),
    ):
        results.setdefault(key, []).extend(rows())


def report(results: dict) -> None:
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, libzmq {m['libzmq']}")
    print(table(f"Added latency, one save (target < {TARGET_LATENCY_MS} ms)", results["latency"]))
    title = f"Large saved tensors, float32 (target > {TARGET_GBPS} GB/s end to end)"
    print(table(title, results["transfer"]))
    print(table("Wire codec alone (result message with one tensor)", results["codec"]))
    print(table("Requests per second, one-save trace, one client per thread", results["rps"]))
    print("\n" + summary(results))


def summary(results: dict) -> str:
    """The targets, judged on the first placement measured (``process`` by default)."""
    placement = results["latency"][0]["server"]
    latency = results["latency"][0]["added_ms"]
    transfer = [row for row in results["transfer"] if row["server"] == placement]
    slowest = min(transfer, key=lambda row: row["end_to_end_GBps"])
    verdict = {True: "met", False: "MISSED"}
    return (
        f"summary ({placement} server): added latency {latency:.2f} ms, target < "
        f"{TARGET_LATENCY_MS} ms {verdict[latency < TARGET_LATENCY_MS]}; slowest transfer "
        f"{slowest['end_to_end_GBps']:.2f} GB/s at {slowest['MiB']} MiB, target > {TARGET_GBPS} "
        f"GB/s {verdict[slowest['end_to_end_GBps'] > TARGET_GBPS]}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=20,
        help="timed runs per latency and codec point; transfer and rps use max(3, repeats // 3)",
    )
    parser.add_argument(
        "--server",
        choices=("process", "thread", "both"),
        default="both",
        help="where the server runs: its own process, a thread of this one, or both in turn",
    )
    parser.add_argument("--sizes", type=_ints, default=[16, 64, 256], help="MiB, e.g. 16,64,256")
    parser.add_argument("--clients", type=_ints, default=[1, 4, 16], help="e.g. 1,4,16")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per rps run")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=4,
        help="torch intra-op threads in this process and the server process (0: torch's default)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--profile", action="store_true", help="cProfile client and server")
    parser.add_argument("--profile-top", type=int, default=25, help="rows per profile")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.server = ["process", "thread"] if args.server == "both" else [args.server]
    return args


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


if __name__ == "__main__":
    sys.exit(main())
