"""Tests for lazytensor/errors.py and the errors a trace raises: each names the user's line.

A replay failure keeps its original type (an ``IndexError`` stays an ``IndexError``) and its
message quotes this file's line and source text; misuse of the API is a ``TraceError``; a node
that can never run is a ``GraphError``; an op outside the allow-list is an
``OpNotAllowedError``. After any failure no hook is left on the model.
"""

from __future__ import annotations

import inspect
import io
import pathlib

import pytest
import torch

import lazytensor as lt
from lazytensor.core.errors import NodeFailure, at_site
from lazytensor.core.site import Site
from lazytensor.tracing.trace import State
from models import TinyMLP, Zoo

THIS_FILE = pathlib.Path(__file__).name


def inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(7))


def here() -> int:
    """The caller's line number."""
    return inspect.currentframe().f_back.f_lineno


def assert_no_hooks(module: torch.nn.Module) -> None:
    for name, sub in module.named_modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks, name


def assert_names_line(error: BaseException, line: int, text: str) -> None:
    message = str(error)
    assert f"{THIS_FILE}:{line}" in message, message
    assert text in message, message


@pytest.fixture
def net(tiny_mlp: TinyMLP) -> lt.Model:
    return lt.Model(tiny_mlp)


# -- replay failures keep their type and quote the line ----------------------------------------


def test_out_of_range_index_quotes_the_line(net: lt.Model) -> None:
    with pytest.raises(IndexError) as info:
        with net.trace(inputs(2)):
            line = here() + 1
            net.layer1.output[:, 16] = 5.0
    assert_names_line(info.value, line, "net.layer1.output[:, 16] = 5.0")
    assert "out of bounds" in str(info.value) and "16" in str(info.value)
    assert isinstance(info.value.__cause__, IndexError)
    assert_no_hooks(net._module)


def test_shape_mismatch_keeps_its_type_and_quotes_the_line(net: lt.Model) -> None:
    with pytest.raises(RuntimeError) as info:
        with net.trace(inputs(2)):
            line = here() + 1
            net.layer2.output = net.layer2.output @ torch.ones(3, 3)
    assert_names_line(info.value, line, "net.layer2.output @ torch.ones(3, 3)")
    assert_no_hooks(net._module)


def test_a_write_that_needs_a_later_value(net: lt.Model) -> None:
    with pytest.raises(lt.GraphError) as info:
        with net.trace(inputs(2)):
            line = here() + 1
            net.layer1.output[:] = net.layer3.output
    assert_names_line(info.value, line, "net.layer1.output[:] = net.layer3.output")
    assert "layer1.output" in str(info.value)
    assert_no_hooks(net._module)


def test_a_write_through_an_in_place_functional_that_needs_a_later_value(net: lt.Model) -> None:
    # F.relu(..., inplace=True) returns its input: writing into its result writes into
    # layer1's output, which the forward has used by the time layer3's output exists.
    with pytest.raises(lt.GraphError) as info:
        with net.trace(inputs(2)):
            relu = torch.nn.functional.relu(net.layer1.output, inplace=True)
            line = here() + 1
            relu[:, :4] = net.layer3.output
    assert_names_line(info.value, line, "relu[:, :4] = net.layer3.output")
    assert "layer1.output" in str(info.value)


def test_out_arguments_are_refused(net: lt.Model) -> None:
    with pytest.raises(lt.TraceError, match="out= is not supported") as info:
        with net.trace(inputs(2)):
            line = here() + 1
            torch.add(net.layer1.output, 1, out=net.layer1.output)
    assert_names_line(info.value, line, "torch.add(net.layer1.output, 1, out=net.layer1.output)")


def test_an_assignment_that_needs_a_later_value(net: lt.Model) -> None:
    with pytest.raises(lt.GraphError) as info:
        with net.trace(inputs(2)):
            line = here() + 1
            net.layer2.output = net.layer3.output.repeat(1, 4)
    assert_names_line(info.value, line, "net.layer2.output = net.layer3.output.repeat(1, 4)")
    assert "later" in str(info.value)


def test_a_module_never_called(zoo_net: lt.Model) -> None:
    with pytest.raises(lt.GraphError) as info:
        with zoo_net.trace(inputs(2)):
            zoo_net.output.save()
            line = here() + 1
            zoo_net.unused.output.save()
    assert_names_line(info.value, line, "zoo_net.unused.output.save()")
    assert "never called" in str(info.value)
    assert_no_hooks(zoo_net._module)


