"""Server-side batching: several users' traces in one forward pass, each job on its own rows.

The oracle for a merged job is the same job run alone by the same worker: every saved value
must match (``assert_close``; a bigger batch may round a matmul differently), and a job that
fails must fail alone with the error it gets alone. Jobs are built from real traces
(recorded with a :class:`servers.Capture` transport) and run through
:meth:`Worker.run_batch`, so which jobs share a forward is chosen by the test; the queue's own
grouping is tested on :class:`FairQueue` and, end to end, on a service and a server process.
"""

from __future__ import annotations

import contextvars
import threading
import time

import pytest
import torch

from lazytensor.frontend.served import Client, in_process
from lazytensor.protocol import messages as m
from lazytensor_server.limits import Limits
from lazytensor_server.metrics import Metrics
from lazytensor_server.scheduler import FairQueue
from lazytensor_server.service import Service
from lazytensor_server.worker import Job, Worker
from servers import MODEL, Capture, ServerProcess

#: Prompts of 8 tokens each: batched with no padding (the tiny Llama's tokenizer).
PROMPTS = ["Q: cheap\nA:", "Q: fast\nA:"]


def job_of(model, build, prompts=PROMPTS, owner="alice", **options) -> Job:
    """The job a server builds for the trace ``build(model)`` on ``prompts``."""
    capture = Capture()
    client = Client("capture", "token", transport=capture)
    with model.trace(prompts, remote=client, blocking=False, **options):
        build(model)
    request = m.decode_request(capture.sent[-1])
    return Job(request.id, owner, MODEL, request.graph, request.batch, request.stop_at,
               request.fake, 0)  # fmt: skip


@pytest.fixture
def worker(served_llama):
    """A worker whose outcomes land in ``worker.outcomes`` (id -> last message)."""
    outcomes: dict[str, m.Message] = {}
    made = Worker(
        served_llama, Limits(), lambda job, message: outcomes.__setitem__(job.id, message)
    )
    made.outcomes = outcomes
    yield made
    made.stop(5.0)


def run(worker: Worker, jobs: list[Job]) -> list[m.Message]:
    # as on the worker's own thread: admission sets that thread's --max-memory bound, which
    # must not stay on the test's thread (later local runs would be bounded)
    contextvars.copy_context().run(worker.run_batch, jobs)
    return [worker.outcomes[job.id] for job in jobs]


def alone(worker: Worker, job: Job) -> m.Message:
    (message,) = run(worker, [job])
    assert job.forward_jobs == 1
    return message


def assert_same(got: m.Message, want: m.Message, exact: bool = False) -> None:
    assert got.KIND == want.KIND, (got, want)
    if isinstance(want, m.Failure):
        assert got.error == want.error
        return
    assert got.values.keys() == want.values.keys()
    for key, value in want.values.items():
        if exact:
            assert torch.equal(got.values[key], value), key
        torch.testing.assert_close(got.values[key], value, rtol=1e-5, atol=1e-6)


# -- traces of different kinds, all row-local ---------------------------------------------------
def embeddings(model):
    model.model.layers[0].input.save()  # (B, T, D): no matmul before it, so bitwise equal


def force_neuron(model):
    x = model.model.layers[1].mlp.down_proj.input  # (B, T, neurons): an in-place write
    x[:, -1, [7]] = 5.0
    model.output.logits[:, -1].softmax(-1).save()  # (B, vocab)


def logit_lens(model):
    h = model.model.layers[2].output  # (B, T, D)
    model.lm_head(model.model.norm(h)).argmax(-1).save()  # module calls on the job's rows


def replace_output(model):
    h = model.model.layers[1].output  # (B, T, D)
    model.model.layers[1].output = h * 0.5
    model.model.layers[3].output[:, -1].save()


BUILDS = [embeddings, force_neuron, logit_lens, replace_output]


def test_merged_jobs_equal_each_job_run_alone(worker, local_llama):
    jobs = [job_of(local_llama, b, owner=b.__name__) for b in BUILDS]
    together = run(worker, jobs)
    assert [job.forward_jobs for job in jobs] == [len(jobs)] * len(jobs)
    assert [job.forward_rows for job in jobs] == [2 * len(jobs)] * len(jobs)
    for job, got in zip(jobs, together):
        assert_same(got, alone(worker, job), exact=job is jobs[0])
    with local_llama.trace(PROMPTS):  # and alone is what the local model computes
        probs = force_neuron(local_llama) or local_llama.output.logits[:, -1].softmax(-1).save()
    (saved,) = [v for k, v in together[1].values.items()]
    torch.testing.assert_close(saved, probs)


