"""Worker processes: jobs run in a child process that is killed when a run overruns its limit.

The oracle for a job run in a worker process is the same job run by a :class:`Runner` in this
process: bitwise equal results. An op that runs past ``--max-seconds`` (one big matmul: the
limit is checked between ops, so only the kill stops it) fails its own job with a timeout; the
other jobs of its group still get their results, and the next job runs in a fresh process. (A
real server stopping such an op and serving the next user: ``test_attacks.py``.)
"""

from __future__ import annotations

import contextvars
import signal
import time

import pytest
import torch

from lazytensor.frontend.served import Client
from lazytensor.protocol import messages as m
from lazytensor_server import inputs
from lazytensor_server.child import MAX_EARLY, ChildProcess, Encoded
from lazytensor_server.limits import Limits
from lazytensor_server.runner import Job, Runner
from lazytensor_server.service import Service
from servers import MODEL, Capture, ServerProcess
from wire import wire

PROMPT = ["Q: cheap\nA:"]
LIMITS = Limits(max_seconds=1.0)


def job_of(model, build, owner: str = "alice") -> Job:
    """The job a server builds for the trace ``build(model)``, with the request's frames."""
    capture = Capture()
    client = Client("capture", "token", transport=capture)
    with model.trace(PROMPT, remote=client, blocking=False):
        build(model)
    frames = capture.sent[-1]
    job = inputs.job_of(m.decode_request(frames), MODEL, LIMITS, positional=False)
    job.owner, job.frames = owner, frames
    return job


def patch(model) -> None:
    model.model.layers[1].mlp.down_proj.input[:, -1, 3] = 5.0
    model.output.logits[:, -1].save()


def slow(model) -> None:
    model.output.logits  # noqa: B018
    big = torch.ones(8192, 8192)
    (big @ big).sum().save()  # one op of many seconds: only a kill stops it


def outcomes(run, jobs: list[Job]) -> list[m.Message]:
    got: dict[str, m.Message] = {}
    run(jobs, lambda job, message: got.__setitem__(job.id, message))
    return [_decoded(got[job.id]) for job in jobs]


def _decoded(message: m.Message | Encoded) -> m.Message:
    return m.decode_reply(message.frames) if isinstance(message, Encoded) else message


@pytest.fixture(scope="module")
def child(served_llama):
    process = ChildProcess(served_llama, LIMITS, trusted=False)
    yield process
    process.close()


def test_a_job_in_a_worker_process_equals_the_job_run_here(child, served_llama, local_llama):
    job = job_of(local_llama, patch)
    runner = Runner(served_llama, LIMITS, None)
    (want,) = outcomes(  # in a copied context, as on a worker thread (see test_batching.run)
        lambda jobs, done: (
            setattr(runner, "done", done) or contextvars.copy_context().run(runner.run_group, jobs)
        ),
        [job],
    )
    (got,) = outcomes(child.run, [job_of(local_llama, patch)])
    assert isinstance(got, m.Result) and isinstance(want, m.Result)
    (value,) = got.values.values()
    assert torch.equal(value, next(iter(want.values.values())))


def test_an_overrunning_op_is_killed_and_the_others_of_its_group_still_run(child, local_llama):
    good, bad = job_of(local_llama, patch, "alice"), job_of(local_llama, slow, "mallory")
    before = child.restarts
    started = time.monotonic()
    told: list[Job] = []  # the jobs told "running": those still running after a moment
    got, failed = outcomes(lambda jobs, done: child.run(jobs, done, told.extend), [good, bad])
    assert told == [good, bad]
    elapsed = time.monotonic() - started
    assert isinstance(failed, m.Failure)
    assert failed.error["type"] == "RemoteTimeout" and "--max-seconds" in failed.error["message"]
    assert child.restarts == before + 2  # the group, then the culprit alone
    assert elapsed < 2 * (LIMITS.max_seconds + 1.0) + 10  # two kills, two quick restarts
    (again,) = outcomes(child.run, [job_of(local_llama, patch)])
    assert isinstance(got, m.Result) and isinstance(again, m.Result)
    (value,) = got.values.values()
    assert torch.equal(value, next(iter(again.values.values())))