def test_an_iteration_that_never_happened(zoo_net: lt.Model) -> None:
    with pytest.raises(lt.GraphError) as info:
        with zoo_net.trace(inputs(2)) as tracer:
            for _ in tracer.iter[0:3]:
                line = here() + 1
                zoo_net.block.output.save()
    assert_names_line(info.value, line, "zoo_net.block.output.save()")
    assert "call 2" in str(info.value) and "2 time(s)" in str(info.value)
    assert_no_hooks(zoo_net._module)


@pytest.fixture
def zoo_net() -> lt.Model:
    return lt.Model(Zoo(seed=0).eval())


def test_a_data_dependent_shape_is_a_clear_error(net: lt.Model) -> None:
    with pytest.raises(Exception) as info:
        with net.trace(inputs(2)):
            line = here() + 1
            _ = torch.nonzero(net.layer1.output > 0).shape
    assert_names_line(info.value, line, "torch.nonzero(net.layer1.output > 0).shape")
    assert "depends on tensor values" in str(info.value)
    assert_no_hooks(net._module)


class Masked(torch.nn.Module):
    """Keeps the rows whose sum is positive: its shape depends on the values."""

    def __init__(self) -> None:
        super().__init__()
        self.before = torch.nn.Linear(8, 8)
        self.after = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.before(x)
        return self.after(h[h.sum(-1) > 0])


def test_a_data_dependent_shape_in_the_model_itself() -> None:
    x = inputs(6)
    net = lt.Model(Masked().eval())
    with pytest.raises(lt.TraceError) as info:
        with net.trace(x):
            assert net.before.output.shape == (6, 8)  # reached before the masking
            line = here() + 1
            _ = net.after.output.shape
    assert_names_line(info.value, line, "_ = net.after.output.shape")
    assert "from tensor values" in str(info.value)
    with net.trace(x):
        kept = net.after.output.save()
    with torch.no_grad():
        h = net._module.before(x)
        exact_rows = (h.sum(-1) > 0).sum().item()
    assert kept.shape == (exact_rows, 8)


# -- misuse of the API ------------------------------------------------------------------------


def test_wrong_module_path_lists_close_names(net: lt.Model) -> None:
    with pytest.raises(AttributeError) as info:
        with net.trace(inputs(2)):
            net.layr2.output.save()
    message = str(info.value)
    assert "'layr2'" in message and "did you mean" in message and "'layer2'" in message
    assert "layer1, act, layer2, layer3" in message
    with pytest.raises(AttributeError, match="layer9"):
        net.get("layer9")
    assert_no_hooks(net._module)


def test_module_list_index_out_of_range(zoo_net: lt.Model) -> None:
    with pytest.raises(IndexError, match="out of range.*3 submodules"):
        zoo_net.layers[3]
    with pytest.raises(IndexError):
        zoo_net.layers[-4]
    with pytest.raises(IndexError):
        zoo_net.get("layers.5")


def test_unsaved_proxy_read_after_the_block(net: lt.Model) -> None:
    with net.trace(inputs(2)):
        line = here() + 1
        hidden = net.layer1.output
        net.output.save()
    reads = (lambda: hidden.value, lambda: hidden + 1, lambda: str(hidden), lambda: hidden.shape)
    for read in reads:
        with pytest.raises(lt.TraceError, match="not saved") as info:
            read()
        assert_names_line(info.value, line, "hidden = net.layer1.output")


@pytest.mark.parametrize(
    "op",
    [
        lambda h: torch.fft.fft(h),
        lambda h: h.untyped_storage(),
        lambda h: h.data_ptr(),
        lambda h: torch.cumulative_trapezoid(h),
        lambda h: h.storage_offset(),
    ],
    ids=["torch.fft.fft", "untyped_storage", "data_ptr", "cumulative_trapezoid", "storage_offset"],
)
def test_ops_outside_the_allow_list_are_refused(net: lt.Model, op) -> None:
    with pytest.raises(lt.OpNotAllowedError, match="allow-list"):
        with net.trace(inputs(2)):
            op(net.layer1.output)
    assert_no_hooks(net._module)


def test_torch_save_of_a_proxy_is_refused(net: lt.Model) -> None:
    buffer = io.BytesIO()
    with pytest.raises(lt.TraceError, match="pickled"):
        with net.trace(inputs(2)):
            torch.save(net.layer1.output, buffer)
    assert_no_hooks(net._module)