def test_jobs_with_invokes_see_their_own_rows(worker, local_llama):
    def invoke_job(value: float, owner: str) -> Job:
        capture = Capture()
        client = Client("capture", "token", transport=capture)
        with local_llama.trace(remote=client, blocking=False) as tracer:
            with tracer.invoke(PROMPTS[0]):
                local_llama.model.layers[0].output.save()
            with tracer.invoke(PROMPTS[1]):
                local_llama.model.layers[1].output[:, -1] = value
                local_llama.output.logits[:, -1].save()
        request = m.decode_request(capture.sent[-1])
        return Job(request.id, owner, MODEL, request.graph, request.batch, None, False, 0)

    jobs = [invoke_job(float(i), f"user{i}") for i in range(3)]
    together = run(worker, jobs)
    assert all(job.forward_jobs == 3 for job in jobs)
    outcomes = [alone(worker, job) for job in jobs]
    for got, want in zip(together, outcomes):
        assert_same(got, want)
    last = [list(o.values.values())[-1] for o in outcomes]
    assert not torch.allclose(last[0], last[1])  # each job's own write reached its own rows


def fails(model):
    x = model.model.layers[1].mlp.down_proj.input
    x[:, -1, [10_000]] = 5.0  # out of bounds: an IndexError at this node


def test_a_failing_job_fails_alone_and_the_others_complete(worker, local_llama):
    jobs = [
        job_of(local_llama, force_neuron, owner="a"),
        job_of(local_llama, fails, owner="b"),
        job_of(local_llama, logit_lens, owner="c"),
    ]
    together = run(worker, jobs)
    assert together[1].KIND == "error" and "IndexError" in together[1].error["type"]
    assert [job.forward_jobs for job in jobs] == [2, 1, 2]  # the others ran again, together
    for job, got in zip(jobs, together):
        assert_same(got, alone(worker, job))


def write_shared(model):
    """Writes into RoPE's cos, a tensor every row of the forward shares."""
    cos = model.model.layers[0].self_attn.inputs[1]["position_embeddings"][0]  # (1, T, hd)
    cos[:] = 0.0
    model.output.logits[:, -1].save()


def look_in_cache(model):
    """Reads inside the key/value cache, a model object that holds every row (refused alone
    as well: merged, the job fails on its own and the others complete)."""
    model.output.past_key_values.layers.save()


def inplace_reshape(model):
    model.model.layers[0].output.unsqueeze_(0)
    model.output.logits[:, -1].save()


@pytest.mark.parametrize("build", [write_shared, look_in_cache, inplace_reshape])
def test_a_job_that_could_touch_other_rows_runs_alone(build, worker, local_llama):
    jobs = [
        job_of(local_llama, force_neuron, owner="a"),
        job_of(local_llama, build, owner="b"),
        job_of(local_llama, embeddings, owner="c"),
    ]
    together = run(worker, jobs)
    assert [job.forward_jobs for job in jobs] == [2, 1, 2]
    for job, got in zip(jobs, together):
        assert_same(got, alone(worker, job))


def test_incompatible_jobs_do_not_share_a_forward(worker, local_llama):
    base = job_of(local_llama, embeddings, owner="a")
    others = {
        "generate": _generate_job(local_llama),
        "other token count": job_of(local_llama, embeddings, ["hi"], owner="c"),
        "other inputs": job_of(local_llama, embeddings, ["Q: cheap\nA:", "hi"], owner="d"),
        "same owner": job_of(local_llama, embeddings, owner="a"),
    }
    for name, job in others.items():
        fits = worker._fits([base], job) and job.owner != base.owner
        assert not fits, name
    assert worker._fits([base], job_of(local_llama, force_neuron, owner="e"))


def _generate_job(model) -> Job:
    capture = Capture()
    client = Client("capture", "token", transport=capture)
    with model.generate(PROMPTS, remote=client, blocking=False, max_new_tokens=2):
        model.model.layers[0].output.save()
    request = m.decode_request(capture.sent[-1])
    return Job(request.id, "g", MODEL, request.graph, request.batch, None, False, 0)


def test_incompatible_fake_and_materializing_jobs(worker, local_llama):
    base = job_of(local_llama, embeddings, owner="a")
    fake = job_of(local_llama, embeddings, owner="b")
    fake.fake = True
    stop = job_of(local_llama, embeddings, owner="c")
    stop.stop_at = 0
    assert fake.group_key is None and stop.group_key is None
    assert not worker._fits([base], fake) and not worker._fits([base], stop)


class Fake:
    def __init__(self, owner: str, rows: int = 2) -> None:
        self.owner, self.rows = owner, rows