def test_a_worker_process_that_dies_fails_its_job_and_is_replaced(child, local_llama):
    child._wait_ready()
    before = child.restarts
    child._process.kill()  # as if an op had crashed it
    child._process.join(5)
    (failed,) = outcomes(child.run, [job_of(local_llama, patch)])
    assert isinstance(failed, m.Failure) and child.restarts == before + 1
    (got,) = outcomes(child.run, [job_of(local_llama, patch)])
    assert isinstance(got, m.Result)


def test_sigterm_past_the_grace_period_stops_a_running_job_cleanly(
    llama_path, tmp_path, local_llama
):
    process = ServerProcess(
        llama_path, tmp_path / "server.log", "--max-seconds", "60", "--grace", "0.5"
    )
    try:
        process.wait_ready()
        client = Client(process.address, None, timeout=60.0)
        try:
            with local_llama.trace(PROMPT, remote=client, blocking=False) as tracer:
                slow(local_llama)
            time.sleep(1.0)  # it is running
            process.process.send_signal(signal.SIGTERM)
            assert process.process.wait(30) == 0
            with pytest.raises(RuntimeError, match="shut down"):
                tracer.job.result(10)
        finally:
            client.close()
        assert "terminate called" not in process.log()
    finally:
        process.stop()


def test_a_large_result_crosses_from_the_worker_process_intact(child, local_llama):
    def big(model) -> None:
        hidden = model.model.layers[0].output[0]  # (1, T, D)
        hidden.expand(64, -1, -1).mul(2).contiguous().reshape(-1).repeat(64).save()  # > 1 MiB

    (got,) = outcomes(child.run, [job_of(local_llama, big)])
    with local_llama.trace(PROMPT):
        hidden = local_llama.model.layers[0].output[0]
        want = hidden.expand(64, -1, -1).mul(2).contiguous().reshape(-1).repeat(64).save()
    (value,) = got.values.values()
    assert value.nbytes > 1 << 20 and torch.equal(value, want)


def _equal_results(got: m.Message, want: m.Message) -> None:
    assert isinstance(got, m.Result) and isinstance(want, m.Result), (got, want)
    assert list(got.values) == list(want.values)
    for a, b in zip(got.values.values(), want.values.values()):
        assert torch.equal(a, b)


def test_a_job_sent_early_runs_as_one_whose_frames_come_with_its_group(child, local_llama):
    """A request sent to the idle process before the server checked it (``send_early``) is
    decoded there and waits; the group that names it runs it as if its frames came along."""
    child._wait_ready()
    plain, early = job_of(local_llama, patch), job_of(local_llama, patch)
    early.early = child.send_early(early.frames)
    assert early.early is not None and early.early.generation == child.restarts
    (want,) = outcomes(child.run, [plain])
    (got,) = outcomes(child.run, [early])
    _equal_results(got, want)
    both = [job_of(local_llama, patch, "alice"), job_of(local_llama, patch, "bob")]
    both[1].early = child.send_early(both[1].frames)  # one early, one not, in one group
    for message in outcomes(child.run, both):
        _equal_results(message, want)


def test_an_early_request_forgotten_or_crowded_out_never_runs(child, local_llama):
    """The server forgets an early request it refused; past MAX_EARLY kept, the process drops
    the oldest. Either way a group naming it fails that job, with advice, and the process
    serves on."""
    child._wait_ready()
    forgotten = job_of(local_llama, patch)
    forgotten.early = child.send_early(forgotten.frames)
    child.forget(forgotten.early)
    (failed,) = outcomes(child.run, [forgotten])
    assert isinstance(failed, m.Failure) and "send it again" in failed.error["message"]
    crowded = job_of(local_llama, patch)
    crowded.early = child.send_early(crowded.frames)
    later = [job_of(local_llama, patch) for _ in range(MAX_EARLY)]
    for job in later:
        job.early = child.send_early(job.frames)
    (failed,) = outcomes(child.run, [crowded])
    assert isinstance(failed, m.Failure) and "send it again" in failed.error["message"]
    (want,) = outcomes(child.run, [job_of(local_llama, patch)])
    for job in later:  # all kept, each runs once
        (got,) = outcomes(child.run, [job])
        _equal_results(got, want)


