"""Tests for lazytensor/trace.py on generic modules: every intervention against hand-written hooks.

Each test records an intervention with ``lt.Model(...).trace`` and compares what it saved with
the same intervention written by hand as plain PyTorch hooks (:func:`models.hooked`), exactly:
on CPU the computation is the same, so the bits are too.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import lazytensor as lt
from models import Pair, TinyMLP, Zoo, hooked


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def inputs(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def here() -> int:
    """The caller's line number."""
    return inspect.currentframe().f_back.f_lineno


@pytest.fixture
def zoo() -> Zoo:
    return Zoo(seed=0).eval()


class RealCalls:
    """Counts forward calls of ``module`` on real (not fake, shape-only) tensors."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.real = self.fake = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if isinstance(args[0], FakeTensor):
            self.fake += 1
        else:
            self.real += 1


# -- the issue's snippet and the point ops ---------------------------------------------------


def test_issue_snippet_matches_hooks(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        h = net.layer1.output.save()
        net.layer2.input[:, 0] = 0.0
        net.layer3.output = net.layer3.output * 2
        y = net.output.save()

    seen = {}

    def zero_first_feature(module, args):
        args[0][:, 0] = 0.0

    expected = hooked(
        tiny_mlp,
        x,
        pre=[(tiny_mlp.layer2, zero_first_feature)],
        post=[
            (tiny_mlp.layer1, lambda m, a, out: seen.update(h=out)),
            (tiny_mlp.layer3, lambda m, a, out: out * 2),
        ],
    )
    exact(h, seen["h"])
    exact(y, expected)
    assert not torch.equal(expected, hooked(tiny_mlp, x))  # the interventions did something
    assert h.shape == (3, 16)
    exact(y.sum(), expected.sum())


def test_reading_does_not_change_the_output(tiny_mlp: TinyMLP) -> None:
    x = inputs(4)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        a = net.act.output.save()
        i = net.act.input.save()
        y = net.output.save()
    seen = {}
    expected = hooked(
        tiny_mlp, x, post=[(tiny_mlp.act, lambda m, args, out: seen.update(a=out, i=args[0]))]
    )
    exact(a, seen["a"])
    exact(i, seen["i"])
    exact(y, expected)


def test_inputs_read(zoo: Zoo) -> None:
    x = inputs(2)
    net = lt.Model(zoo)
    with net.trace(x):
        args, kwargs = net.scale.inputs
        first = args[0].save()
        factor = kwargs["factor"].save()
        both = net.scale.inputs.save()
    seen = {}
    hooked(zoo, x, pre_kwargs=[(zoo.scale, lambda m, a, k: seen.update(args=a, kwargs=k))])
    exact(first, seen["args"][0])
    assert factor == seen["kwargs"]["factor"] == 2.0
    (both_args,), both_kwargs = both
    exact(both_args, seen["args"][0])
    assert both_kwargs == seen["kwargs"]


def test_inputs_write_in_place(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        net.layer3.inputs[0][0][:, 2:5] = -1.0
        y = net.output.save()

    def edit(module, args):
        args[0][:, 2:5] = -1.0

    exact(y, hooked(tiny_mlp, x, pre=[(tiny_mlp.layer3, edit)]))


def test_inputs_write_a_keyword_argument_in_place(zoo: Zoo) -> None:
    x = inputs(3)
    net = lt.Model(zoo)
    with net.trace(x):
        net.scale.inputs[1]["factor"] = 5.0
        y = net.output.save()

    def edit(module, args, kwargs):
        kwargs["factor"] = 5.0

    expected = hooked(zoo, x, pre_kwargs=[(zoo.scale, edit)])
    exact(y, expected)
    assert not torch.equal(expected, hooked(zoo, x))


def test_inputs_assign_args_and_kwargs(zoo: Zoo) -> None:
    x = inputs(3)
    net = lt.Model(zoo)
    with net.trace(x):
        net.scale.inputs = ((net.scale.input + 1,), {"factor": -0.5, "shift": 0.25})
        y = net.output.save()

    def replace(module, args, kwargs):
        return (args[0] + 1,), {"factor": -0.5, "shift": 0.25}

    expected = hooked(zoo, x, pre_kwargs=[(zoo.scale, replace)])
    exact(y, expected)
    assert not torch.equal(expected, hooked(zoo, x))


def test_input_assign(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        net.layer2.input = net.layer2.input.flip(-1) * 3
        y = net.output.save()
    expected = hooked(tiny_mlp, x, pre=[(tiny_mlp.layer2, lambda m, a: (a[0].flip(-1) * 3,))])
    exact(y, expected)


def test_output_replace_on_tuple_output(zoo: Zoo) -> None:
    x = inputs(2)
    net = lt.Model(zoo)
    with net.trace(x):
        pair = net.split.output
        net.split.output = Pair(pair.main * 0.5, pair.gate)
        y = net.output.save()

    def halve(module, args, out):
        return Pair(out.main * 0.5, out.gate)

    exact(y, hooked(zoo, x, post=[(zoo.split, halve)]))


def test_attribute_access_and_unpacking_of_a_namedtuple_output(zoo: Zoo) -> None:
    x = inputs(3)
    net = lt.Model(zoo)
    with net.trace(x):
        main = net.split.output.main.save()
        first, gate = net.split.output
        gate = gate.save()
        product = (first * gate).save()
    seen = {}
    hooked(zoo, x, post=[(zoo.split, lambda m, a, out: seen.update(pair=out))])
    exact(main, seen["pair"].main)
    exact(gate, seen["pair"].gate)
    exact(product, seen["pair"].main * seen["pair"].gate)


def test_result_is_the_return_value(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    net = lt.Model(tiny_mlp)
    with net.trace(x) as tracer:
        net.layer3.output = net.layer3.output + 1.0
        result = tracer.result.save()
        output = net.output.save()
    expected = hooked(tiny_mlp, x, post=[(tiny_mlp.layer3, lambda m, a, out: out + 1.0)])
    exact(result, expected)
    exact(output, expected)


def test_save_function_and_value(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        h = lt.save(net.layer2.output)
        same = net.layer2.output
        assert lt.save(same) is same
    seen = {}
    hooked(tiny_mlp, x, post=[(tiny_mlp.layer2, lambda m, a, out: seen.update(h=out))])
    assert type(h) is torch.Tensor
    exact(h, seen["h"])
    exact(same, seen["h"])
    with pytest.raises(TypeError, match="proxy"):
        lt.save(torch.ones(1))


def test_saved_proxies_behave_like_their_values_after_the_block(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        h = net.layer2.output.save()
    real = h
    assert h.shape == real.shape and h.dtype == real.dtype and h.device == real.device
    assert len(h) == 3 and h.ndim == 2
    exact(h + 1, real + 1)
    exact(1 - h, 1 - real)
    exact(h * h, real * real)
    exact(h[1:, ::2], real[1:, ::2])
    exact(h[-1], real[-1])
    exact(torch.relu(h), torch.relu(real))
    exact(torch.cat([h, h]), torch.cat([real, real]))
    exact(torch.stack(Pair(h, h)), torch.stack([real, real]))  # a namedtuple of proxies
    exact(h.sum(-1), real.sum(-1))
    exact(h.softmax(-1), real.softmax(-1))
    assert float(h[0, 0]) == float(real[0, 0])
    assert h.tolist() == real.tolist()
    assert str(h) == str(real)
    assert isinstance(h + 1, torch.Tensor)


# -- shapes without running the model ----------------------------------------------------------


def test_shape_dtype_device_len_do_not_run_the_model(tiny_mlp: TinyMLP) -> None:
    x = inputs(5)
    net = lt.Model(tiny_mlp)
    calls = RealCalls(tiny_mlp)
    try:
        with net.trace(x):
            h = net.layer1.output
            shape, dtype, device, length = h.shape, h.dtype, h.device, len(h)
            half = h[..., : h.shape[-1] // 2].save()
            size = h.size(-1)
            ndim = h.ndim
            assert calls.real == 0  # answered by a shape-only pass
        assert calls.real == 1  # the one real forward at the end of the block
    finally:
        calls.handle.remove()
    assert calls.fake == 0  # a shape-only pass keeps the user's own hooks away
    assert (shape, dtype, device, length) == (torch.Size([5, 16]), torch.float32, x.device, 5)
    assert (size, ndim) == (16, 2)
    seen = {}
    hooked(tiny_mlp, x, post=[(tiny_mlp.layer1, lambda m, a, out: seen.update(h=out))])
    exact(half, seen["h"][..., :8])


def test_shape_of_computed_values_and_tuple_outputs(zoo: Zoo) -> None:
    net = lt.Model(zoo)
    with net.trace(inputs(3)):
        pair = net.split.output
        assert len(pair) == 2
        assert pair.main.shape == (3, 8)
        joined = torch.cat([pair.main, pair.gate], dim=-1)
        assert joined.shape == (3, 16)
        assert joined.T.shape == (16, 3)
        assert joined[None, ..., 1:].shape == (1, 3, 15)
        assert net.output.shape == (3, 4)


def test_shape_inside_an_invoke_is_that_invokes_rows(tiny_mlp: TinyMLP) -> None:
    a, b = inputs(2), inputs(3, seed=2)
    net = lt.Model(tiny_mlp)
    with net.trace() as tracer:
        with tracer.invoke(a):
            assert net.layer1.output.shape == (2, 16)
        with tracer.invoke(b):
            assert net.layer1.output.shape == (3, 16)
        with tracer.invoke():
            assert net.layer1.output.shape == (5, 16)


# -- several invokes: one batched forward ------------------------------------------------------


def test_invokes_see_and_write_only_their_rows(tiny_mlp: TinyMLP) -> None:
    a, b = inputs(2), inputs(3, seed=2)
    net = lt.Model(tiny_mlp)
    with net.trace() as tracer:
        with tracer.invoke(a):
            ha = net.layer1.output.save()
            net.layer2.input[:, 0] = 0.0
            ya = net.output.save()
        with tracer.invoke(b):
            hb = net.layer1.output.save()
            net.layer3.output = net.layer3.output * 2
            yb = net.output.save()
        with tracer.invoke():
            everything = net.output.save()
            h_all = net.layer1.output.save()

    # The oracle: the same hooks on the concatenated batch, each touching its own rows.
    def zero(module, args):
        args[0][:2, 0] = 0.0

    def double(module, args, out):
        return torch.cat([out[:2], out[2:] * 2])

    seen = {}
    post = [(tiny_mlp.layer3, double), (tiny_mlp.layer1, lambda m, a, o: seen.update(h=o))]
    expected = hooked(tiny_mlp, torch.cat([a, b]), pre=[(tiny_mlp.layer2, zero)], post=post)
    exact(everything, expected)
    exact(h_all, seen["h"])
    assert ya.shape == (2, 4) and yb.shape == (3, 4)
    exact(ya, expected[:2])
    exact(yb, expected[2:])
    exact(ha, seen["h"][:2])
    exact(hb, seen["h"][2:])

    # Each invoke also matches its input run alone (up to matmul blocking across batch sizes).
    def zero_alone(module, args):
        args[0][:, 0] = 0.0

    alone_a = hooked(tiny_mlp, a, pre=[(tiny_mlp.layer2, zero_alone)])
    alone_b = hooked(tiny_mlp, b, post=[(tiny_mlp.layer3, lambda m, args, out: out * 2)])
    torch.testing.assert_close(ya, alone_a)
    torch.testing.assert_close(yb, alone_b)


def test_patching_across_invokes(tiny_mlp: TinyMLP) -> None:
    clean_x, corrupt_x = inputs(2), inputs(2, seed=3)
    net = lt.Model(tiny_mlp)
    with net.trace() as tracer:
        with tracer.invoke(clean_x):
            clean = net.layer2.output[:, :4]
        with tracer.invoke(corrupt_x):
            net.layer2.output[:, :4] = clean
            patched = net.output.save()

    def patch(module, args, out):
        out[2:, :4] = out[:2, :4]

    expected = hooked(tiny_mlp, torch.cat([clean_x, corrupt_x]), post=[(tiny_mlp.layer2, patch)])
    exact(patched, expected[2:])
    assert not torch.equal(patched, hooked(tiny_mlp, corrupt_x))


def test_patching_with_a_value_saved_by_an_earlier_trace(tiny_mlp: TinyMLP) -> None:
    clean_x, corrupt_x = inputs(2), inputs(2, seed=3)
    net = lt.Model(tiny_mlp)
    with net.trace(clean_x):
        clean = net.layer2.output[:, :4].save()
    with net.trace(corrupt_x) as tracer:
        net.layer2.output[:, :4] = clean  # a real tensor now: a constant of this graph
        patched = net.output.save()
    assert any(c is clean for c in tracer.graph.constants)
    seen = {}
    hooked(tiny_mlp, clean_x, post=[(tiny_mlp.layer2, lambda m, a, out: seen.update(h=out))])

    def patch(module, args, out):
        out[:, :4] = seen["h"][:, :4]

    exact(patched, hooked(tiny_mlp, corrupt_x, post=[(tiny_mlp.layer2, patch)]))


def test_invokes_batch_keyword_inputs_and_equal_non_tensor_inputs(zoo: Zoo) -> None:
    a, b = inputs(1), inputs(2, seed=2)
    net = lt.Model(zoo)
    with net.trace() as tracer:
        with tracer.invoke(x=a, factor=3.0):
            ya = net.output.save()
        with tracer.invoke(x=b, factor=3.0):
            net.block.output[:] = 0.0
            yb = net.output.save()

    calls = []

    def zero_rows(module, args, out):  # outside tracer.iter, .output means the first call
        calls.append(out)
        if len(calls) == 1:
            out[1:] = 0.0

    expected = hooked(zoo, x=torch.cat([a, b]), factor=3.0, post=[(zoo.block, zero_rows)])
    exact(ya, expected[:1])
    exact(yb, expected[1:])
    with pytest.raises(lt.TraceError, match="differ"):
        with net.trace() as tracer:
            with tracer.invoke(a, 1.0):
                net.output.save()
            with tracer.invoke(b, 2.0):
                net.output.save()


# -- module calls, ModuleList, paths ------------------------------------------------------------


def test_calling_modules_inside_a_trace(tiny_mlp: TinyMLP) -> None:
    x = inputs(3)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        skipped = net.layer3(net.layer1.output).save()
        again = net.layer3(net.layer2.output).save()
        y = net.output.save()
    seen = {}
    post = [
        (tiny_mlp.layer1, lambda m, a, o: seen.update(h1=o)),
        (tiny_mlp.layer2, lambda m, a, o: seen.update(h2=o)),
    ]
    expected = hooked(tiny_mlp, x, post=post)
    with torch.no_grad():
        exact(skipped, tiny_mlp.layer3(seen["h1"]))
        exact(again, tiny_mlp.layer3(seen["h2"]))
    exact(y, expected)  # the extra calls changed nothing


def test_module_calls_inside_a_trace_do_not_fire_its_point_nodes(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        lens = net.layer3(net.layer1.output).save()
        net.layer3.output = net.layer3.output + 100.0
        y = net.output.save()
    expected = hooked(tiny_mlp, x, post=[(tiny_mlp.layer3, lambda m, a, o: o + 100.0)])
    exact(y, expected)
    with torch.no_grad():
        exact(lens, tiny_mlp.layer3(tiny_mlp.layer1(x)))


def test_module_list_indexing_iteration_len_and_get(zoo: Zoo) -> None:
    x = inputs(3)
    net = lt.Model(zoo)
    assert len(net.layers) == 3
    assert net.layers[-1].path == "layers.2" and net.layers[-3].path == "layers.0"
    assert [envoy.path for envoy in net.layers] == ["layers.0", "layers.1", "layers.2"]
    assert net.get("layers.1") is net.layers[1]
    assert net.get("split.up") is net.split.up
    assert net.get("") is net
    with net.trace(x):
        every = [layer.output.save() for layer in net.layers]
        last = net.layers[-1].output.save()
        net.get("layers.1").output[:] = 0.0
        y = net.output.save()
    seen = {}

    def record(i):
        return lambda m, a, out: seen.__setitem__(i, out)

    def zero(m, a, out):
        out[:] = 0.0

    post = [(layer, record(i)) for i, layer in enumerate(zoo.layers)] + [(zoo.layers[1], zero)]
    expected = hooked(zoo, x, post=post)
    for i, saved in enumerate(every):
        exact(saved, seen[i])
    exact(last, seen[2])
    assert every[1].abs().sum() == 0
    exact(y, expected)


# -- modules called more than once: iter and all -------------------------------------------------


def test_iter_selects_the_nth_call(zoo: Zoo) -> None:
    x = inputs(3)
    net = lt.Model(zoo)
    with net.trace(x) as tracer:
        first = net.block.output.save()  # outside iter: the first call
        outs = []
        for step in tracer.iter[0:2]:
            outs.append(net.block.output.save())
            if step == 1:
                net.block.input[:] = net.block.input * -1
        y = net.output.save()
    seen = []

    def negate_second(module, args):
        if len(seen) == 1:
            return (args[0] * -1,)

    expected = hooked(
        zoo,
        x,
        pre=[(zoo.block, negate_second)],
        post=[(zoo.block, lambda m, a, out: seen.append(out))],
    )
    assert len(seen) == 2
    exact(first, seen[0])
    exact(outs[0], seen[0])
    exact(outs[1], seen[1])
    exact(y, expected)


def test_iter_with_one_step(zoo: Zoo) -> None:
    x = inputs(2)
    net = lt.Model(zoo)
    with net.trace(x) as tracer:
        for _ in tracer.iter[1]:
            second = net.block.input.save()
    seen = []
    hooked(zoo, x, pre=[(zoo.block, lambda m, args: seen.append(args[0]))])
    exact(second, seen[1])


def test_all_applies_at_every_call(zoo: Zoo) -> None:
    x = inputs(3)
    net = lt.Model(zoo)
    with net.trace(x) as tracer:
        with tracer.all():
            net.block.output[:] *= 0.5
        y = net.output.save()

    def halve(module, args, out):
        out[:] *= 0.5

    expected = hooked(zoo, x, post=[(zoo.block, halve)])
    exact(y, expected)
    calls = []

    def halve_first(module, args, out):
        calls.append(out)
        return out * 0.5 if len(calls) == 1 else None

    assert not torch.equal(expected, hooked(zoo, x, post=[(zoo.block, halve_first)]))


def test_all_replacement_uses_each_calls_own_value(zoo: Zoo) -> None:
    x = inputs(2)
    net = lt.Model(zoo)
    with net.trace(x) as tracer:
        with tracer.all():
            net.block.output = net.block.output + net.block.input
        y = net.output.save()
    expected = hooked(zoo, x, post=[(zoo.block, lambda m, args, out: out + args[0])])
    exact(y, expected)


# -- materialization: a sync point inside the trace ----------------------------------------------


def test_materialization_returns_real_values_and_the_graph_still_runs(
    tiny_mlp: TinyMLP, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    x = inputs(3)
    net = lt.Model(tiny_mlp)
    seen = {}
    post = [
        (tiny_mlp.layer1, lambda m, a, out: seen.update(h=out)),
        (tiny_mlp.layer3, lambda m, a, out: out - 1.0),
    ]
    expected = hooked(tiny_mlp, x, post=post)
    h_ref = seen["h"]
    with caplog.at_level(logging.WARNING, logger="lazytensor"):
        with net.trace(x):
            h = net.layer1.output
            item = h.sum().item()
            positive = bool(h.sum() > 0)
            rows = h.tolist()
            number = float(h[0, 0])
            text = f"{h.sum():.3f}"
            print(h)
            net.layer3.output = net.layer3.output - 1.0  # recorded after the sync points
            y = net.output.save()
    assert item == h_ref.sum().item()
    assert positive == bool(h_ref.sum() > 0)
    assert rows == h_ref.tolist()
    assert number == float(h_ref[0, 0])
    assert text == f"{h_ref.sum():.3f}"
    assert capsys.readouterr().out == f"{h_ref}\n"
    exact(y, expected)
    records = [r for r in caplog.records if r.name == "lazytensor"]
    assert len(records) == 6
    assert all("test_trace.py" in r.getMessage() for r in records)


def test_materialization_sees_earlier_writes(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    net = lt.Model(tiny_mlp)
    with net.trace(x):
        net.layer1.output[:] = 0.0
        total = net.layer2.output.sum().item()
    with torch.no_grad():
        expected = tiny_mlp.layer2(torch.zeros(2, 16)).sum().item()
    assert total == expected


def test_materialization_stops_the_forward_once_the_value_exists(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    net = lt.Model(tiny_mlp)
    first, last = RealCalls(tiny_mlp.layer1), RealCalls(tiny_mlp.layer3)
    try:
        with net.trace(x):
            net.layer1.output.sum().item()
            assert (first.real, last.real) == (1, 0)
            net.layer2.output.sum().item()
            assert (first.real, last.real) == (2, 0)
            net.output.save()
        assert (first.real, last.real) == (3, 1)
    finally:
        first.handle.remove()
        last.handle.remove()


def test_materialization_warns_once_per_call_site(
    tiny_mlp: TinyMLP, caplog: pytest.LogCaptureFixture
) -> None:
    net = lt.Model(tiny_mlp)
    with caplog.at_level(logging.WARNING, logger="lazytensor"):
        with net.trace(inputs(2)):
            values = [net.layer1.output[0, i].item() for i in range(3)]
            line = here() - 1
    records = [r for r in caplog.records if r.name == "lazytensor"]
    assert len(values) == 3 and len(set(values)) == 3
    assert len(records) == 1
    assert f"test_trace.py:{line}" in records[0].getMessage()


def test_strict_mode_raises_at_the_users_line(tiny_mlp: TinyMLP) -> None:
    net = lt.Model(tiny_mlp)
    calls = RealCalls(tiny_mlp)
    try:
        with pytest.raises(lt.StrictModeError) as info:
            with net.trace(inputs(2), strict=True):
                h = net.layer1.output
                line = here() + 1
                h.sum().item()
    finally:
        calls.handle.remove()
    assert f"test_trace.py:{line}" in str(info.value)
    assert "h.sum().item()" in str(info.value)
    assert calls.real == 0


def test_strict_mode_allows_shapes(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    net = lt.Model(tiny_mlp)
    with net.trace(x, strict=True):
        h = net.layer1.output
        half = h[:, : h.shape[-1] // 2].save()
    seen = {}
    hooked(tiny_mlp, x, post=[(tiny_mlp.layer1, lambda m, a, out: seen.update(h=out))])
    exact(half, seen["h"][:, :8])


def test_all_reads_keep_the_last_calls_value_and_iter_steps_materialize(zoo: Zoo) -> None:
    x = inputs(3)
    net = lt.Model(zoo)
    with net.trace(x) as tracer:
        with tracer.all():
            last = net.block.output.save()
            doubled = (net.block.output * 2).save()
        totals = []
        for _ in tracer.iter[0:2]:
            totals.append(net.block.input.sum().item())
    outs, ins = [], []
    hooked(
        zoo,
        x,
        pre=[(zoo.block, lambda m, args: ins.append(args[0]))],
        post=[(zoo.block, lambda m, a, out: outs.append(out))],
    )
    exact(last, outs[1])
    exact(doubled, outs[1] * 2)
    assert totals == [ins[0].sum().item(), ins[1].sum().item()]


def test_root_input_given_by_keyword_and_iterating_a_proxy(zoo: Zoo) -> None:
    x = inputs(3)
    net = lt.Model(zoo)
    with net.trace(x=x):
        first = net.input.save()
        net.input = net.input.flip(0)
        rows = [row.sum().save() for row in net.embed.output]
        y = net.output.save()
    exact(first, x)
    exact(y, hooked(zoo, x=x.flip(0)))
    seen = {}
    hooked(zoo, x.flip(0), post=[(zoo.embed, lambda m, a, out: seen.update(h=out))])
    assert len(rows) == 3
    for i, row in enumerate(rows):
        exact(row, seen["h"][i].sum())


class Positions(torch.nn.Module):
    """A module whose forward builds a tensor with a factory (as models build position ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + torch.arange(8)


def test_a_trace_inside_another_models_trace(tiny_mlp: TinyMLP) -> None:
    x = inputs(2)
    inner_module = Positions().eval()
    outer, inner = lt.Model(tiny_mlp), lt.Model(inner_module)
    with outer.trace(x):
        hidden = outer.layer1.output.save()
        with inner.trace(x):  # its run must not be recorded by the enclosing trace
            inner.proj.output[:] = 0.0
            result = inner.output.save()
        outer.layer2.output = outer.layer2.output * 2
        y = outer.output.save()
    assert type(result) is torch.Tensor
    exact(result, torch.arange(8).expand(2, 8).float())
    seen = {}
    expected = hooked(
        tiny_mlp,
        x,
        post=[
            (tiny_mlp.layer1, lambda m, a, out: seen.update(h=out)),
            (tiny_mlp.layer2, lambda m, a, out: out * 2),
        ],
    )
    exact(hidden, seen["h"])
    exact(y, expected)


# -- operators on proxies: the recording fast path ------------------------------------------------


def test_operators_record_what_apply_records() -> None:
    net, weight = lt.Model(TinyMLP()), torch.ones(16, 16)
    with net.trace(inputs(2)) as tracer:
        h = net.layer1.output
        line = here() + 1
        kept = [h * 2.0, 1 - h, h + h, h @ weight, h * h.sum(), 0.5**h]
        for proxy in kept:
            proxy.save()
    nodes = tracer.graph.nodes
    ref, const = lt.core.graph.Ref, lt.core.graph.Const
    assert [(n.target, n.args, n.deps()) for n in nodes[1:]] == [
        ("operator.mul", (ref(0), 2.0), (0,)),
        ("operator.sub", (1, ref(0)), (0,)),
        ("operator.add", (ref(0), ref(0)), (0,)),
        ("operator.matmul", (ref(0), const(0)), (0,)),  # a tensor: recorded by apply
        ("sum", (ref(0),), (0,)),
        ("operator.mul", (ref(0), ref(5)), (0, 5)),
        ("operator.pow", (0.5, ref(0)), (0,)),
    ]
    assert {(site.file, site.line) for site in tracer.graph.sites[1:]} == {(__file__, line)}
    with torch.no_grad():
        x = TinyMLP().layer1(inputs(2))  # (2, 16); the same seed, the same weights
    expected = [x * 2.0, 1 - x, x + x, x @ weight, x * x.sum(), 0.5**x]
    for proxy, value in zip(kept, expected, strict=True):
        exact(proxy, value)


def test_an_operator_that_fails_in_the_run_names_the_users_line() -> None:
    net = lt.Model(TinyMLP())
    with pytest.raises(RuntimeError) as caught, net.trace(inputs(2)):
        h = net.layer1.output
        line = here() + 1
        bad = h @ h[:3]  # (2, 16) @ (2, 16)
        bad.save()
    where = f'test_trace.py:{line} "bad = h @ h[:3]  # (2, 16) @ (2, 16)"'
    assert where in str(caught.value) and "cannot be multiplied" in str(caught.value)


def test_the_garbage_collector_waits_while_a_block_is_open() -> None:
    import gc

    net, x = lt.Model(TinyMLP()), inputs(2)
    assert gc.isenabled()
    with net.trace(x):
        inside = gc.isenabled()
        with net.trace(x):  # a second block in the same thread
            net.layer1.output.save()
        after_inner = gc.isenabled()
        net.layer1.output.save()
    assert (inside, after_inner, gc.isenabled()) == (False, False, True)
    with pytest.raises(KeyError), net.trace(inputs(2)):
        raise KeyError("the block failed")
    assert gc.isenabled()
    gc.disable()  # the user's own choice is kept
    try:
        with net.trace(inputs(2)):
            net.layer1.output.save()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_blocks_of_threads_still_collect(monkeypatch) -> None:
    import gc

    from lazytensor.tracing import state

    monkeypatch.setattr(state, "LONGEST_PAUSE", 0.0)
    collected = []
    gc.callbacks.append(lambda phase, info: collected.append(phase))
    try:
        net, x = lt.Model(TinyMLP()), inputs(2)
        with net.trace(x):  # another thread's block, still open ...
            with net.trace(x):  # ... when this one ends: it collects
                net.layer1.output.save()
            assert "start" in collected and not gc.isenabled()
            net.layer1.output.save()
        assert gc.isenabled()
    finally:
        gc.callbacks.pop()
