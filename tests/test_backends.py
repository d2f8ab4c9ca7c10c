"""Tests for lazytensor/backends (local.py, remote.py): where a recorded graph runs.

A local job is deferred until its result is asked for, so it can be cancelled until then; a
remote backend sends the same request to a service (here in this process) and must return
what the local one does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from lazytensor.backends import remote
from lazytensor.backends.base import JobState, RunRequest
from lazytensor.backends.client import Connection, RemoteJob
from lazytensor.backends.local import LocalBackend, LocalJob
from lazytensor.backends.remote import RemoteBackend
from lazytensor.core.errors import NodeFailure, TraceError
from lazytensor.core.graph import Batch, Graph, Ref
from lazytensor.frontend.served import in_process
from lazytensor.runtime import fake
from lazytensor_server.registry import ServedModel
from lazytensor_server.service import Service
from models import TinyMLP, hooked


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def inputs(batch: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def request(x: torch.Tensor, index: int = 0, **options) -> RunRequest:
    """Zero feature ``index`` of layer2's input; save layer1's output and the model's."""
    graph = Graph()
    h = graph.add("output", "layer1")
    i = graph.add("input", "layer2")
    graph.add("function", "operator.setitem", (Ref(i.id), (slice(None), index), 0.0))
    y = graph.add("output", "")
    graph.save(h.id)
    graph.save(y.id)
    return RunRequest(graph, Batch((x,), {}, len(x)), **options)


def expected(model: TinyMLP, x: torch.Tensor) -> dict[int, torch.Tensor]:
    seen = {}

    def zero(module, args):
        args[0][:, 0] = 0.0

    y = hooked(
        model,
        x,
        pre=[(model.layer2, zero)],
        post=[(model.layer1, lambda m, a, o: seen.update(h=o))],
    )
    return {0: seen["h"], 3: y}


class Loader:
    """The module callable of a local backend, counting how often it is asked."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.calls = module, 0

    def __call__(self) -> torch.nn.Module:
        self.calls += 1
        return self.module


# -- local --------------------------------------------------------------------------------------


def test_a_local_run_equals_hooks(tiny_mlp: TinyMLP) -> None:
    x = inputs()
    got = LocalBackend(lambda: tiny_mlp).run(request(x))
    want = expected(tiny_mlp, x)
    assert set(got) == set(want)
    for i in want:
        exact(got[i], want[i])


def test_a_local_job_runs_when_its_result_is_asked_for(tiny_mlp: TinyMLP) -> None:
    loader = Loader(tiny_mlp)
    backend = LocalBackend(loader)
    job = backend.submit(request(inputs()))
    assert isinstance(job, LocalJob)
    assert job.status() is JobState.QUEUED and job.status() == "queued"
    assert loader.calls == 0  # nothing loaded or run yet, status only looks
    values = job.result()
    assert job.status() is JobState.COMPLETED and loader.calls == 1
    assert job.result() is values and loader.calls == 1  # it runs once
    assert job.cancel() is False and job.status() is JobState.COMPLETED


def test_a_queued_local_job_can_be_cancelled(tiny_mlp: TinyMLP) -> None:
    loader = Loader(tiny_mlp)
    job = LocalBackend(loader).submit(request(inputs()))
    assert job.cancel() is True
    assert job.status() is JobState.CANCELLED and job.status().finished
    assert job.cancel() is False
    with pytest.raises(TraceError, match="cancelled before it ran"):
        job.result()
    assert loader.calls == 0


def test_a_failing_local_job_fails_once_and_keeps_its_error(tiny_mlp: TinyMLP) -> None:
    loader = Loader(tiny_mlp)
    job = LocalBackend(loader).submit(request(inputs(), index=99))
    with pytest.raises(NodeFailure) as first:
        job.result()
    assert type(first.value.error) is IndexError
    assert job.status() is JobState.FAILED
    with pytest.raises(NodeFailure) as second:
        job.result()
    assert second.value is first.value and loader.calls == 1


def test_a_local_job_is_running_while_it_runs(tiny_mlp: TinyMLP) -> None:
    seen = []
    job = LocalBackend(lambda: tiny_mlp).submit(request(inputs()))
    handle = tiny_mlp.layer1.register_forward_pre_hook(lambda m, a: seen.append(job.status()))
    try:
        job.result()
    finally:
        handle.remove()
    assert seen == [JobState.RUNNING]
    assert job.cancel() is False


def test_a_local_shape_only_run_returns_fake_values(tiny_mlp: TinyMLP) -> None:
    got = LocalBackend(lambda: tiny_mlp).run(request(inputs(5), fake_mode=fake.mode()))
    assert isinstance(got[3], FakeTensor) and got[3].shape == (5, 4)


@pytest.mark.parametrize("state", list(JobState), ids=[s.value for s in JobState])
def test_job_states_compare_equal_to_their_values(state: JobState) -> None:
    assert state == state.value and str(state) == state.value
    assert state.finished == (state.value in ("completed", "error", "cancelled"))


# -- remote ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> TinyMLP:
    return TinyMLP(seed=0).eval()


@pytest.fixture(scope="module")
def service(tiny: TinyMLP) -> Iterator[Service]:
    service = Service([ServedModel.wrap("tiny", tiny)])
    yield service
    service.shutdown(grace=5.0)


def test_remote_equals_local(service: Service, tiny: TinyMLP) -> None:
    x = inputs(4)
    backend = RemoteBackend(in_process(service, timeout=30.0), "tiny")
    got = backend.run(request(x))
    local = LocalBackend(lambda: tiny).run(request(x))
    assert set(got) == set(local)
    for i in local:
        exact(got[i], local[i])


def test_a_remote_job(service: Service, tiny: TinyMLP) -> None:
    x = inputs(2)
    job = RemoteBackend(in_process(service, timeout=30.0), "tiny").submit(request(x))
    assert isinstance(job, RemoteJob)
    values = job.result()
    assert job.status() is JobState.COMPLETED
    for i, want in expected(tiny, x).items():
        exact(values[i], want)


def test_a_remote_failure_names_its_node(service: Service) -> None:
    backend = RemoteBackend(in_process(service, timeout=30.0), "tiny")
    with pytest.raises(NodeFailure) as caught:
        backend.run(request(inputs(), index=99))
    assert caught.value.node == 2 and type(caught.value.error) is IndexError


def test_a_remote_shape_only_run(service: Service) -> None:
    mode = fake.mode()
    got = RemoteBackend(in_process(service, timeout=30.0), "tiny").run(
        request(inputs(6), fake_mode=mode)
    )
    assert isinstance(got[3], FakeTensor) and got[3].shape == (6, 4)


def test_connection_takes_a_client_or_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "_clients", threading.local())
    monkeypatch.setenv("LAZYTENSOR_SERVER", "tcp://127.0.0.1:1")
    client = Connection("inproc", transport=object())  # type: ignore[arg-type]
    assert remote.connection(client) is client
    made = []
    try:
        here = remote.connection("tcp://127.0.0.1:2")
        made.append(here)
        assert remote.connection("tcp://127.0.0.1:2") is here
        default = remote.connection(True)
        made.append(default)
        assert default.address == "tcp://127.0.0.1:1" and default is not here
        other: list[Connection] = []
        thread = threading.Thread(target=lambda: other.append(remote.connection(here.address)))
        thread.start()
        thread.join(10)
        made.extend(other)
        assert other and other[0] is not here  # one client per thread
    finally:
        for connection in made:
            connection.close()