def test_envoy_outside_a_trace(net: lt.Model, zoo_net: lt.Model) -> None:
    for read in (lambda: net.layer1.output, lambda: net.layer1.input, lambda: net.inputs):
        with pytest.raises(lt.TraceError, match="no trace is active"):
            read()
    with pytest.raises(lt.TraceError, match="no trace is active"):
        net.layer1.output = torch.zeros(1)
    with pytest.raises(lt.TraceError, match="another model"):
        with net.trace(inputs(2)):
            zoo_net.embed.output.save()


def test_recording_after_the_block(net: lt.Model) -> None:
    with net.trace(inputs(2)) as tracer:
        net.output.save()
    with pytest.raises(lt.TraceError, match="done"):
        tracer.read("layer1", "output")
    with pytest.raises(lt.TraceError, match="entered once"):
        with tracer:
            pass


def test_misuse_inside_the_block(net: lt.Model) -> None:
    x, row = inputs(2), inputs(1)
    cases = {
        "cannot set attribute": lambda t: setattr(net.layer1.output, "grad", t),
        "not callable": lambda t: net.layer1.output(),
        "cannot be used inside a trace": lambda t: net.layer1.output + object(),
        "nested": lambda t: t.invoke(row).__enter__(),
    }
    for message, misuse in cases.items():
        with pytest.raises(lt.TraceError, match=message):
            with net.trace(x) as tracer:
                with tracer.invoke(row):
                    misuse(tracer)
    with pytest.raises(AttributeError, match="only .output"):
        net.layer1.weight = torch.zeros(1)
    with pytest.raises(lt.TraceError, match="no inputs"):
        with net.trace():
            net.output.save()


def test_an_exception_inside_the_block_fails_the_trace(net: lt.Model) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with net.trace(inputs(2)) as tracer:
            hidden = net.layer1.output.save()
            _ = hidden.shape  # a shape-only pass ran inside the block
            raise Boom
    assert tracer.state is State.FAILED
    assert_no_hooks(net._module)
    with pytest.raises(lt.TraceError, match="failed"):
        _ = hidden.value
    with pytest.raises(lt.TraceError, match="failed"):
        _ = hidden.shape


def test_a_replay_failure_fails_the_trace(net: lt.Model) -> None:
    with pytest.raises(IndexError):
        with net.trace(inputs(2)) as tracer:
            saved = net.layer1.output.save()
            net.layer2.output[5] = 0.0
    assert tracer.state is State.FAILED
    with pytest.raises(lt.TraceError, match="failed"):
        _ = saved.value


# -- errors.py itself ------------------------------------------------------------------------------


def test_site_quotes_the_source_line() -> None:
    line = here()
    site = Site(__file__, line)
    assert site.source() == "line = here()"
    assert str(site) == f'{__file__}:{line} "line = here()"'
    assert str(Site("/no/such/file.py", 3)) == "/no/such/file.py:3"


def test_at_site_keeps_the_type_and_the_cause() -> None:
    original = ValueError("bad value")
    site = Site(__file__, here())
    error = at_site(original, site, "try this")
    assert type(error) is ValueError
    assert str(error) == f"ValueError at {site}: bad value\n  try this"
    assert error.__cause__ is original
    keyed = at_site(KeyError("k"), site)  # KeyError would quote its message: becomes GraphError
    assert type(keyed) is lt.GraphError and keyed.__cause__.args == ("k",)

    class Picky(Exception):
        def __init__(self, a, b):
            super().__init__(a, b)

    assert type(at_site(Picky(1, 2), None)) is lt.GraphError


def test_node_failure_carries_the_node_and_the_error() -> None:
    error = IndexError("out of range")
    failure = NodeFailure(4, error, "a hint")
    assert (failure.node, failure.error, failure.hint) == (4, error, "a hint")
    assert "node 4" in str(failure) and "IndexError" in str(failure)


def test_error_tree() -> None:
    assert issubclass(lt.StrictModeError, lt.TraceError)
    for cls in (lt.TraceError, lt.GraphError, lt.OpNotAllowedError, lt.ProtocolError):
        assert issubclass(cls, lt.LazytensorError)
    assert issubclass(lt.RemoteError, lt.LazytensorError)
    assert issubclass(lt.NodeFailure, lt.LazytensorError)
