"""Tests for lazytensor/tracing/shapes.py: ``.shape`` inside a trace, without running the model.

Every shape is checked twice over: against the real value's shape after the trace, and for how
it was found: alone from its inputs' fake values (no pass through the model), or by a
shape-only pass. Passes are counted where they run: the local backend's ``run``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lazytensor as lt
from lazytensor.backends.base import RunRequest
from lazytensor.backends.local import LocalBackend
from lazytensor.core.errors import TraceError
from models import TinyMLP


def inputs(batch: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


class Passes:
    """Counts the runs a trace asks of the local backend: shape-only (fake) and real."""

    def __init__(self) -> None:
        self.fake = self.real = 0


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> Passes:
    passes, run = Passes(), LocalBackend.run

    def counted(backend: LocalBackend, request: RunRequest) -> dict:
        if request.fake_mode is not None:
            passes.fake += 1
        else:
            passes.real += 1
        return run(backend, request)

    monkeypatch.setattr(LocalBackend, "run", counted)
    return passes


@pytest.fixture
def net(tiny_mlp: TinyMLP, passes: Passes):
    return lt.Model(tiny_mlp), passes


def test_a_point_read_takes_one_pass_that_fills_in_its_prefix(net) -> None:
    net, passes = net
    with net.trace(inputs(3)) as tracer:
        a = net.layer1.output
        b = net.layer3.output
        assert b.shape == (3, 4)
        assert (passes.fake, passes.real) == (1, 0)
        assert set(tracer.shapes.fake) >= {a._node, b._node}
        assert a.shape == (3, 16) and a.ndim == 2 and a.dtype == torch.float32
        assert passes.fake == 1  # a was filled in by the same pass
        net.output.save()
    assert (passes.fake, passes.real) == (1, 1)
    assert tracer.shapes is None  # dropped when the trace is done


def test_a_value_computed_from_known_shapes_needs_no_pass(net) -> None:
    net, passes = net
    with net.trace(inputs(3)) as tracer:
        h = net.layer1.output
        assert h.shape == (3, 16)
        t = h.transpose(0, 1)
        node = t._node
        assert tracer.shapes._alone(node)
        assert t.shape == (16, 3)
        product = t @ h
        assert product.shape == (16, 16)
        total = product.sum(0)
        assert total.shape == (16,)
        assert len(total[:4]) == 4
        assert passes.fake == 1
        h.save()


def test_a_value_computed_from_unknown_shapes_takes_a_pass(net) -> None:
    net, passes = net
    with net.trace(inputs(2)) as tracer:
        doubled = net.layer2.output * 2
        assert doubled.shape == (2, 16)
        assert passes.fake == 1
        called = net.layer3(doubled)  # a module call is never propagated alone
        node = called._node
        assert not tracer.shapes._alone(node)
        assert called.shape == (2, 4)
        assert passes.fake == 2
        doubled.save()


#: One op each on two point reads (a chain of ops, unqueried, would take a pass).
EXPRESSIONS = {
    "transpose": lambda h, i: h.transpose(0, 1),
    "getitem": lambda h, i: h[1:, None, :3],
    "sum": lambda h, i: i.sum(dim=0, keepdim=True),
    "cat": lambda h, i: torch.cat([h, i], dim=1),
    "amax": lambda h, i: torch.amax(h, dim=1),
    "narrow": lambda h, i: h.narrow(1, 2, 4),
    "T": lambda h, i: h.T,
    "to-half": lambda h, i: h.to(torch.float16),
    "einsum": lambda h, i: torch.einsum("bi,bj->ij", h, i),
}


@pytest.mark.parametrize("warm", [False, True], ids=["pass", "alone"])
@pytest.mark.parametrize("name", list(EXPRESSIONS))
def test_shapes_inside_equal_the_real_shapes(net, name: str, warm: bool) -> None:
    net, passes = net
    with net.trace(inputs(3)):
        h, i = net.layer1.output, net.layer2.input
        if warm:  # the reads' fake values first (a pass each): the expression is then alone
            assert (h.shape, i.shape) == ((3, 16), (3, 16))
        value = EXPRESSIONS[name](h, i).save()
        shape, dtype = value.shape, value.dtype
        assert passes.fake == (2 if warm else 1) and passes.real == 0
    assert value.shape == shape and value.dtype == dtype


def test_a_data_dependent_op_found_by_a_pass_is_a_clear_error(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    with pytest.raises(RuntimeError, match="depends on tensor values") as caught:
        with net.trace(inputs(3)):
            _ = torch.nonzero(net.layer1.output > 0).shape
    assert "torch.nonzero(net.layer1.output > 0).shape" in str(caught.value)


def test_a_value_used_by_a_later_shape_query_keeps_its_shape(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    with net.trace(inputs(3)):
        h = net.layer1.output
        assert (h + 1).shape == (3, 16)  # a pass in which h is used, then dropped
        assert h.shape == (3, 16)
        h.save()


def test_a_data_dependent_op_propagated_alone_is_a_clear_error(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    with pytest.raises(RuntimeError, match="depends on tensor values"):
        with net.trace(inputs(3)):
            positive = net.layer1.output > 0
            _ = positive.shape
            _ = torch.nonzero(positive).shape


class Masked(nn.Module):
    """Keeps the rows whose sum is positive: its own shapes depend on values."""

    def __init__(self) -> None:
        super().__init__()
        self.before = nn.Linear(8, 8)
        self.after = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.before(x)
        return self.after(h[h.sum(-1) > 0])


def test_a_value_the_shape_only_pass_never_reaches_is_a_trace_error() -> None:
    net = lt.Model(Masked().eval())
    with pytest.raises(TraceError, match="cannot be known inside the trace"):
        with net.trace(inputs(6)):
            assert net.before.output.shape == (6, 8)  # before the model's masking
            _ = net.after.output.shape
