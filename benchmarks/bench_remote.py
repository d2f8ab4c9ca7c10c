"""Remote execution on loopback: added latency, transfer rate, requests per second.

Runs a real ZeroMQ server on ``127.0.0.1`` serving the tiny llama of
:func:`lazytensor.tiny.cached_tiny_lm`, in one or both of two placements:

* ``process``: a separate server process (this script with ``--serve``), so client and server
  do not share a GIL. This is how a real server runs; the summary uses it.
* ``thread``: :class:`~lazytensor_server.service.Service` behind an
  :class:`~lazytensor_server.app.App` on a thread of this process (as ``lazytensor demo`` and
  the tests do); client and server compete for one GIL.

It measures, each as the median of repeated runs in this process:

* ``latency``: a trace with one save, remote minus the same trace run locally, the median of
  the differences within each round (target <= 2 ms);
  also the round trip of a bare ``models`` request, the floor of any request;
* ``transfer``: saving one large tensor built in the trace (``torch.zeros(n) + logit``): GB/s
  of payload end to end, net of the same trace run locally (the server's compute), and for the
  result alone: the server keeps it (never acknowledged) and a ``fetch`` by id sends it again,
  from the server's event loop through the wire to a decoded tensor. Next to it, bare ZeroMQ
  moving the same bytes on the same machine in the same placement: a DEALER asks a ROUTER,
  which answers with one ``copy=False`` frame that the DEALER adopts with ``torch.frombuffer``.
  Local, remote, fetch and bare runs are interleaved, so the machine's drift hits them alike.
  Target: fetch >= 80% of bare ZeroMQ's rate;
* ``codec``: :func:`lazytensor.protocol.codec.encode` and
  :func:`~lazytensor.protocol.codec.decode` of a result message alone, next to what the
  machine gives: ``clone`` (a copy into fresh memory, as decode makes) and the same bytes
  through a bare ZeroMQ PUSH/PULL pair on loopback;
* ``rps``: requests per second with 1, 4 and 16 threads, each with its own
  ``lt.connect(endpoint)`` client, each running the one-save trace in a loop.

Usage::

    python benchmarks/bench_remote.py                     # both placements, default sizes
    python benchmarks/bench_remote.py --server process --repeats 30 --json out.json
    python benchmarks/bench_remote.py --server process --workers process  # as `lazytensor serve`
    python benchmarks/bench_remote.py --profile           # then cProfile client and server

The tables go to stdout in Markdown; ``docs/benchmarks.md`` ("Remote") holds the latest run,
``docs/protocol.md`` ("Measured on loopback") earlier ones.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import io
import json
import os
import platform
import pstats
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from common import markdown_table

import lazytensor as lt
from lazytensor.protocol import codec as wire
from lazytensor.protocol import messages as m
from lazytensor.tiny import cached_tiny_lm

PROMPT = "The Eiffel Tower is in"
TARGET_LATENCY_MS = 2.0
TARGET_RATIO = 0.8  # saved-tensor transfer, net of the server's compute, over bare ZeroMQ
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
def serve(path: str, threads: int, workers: str = "thread") -> None:
    """``--serve``: run a server until SIGTERM, printing its endpoint on the first line."""
    from lazytensor_server.app import App

    if threads:
        torch.set_num_threads(threads)
    app = App(service(path, workers), "tcp://127.0.0.1:0", grace=5.0)

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


def service(path: str, workers: str) -> Any:
    """The service of the tiny llama; ``workers="process"`` runs its jobs in a worker process,
    as ``lazytensor serve`` does by default."""
    from lazytensor_server.registry import load
    from lazytensor_server.service import Service

    return Service([load(path, "llama")], isolate=workers == "process")


@contextmanager
def server_process(
    path: str, threads: int = 0, profile_to: str | None = None, workers: str = "thread"
) -> Iterator[tuple[str, int]]:
    """A server in a child process; yields (endpoint, pid); stops it with SIGTERM."""
    env = dict(os.environ, BENCH_SERVER_PROFILE=profile_to or "")
    command = [sys.executable, os.path.abspath(__file__), "--serve", path, "--workers", workers]
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
def server_thread(
    path: str, threads: int = 0, workers: str = "thread"
) -> Iterator[tuple[str, int]]:
    """A server on a thread of this process; yields (endpoint, this pid)."""
    from lazytensor_server.app import App

    app = App(service(path, workers), "tcp://127.0.0.1:0", grace=5.0)
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
def bench_latency(
    lm: lt.LanguageModel, endpoint: str, placement: str, repeats: int, pid: int
) -> list[dict]:
    """Remote minus local, as medians and as the fastest runs (on a shared machine the fastest
    are the ones nothing else interrupted), and in CPU time: what the client and the server
    spend per request over what a local run spends, whatever else the machine runs."""
    client = lt.connect(endpoint, timeout=CLIENT_TIMEOUT)
    try:
        expected = one_save(lm, False)
        if not torch.equal(one_save(lm, client), expected):
            raise AssertionError("remote logits differ from local ones")
        runs = {
            "local": lambda: one_save(lm, False),
            "remote": lambda: one_save(lm, client),
            "ping": client.models,
        }
        samples = interleaved(runs, repeats, warmup=3, keep=True)
        cpu = {
            name: cpu_time(runs[name], repeats, pid if name == "remote" else None)
            for name in ("local", "remote")
        }
    finally:
        client.close()
    local, remote, ping = (statistics.median(samples[k]) for k in ("local", "remote", "ping"))
    # Paired by round: this VM's speed drifts about 2x over minutes, which a difference of two
    # medians can catch in different phases (common.paired_us in the trace benchmarks).
    pairs = zip(samples["remote"], samples["local"], strict=True)
    added = statistics.median(r - lo for r, lo in pairs) * 1e3
    return [
        {
            "server": placement,
            "local_ms": local * 1e3,
            "remote_ms": remote * 1e3,
            "added_ms": added,
            "added_fastest_ms": (min(samples["remote"]) - min(samples["local"])) * 1e3,
            "added_cpu_ms": (cpu["remote"] - cpu["local"]) * 1e3,
            "models_rtt_ms": ping * 1e3,
            "target_met": added <= TARGET_LATENCY_MS,
        }
    ]


def cpu_time(fn: Callable[[], Any], repeats: int, server_pid: int | None) -> float:
    """CPU seconds per call of ``fn``: this process's, plus a server process's when given
    (a server on a thread of this process is in this process's already)."""
    if server_pid == os.getpid():
        server_pid = None
    start, server = time.process_time(), process_cpu(server_pid)
    for _ in range(repeats):
        fn()
    return (time.process_time() - start + process_cpu(server_pid) - server) / repeats


def process_cpu(pid: int | None) -> float:
    """CPU seconds process ``pid`` and the processes it started (a worker process) have used,
    all their threads (0 for ``None``)."""
    if pid is None:
        return 0.0
    total = 0
    for each in _descendants(pid):
        try:
            with open(f"/proc/{each}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> Iterator[int]:
    yield pid
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                kids = [int(kid) for kid in children.read().split()]
        except OSError:
            continue
        for kid in kids:
            yield from _descendants(kid)


def bench_transfer(
    lm: lt.LanguageModel,
    endpoints: tuple[str, str],
    placement: str,
    sizes: list[int],
    repeats: int,
    pid: int,
) -> list[dict]:
    """Save a large tensor locally and remotely, fetch the kept result again, and fetch the
    same bytes over bare ZeroMQ, interleaved.

    ``endpoints`` are the lazytensor server's and the bare ROUTER's. The target is judged on
    the fetch (the saved tensor's way back alone: server loop, wire, decode) over bare ZeroMQ;
    a whole run, net of the same trace run locally, carries the request's fixed cost too.
    """
    import zmq

    rows = []
    client = lt.connect(endpoints[0], timeout=CLIENT_TIMEOUT)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(endpoints[1])
    try:
        for mib in sizes:
            numel = mib * MIB // 4
            kept = Kept(lm, client, numel)
            runs = {
                "local": lambda n=numel: big_save(lm, False, n),
                "remote": lambda n=numel: big_save(lm, client, n),
                "fetch": kept.fetch,
                "bare": lambda n=mib * MIB: bare_fetch(dealer, n),
            }
            times = interleaved(runs, repeats, warmup=1)
            kept.close()
            gb = mib * MIB / 1e9
            net = times["remote"] - times["local"]
            rows.append(
                {
                    "server": placement,
                    "MiB": mib,
                    **{f"{name}_ms": t * 1e3 for name, t in times.items()},
                    "end_to_end_GBps": gb / times["remote"],
                    "net_GBps": gb / net if net > 0 else float("inf"),
                    "fetch_GBps": gb / times["fetch"],
                    "bare_GBps": gb / times["bare"],
                    "net_ratio": times["bare"] / net if net > 0 else float("inf"),
                    "fetch_ratio": times["bare"] / times["fetch"],
                    "server_rss_MiB": rss_mib(pid),
                    "target_met": times["bare"] / times["fetch"] >= TARGET_RATIO,
                }
            )
    finally:
        dealer.close(0)
        client.close()
    return rows


class Kept:
    """A large result the server keeps (never acknowledged), fetched again by id: the saved
    tensor's way back alone, without the run that made it."""

    def __init__(self, lm: lt.LanguageModel, client: Any, numel: int) -> None:
        sent: list[list] = []
        transport = client.transport
        send = transport.send
        transport.send = lambda frames: (sent.append(list(frames)), send(frames))[1]
        try:
            big_save(lm, client, numel)  # records the run request it sends
        finally:
            del transport.send
        run = next(r for r in map(m.decode_request, sent) if isinstance(r, m.Run))
        self.client, self.id = client, uuid.uuid4().hex
        client.send(dataclasses.replace(run, id=self.id))  # the same run, under a new id
        self._result()

    def fetch(self) -> dict:
        self.client.send(m.Fetch(self.id, self.client.token))
        return self._result()

    def _result(self) -> dict:
        while True:
            frames = self.client.transport.recv(CLIENT_TIMEOUT)
            if frames is None:
                raise RuntimeError(f"no reply to request {self.id} in {CLIENT_TIMEOUT} s")
            reply = m.decode_reply(frames)
            if isinstance(reply, m.Failure):
                raise reply.exception()
            if reply.id == self.id and isinstance(reply, m.Result):
                return reply.values

    def close(self) -> None:
        self.client.send(m.Ack(self.id, self.client.token))


def interleaved(
    runs: dict[str, Callable[[], Any]], repeats: int, warmup: int, keep: bool = False
) -> dict[str, Any]:
    """Median seconds of each of ``runs``, each called once per round in an order drawn afresh
    each round (every sample, by round, with ``keep``)."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order, shuffle = list(runs.items()), random.Random(0)
    for _ in range(repeats):
        shuffle.shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times if keep else {name: statistics.median(t) for name, t in times.items()}


def bare_fetch(dealer: Any, nbytes: int) -> torch.Tensor:
    """Ask the bare ROUTER for ``nbytes`` and adopt the reply's frame as a tensor (no copy)."""
    dealer.send(str(nbytes).encode())
    frames = dealer.recv_multipart(copy=False)
    return torch.frombuffer(frames[-1].buffer, dtype=torch.uint8)


def bare_serve(socket: Any) -> None:
    """A bare ZeroMQ ROUTER: answer ``b"N"`` with a small frame and one ``copy=False`` frame of
    N bytes (kept per size, as a server keeps a result until it is sent); ``b"0"`` stops."""
    payloads: dict[int, memoryview] = {}
    while True:
        identity, request = socket.recv_multipart()
        nbytes = int(request)
        if not nbytes:
            return
        if nbytes not in payloads:
            payloads[nbytes] = memoryview(torch.ones(nbytes, dtype=torch.uint8).numpy())
        socket.send_multipart([identity, b"header", payloads[nbytes]], copy=False)


@contextmanager
def bare_router(placement: str) -> Iterator[str]:
    """A bare ROUTER (:func:`bare_serve`) in a child process or on a thread; yields its
    endpoint."""
    import zmq

    if placement == "process":
        command = [sys.executable, os.path.abspath(__file__), "--bare-serve"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        endpoint = proc.stdout.readline().strip()
        stop: Callable[[], Any] = functools.partial(proc.wait, 30)
    else:
        socket = zmq.Context.instance().socket(zmq.ROUTER)
        endpoint = f"tcp://127.0.0.1:{socket.bind_to_random_port('tcp://127.0.0.1')}"
        thread = threading.Thread(target=_bare_thread, args=(socket,), daemon=True)
        thread.start()
        stop = functools.partial(thread.join, 30)
    try:
        yield endpoint
    finally:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(endpoint)
        dealer.send(b"0")
        stop()
        dealer.close(0)


def _bare_thread(socket: Any) -> None:
    try:
        bare_serve(socket)
    finally:
        socket.close(0)


def _bare_process() -> None:
    """``--bare-serve``: a bare ROUTER in this process, its endpoint on the first line."""
    import zmq

    socket = zmq.Context.instance().socket(zmq.ROUTER)
    print(f"tcp://127.0.0.1:{socket.bind_to_random_port('tcp://127.0.0.1')}", flush=True)
    bare_serve(socket)
    socket.close(0)


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
    server = server_process(path, args.torch_threads, server_stats, args.workers)
    with server as (endpoint, _):
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.serve:
        serve(args.serve, args.torch_threads, args.workers)
        return 0
    if args.bare_serve:
        _bare_process()
        return 0
    torch.manual_seed(0)
    path = str(cached_tiny_lm("llama"))
    lm = lt.LanguageModel(path)
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    results["codec"] = bench_codec(args.sizes, args.repeats)
    for placement in args.server:
        start = server_process if placement == "process" else server_thread
        server = start(path, args.torch_threads, workers=args.workers)
        with server as (endpoint, pid), bare_router(placement) as bare:
            run_placement(lm, (endpoint, bare), placement, pid, args, results)
    report(results)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    if args.profile:
        profile(lm, path, args)
    return 0


def run_placement(lm, endpoints: tuple, placement: str, pid: int, args, results: dict) -> None:
    slow = max(3, args.repeats // 3)
    endpoint = endpoints[0]
    for key, rows in (
        ("latency", lambda: bench_latency(lm, endpoint, placement, args.repeats, pid)),
        ("transfer", lambda: bench_transfer(lm, endpoints, placement, args.sizes, slow, pid)),
        ("rps", lambda: bench_rps(lm, endpoint, placement, args.clients, slow, args.duration)),
    ):
        results.setdefault(key, []).extend(rows())


def report(results: dict) -> None:
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, libzmq {m['libzmq']}")
    print(
        markdown_table(
            f"Added latency, one save (target <= {TARGET_LATENCY_MS} ms)", results["latency"]
        )
    )
    title = (
        f"Large saved tensors, float32 (target: fetching a kept result >= {TARGET_RATIO:.0%} of "
        "bare ZeroMQ's rate)"
    )
    print(markdown_table(title, results["transfer"]))
    print(markdown_table("Wire codec alone (result message with one tensor)", results["codec"]))
    print(
        markdown_table("Requests per second, one-save trace, one client per thread", results["rps"])
    )
    print("\n" + summary(results))


def summary(results: dict) -> str:
    """The targets, judged on the first placement measured (``process`` by default)."""
    placement = results["latency"][0]["server"]
    latency = results["latency"][0]["added_ms"]
    transfer = [row for row in results["transfer"] if row["server"] == placement]
    slowest = min(transfer, key=lambda row: row["fetch_ratio"])
    verdict = {True: "met", False: "missed"}
    return (
        f"summary ({placement} server): added latency {latency:.2f} ms, target <= "
        f"{TARGET_LATENCY_MS} ms {verdict[latency <= TARGET_LATENCY_MS]}; saved-tensor "
        f"transfer at its worst ({slowest['MiB']} MiB) {slowest['fetch_GBps']:.2f} GB/s, bare "
        f"ZeroMQ {slowest['bare_GBps']:.2f} GB/s, ratio {slowest['fetch_ratio']:.2f}, target >= "
        f"{TARGET_RATIO} {verdict[slowest['fetch_ratio'] >= TARGET_RATIO]} (a whole run, net "
        f"of local compute: ratio {slowest['net_ratio']:.2f})"
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
    parser.add_argument(
        "--workers",
        choices=("thread", "process"),
        default="thread",
        help="where the server runs jobs: its worker thread, or a worker process as "
        "`lazytensor serve` does by default",
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
    parser.add_argument("--bare-serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.server = ["process", "thread"] if args.server == "both" else [args.server]
    return args


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


if __name__ == "__main__":
    sys.exit(main())
