"""Tests for lazytensor/frontend/envoy.py: the envoy tree that stands for a model's modules.

The tree is checked against ``named_modules()`` of a small nested model built here; recording
through envoys is checked by the point nodes it adds to the trace's graph.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lazytensor as lt
from lazytensor.core.errors import TraceError
from lazytensor.core.graph import Ref
from lazytensor.frontend.envoy import Envoy
from models import TinyMLP


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.attn(x))


class Tower(nn.Module):
    """``(B, 4) -> (B, 2)`` through three blocks; ``gone`` is a child slot set to ``None``."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.embed = nn.Linear(4, 4)
            self.layers = nn.ModuleList(Block() for _ in range(3))
            self.register_module("gone", None)
            self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.fixture
def tower() -> Tower:
    return Tower().eval()


@pytest.fixture
def net(tower: Tower) -> lt.Model:
    return lt.Model(tower)


# -- the tree ---------------------------------------------------------------------------------


def test_the_tree_mirrors_named_modules(net: lt.Model, tower: Tower) -> None:
    envoys = net.modules()
    assert [e.path for e in envoys] == [name for name, _ in tower.named_modules()]
    for envoy, (_, module) in zip(envoys, tower.named_modules()):
        assert isinstance(envoy, Envoy) and envoy._module is module
    assert net.path == ""


def test_envoys_are_made_once_per_module(net: lt.Model) -> None:
    assert net.layers[1] is net.layers[1] is net.get("layers.1")
    assert net.layers[1].mlp is net.get("layers.1.mlp")


def test_indexing_by_position_name_and_slice(net: lt.Model) -> None:
    assert net.layers[0].path == "layers.0"
    assert net.layers[-1].path == "layers.2"
    assert [e.path for e in net.layers[1:]] == ["layers.1", "layers.2"]
    assert [e.path for e in net.layers[::-2]] == ["layers.2", "layers.0"]
    assert [e.path for e in net.layers] == ["layers.0", "layers.1", "layers.2"]
    assert net["head"].path == "head"
    assert net.layers[0].mlp[1].path == "layers.0.mlp.1"
    assert len(net) == 3 and len(net.layers) == 3 and len(net.head) == 0  # "gone" is no module


def test_index_errors_say_how_many_submodules_there_are(net: lt.Model) -> None:
    with pytest.raises(IndexError, match="index 3 is out of range .* 3 submodules"):
        _ = net.layers[3]
    with pytest.raises(IndexError, match="-4"):
        _ = net.layers[-4]
    with pytest.raises(KeyError, match="'gone'"):
        _ = net["gone"]


def test_get_walks_a_dotted_path(net: lt.Model) -> None:
    assert net.get("") is net
    assert net.get("layers.2.mlp.0").path == "layers.2.mlp.0"
    assert net.get("layers.-1.attn").path == "layers.2.attn"
    assert net.layers.get("0.mlp") is net.get("layers.0.mlp")
    with pytest.raises(IndexError):
        net.get("layers.7")
    with pytest.raises(AttributeError, match="'weight' is not a submodule"):
        net.get("embed.weight.grad")


def test_other_attributes_come_from_the_module(net: lt.Model, tower: Tower) -> None:
    assert net.embed.in_features == 4
    assert net.head.weight is tower.head.weight
    assert net.training is False


def test_a_wrong_name_lists_close_matches_and_the_submodules(net: lt.Model) -> None:
    with pytest.raises(AttributeError, match="did you mean 'layers'") as caught:
        _ = net.layres
    message = str(caught.value)
    assert "'layres'" in message and "embed, layers" in message and "head" in message
    with pytest.raises(AttributeError, match="submodules are: none") as caught:
        _ = net.head.nothing_like_it
    assert "did you mean" not in str(caught.value)


def test_dunder_lookups_fail_plainly(net: lt.Model) -> None:
    assert not hasattr(net, "__array_interface__")


def test_calling_an_envoy_outside_a_trace_runs_the_module(net: lt.Model, tower: Tower) -> None:
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net.embed(x), tower.embed(x), rtol=0, atol=0)
        torch.testing.assert_close(net(x), tower(x), rtol=0, atol=0)


# -- recording --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["output", "input", "inputs"])
def test_points_outside_a_trace_are_a_trace_error(net: lt.Model, name: str) -> None:
    with pytest.raises(TraceError, match="no trace is active"):
        getattr(net.layers[0], name)
    with pytest.raises(TraceError, match="no trace is active"):
        setattr(net.layers[0], name, 1.0)


def test_points_inside_another_models_trace_are_a_trace_error(net: lt.Model) -> None:
    other = lt.Model(TinyMLP())
    with other.trace(torch.ones(1, 8)):
        with pytest.raises(TraceError, match="another model's"):
            _ = net.embed.output
        other.layer1.output.save()


def test_reads_and_writes_record_point_nodes_at_the_envoys_path(net: lt.Model) -> None:
    with net.trace(torch.ones(2, 4)) as tracer:
        out = net.layers[1].mlp.output
        net.layers[1].mlp.output = out * 2
        net.head.input = net.embed.input
        net.embed.inputs = net.embed.inputs
    points = [(n.op, n.target, n.args) for n in tracer.graph.nodes if n.is_point]
    assert points == [
        ("output", "layers.1.mlp", ()),
        ("set_output", "layers.1.mlp", (Ref(out._node + 1),)),
        ("input", "embed", ()),
        ("set_input", "head", (Ref(3),)),
        ("inputs", "embed", ()),
        ("set_inputs", "embed", (Ref(5),)),
    ]


@pytest.mark.parametrize("name", ["weight", "output_size", "_module", "training"])
def test_only_output_input_and_inputs_can_be_assigned(net: lt.Model, name: str) -> None:
    with pytest.raises(AttributeError, match="only .output, .input and .inputs can be assigned"):
        setattr(net.embed, name, 1)
    with net.trace(torch.ones(1, 4)):
        with pytest.raises(AttributeError, match="can be assigned"):
            setattr(net.embed, name, 1)
        net.output.save()
    assert isinstance(net.embed._module, nn.Linear)
