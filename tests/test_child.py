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
from lazytensor_server.child import ChildProcess, Encoded
from lazytensor_server.limits import Limits
from lazytensor_server.runner import Job, Runner
from servers import MODEL, Capture, ServerProcess

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