def test_groups_take_one_job_per_owner_round_robin():
    queue = FairQueue()
    for _ in range(5):
        queue.put(Fake("burst"))
    queue.put(Fake("b"))
    queue.put(Fake("c"))
    first = queue.get_group(32, lambda group, job: True)
    assert [j.owner for j in first] == ["burst", "b", "c"]
    assert [j.owner for j in queue.get_group(32, lambda g, j: True)] == ["burst"]
    assert queue.qsize() == 3


def test_groups_respect_the_job_and_row_limits(served_llama, local_llama):
    outcomes: dict = {}
    limits = Limits(max_batch=5, max_batch_jobs=3)
    worker = Worker(served_llama, limits, lambda job, msg: outcomes.__setitem__(job.id, msg))
    try:
        jobs = [job_of(local_llama, embeddings, owner=f"u{i}") for i in range(4)]  # 2 rows each
        assert worker._fits(jobs[:1], jobs[1]) and not worker._fits(jobs[:2], jobs[2])
        queue = FairQueue()
        for job in jobs:
            queue.put(job)
        assert [len(queue.get_group(3, worker._fits)) for _ in range(2)] == [2, 2]
        queue = FairQueue()
        one_row = [job_of(local_llama, embeddings, PROMPTS[:1], owner=f"v{i}") for i in range(5)]
        for job in one_row:
            queue.put(job)
        assert [len(queue.get_group(3, worker._fits)) for _ in range(2)] == [3, 2]
    finally:
        worker.stop(5.0)


def test_a_service_batches_waiting_users_and_each_gets_its_own_results(
    served_llama, local_llama, monkeypatch
):
    gate = threading.Event()  # the worker takes nothing until every user's request waits
    take = FairQueue.get_group
    monkeypatch.setattr(FairQueue, "get_group", lambda q, *a: gate.wait(60) and take(q, *a))
    metrics = Metrics()
    service = Service([served_llama], metrics=metrics)
    users = 6
    want, got, failures = {}, {}, []
    for i in range(users):
        with local_llama.trace(PROMPTS):
            local_llama.model.layers[1].mlp.down_proj.input[:, -1, [i]] = float(i + 1)
            want[i] = local_llama.output.logits[:, -1].save()

    def user(i: int) -> None:
        client = in_process(service, f"user-{i}", timeout=60.0)
        try:
            model = client.model(MODEL)
            with model.trace(PROMPTS):
                model.model.layers[1].mlp.down_proj.input[:, -1, [i]] = float(i + 1)
                got[i] = model.output.logits[:, -1].save()
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while service.workers[MODEL].queue.qsize() < users:
            assert not failures and time.monotonic() < deadline, failures
            time.sleep(0.01)
        gate.set()
        for thread in threads:
            thread.join(60)
    finally:
        gate.set()
        service.shutdown(grace=5.0)
    assert not failures, failures
    for i in range(users):
        torch.testing.assert_close(got[i], want[i])
    text = metrics.text()
    assert f'lazytensor_forward_jobs_bucket{{le="4.0",model="{MODEL}"}} 0.0' in text, text
    assert f'lazytensor_forward_jobs_bucket{{le="8.0",model="{MODEL}"}} 6.0' in text, text
    assert f'lazytensor_batch_rows_sum{{model="{MODEL}"}} 72.0' in text, text  # 6 x 12 rows


def test_concurrent_clients_of_a_server_process(llama_path, local_llama, tmp_path):
    users, each = 6, 3
    want = {}
    for i in range(users):
        with local_llama.trace(PROMPTS):
            local_llama.model.layers[2].mlp.down_proj.input[:, -1, [i]] = -float(i + 1)
            want[i] = local_llama.output.logits[:, -1].save()
    server = ServerProcess(llama_path, tmp_path / "server.log")
    got: dict = {}
    failures: list[BaseException] = []
    start = threading.Barrier(users)

    def user(i: int) -> None:
        client = Client(server.address, f"user-{i}", timeout=60.0)
        try:
            model = client.model(MODEL)
            start.wait(30)
            for j in range(each):
                with model.trace(PROMPTS):
                    model.model.layers[2].mlp.down_proj.input[:, -1, [i]] = -float(i + 1)
                    got[i, j] = model.output.logits[:, -1].save()
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            client.close()

    try:
        server.wait_ready()
        threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures, failures
        for (i, _), logits in got.items():
            torch.testing.assert_close(logits, want[i])
        assert len(got) == users * each
        assert "requests in one forward" in server.log()
    finally:
        assert server.stop() == 0