def test_frames_of_every_size_cross_the_pipe_both_ways(child, local_llama):
    """Small frames ride inside their header, mid-sized ones (64 KiB - 1 MiB) follow it on
    the pipe, large ones come back in a memory file: a request with a 256 KiB constant,
    saving a 256 KiB value and a small one, sent with its group and sent early."""
    noise = torch.arange(65536, dtype=torch.float32)  # 256 KiB

    def medium(model) -> None:
        (model.output.logits[0, -1, 0] + noise).save()
        model.output.logits[:, -1].save()

    with local_llama.trace(PROMPT):
        want_big = (local_llama.output.logits[0, -1, 0] + noise).save()
        want_small = local_llama.output.logits[:, -1].save()
    child._wait_ready()
    early = job_of(local_llama, medium)
    early.early = child.send_early(early.frames)
    for job in (job_of(local_llama, medium), early):
        assert max(len(frame) for frame in job.frames) >= 1 << 18
        (got,) = outcomes(child.run, [job])
        assert isinstance(got, m.Result), got
        big, small = got.values.values()
        assert torch.equal(big, want_big) and torch.equal(small, want_small)


def test_the_server_sends_early_to_an_idle_process_and_forgets_what_it_refuses(
    served_llama, local_llama, monkeypatch
):
    """Through the service: a run request for an idle worker process goes early and runs
    from there; a refused one (an op off the allow-list) is forgotten, and so is a retry of
    a request already run (never run twice)."""
    sent, forgotten = [], []
    send_early, forget = ChildProcess.send_early, ChildProcess.forget
    monkeypatch.setattr(
        ChildProcess, "send_early", lambda self, f: sent.append(send_early(self, f)) or sent[-1]
    )
    monkeypatch.setattr(
        ChildProcess, "forget", lambda self, e: forgotten.append(e) or forget(self, e)
    )
    service = Service([served_llama], isolate=True)
    replies: list = []
    try:
        service.workers[MODEL].child._wait_ready()
        good = job_of(local_llama, patch)
        body = wire.decode(good.frames).body
        body["graph"]["nodes"][-1][1] = "exec"
        bad = [bytes(f) for f in wire.encode("run", body)]

        def answer(frames: list) -> m.Message:
            service.handle("peer", frames, lambda peer, reply: replies.append(reply))
            end = time.monotonic() + 30
            while time.monotonic() < end:
                finished = [r for r in map(m.decode_reply, replies) if r.KIND != "status"]
                if finished:
                    replies.clear()
                    return finished[0]
                time.sleep(0.01)
            raise AssertionError("no answer")

        refused = answer(bad)
        assert isinstance(refused, m.Failure) and "exec" in refused.error["message"]
        assert sent[-1] is not None and forgotten == [sent[-1]]
        got = answer(good.frames)
        assert len(sent) == 2 and sent[-1] is not None and forgotten == [sent[0]]
        (want,) = outcomes(child_run_here(served_llama), [job_of(local_llama, patch)])
        _equal_results(got, want)
        again = answer(good.frames)  # the same id: the kept result, not a second run
        _equal_results(again, want)
        assert len(sent) == 3 and forgotten == [sent[0], sent[2]]
    finally:
        service.shutdown(grace=5.0)


def child_run_here(served):
    """A ``run(jobs, done)`` running jobs with a :class:`Runner` in this process."""
    runner = Runner(served, LIMITS, None)

    def run(jobs, done):
        runner.done = done
        contextvars.copy_context().run(runner.run_group, jobs)

    return run
