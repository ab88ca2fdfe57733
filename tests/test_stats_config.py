"""Which layers are measured, and how options are checked (no training needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurotop
from neurotop.config import Config, ConfigError
from neurotop.training.layers import select_layers, unit_dim_for


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 8), nn.GELU())

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv1d(8, 8, 3)
        self.head = nn.Linear(8, 2)


def names(specs, kind=None):
    return [s.name for s in specs if kind is None or s.kind == kind]


def test_leaves_and_residual_blocks_by_default():
    specs = select_layers(Net(), Config())
    assert names(specs, "block") == ["layers.0", "layers.1"]
    assert names(specs, "leaf") == ["embed", "layers.0.norm", "layers.0.mlp.0", "layers.0.mlp.1",
                                    "layers.1.norm", "layers.1.mlp.0", "layers.1.mlp.1", "conv",
                                    "head"]
    # The backprop signal is measured on the residual stream when there is one.
    assert [s.name for s in specs if s.signal] == ["layers.0", "layers.1"]


def test_selection_by_type_glob_and_exclusion():
    specs = select_layers(Net(), Config(layer_types=("Linear",), exclude=("head",), blocks=()))
    assert names(specs) == ["embed", "layers.0.mlp.0", "layers.1.mlp.0"]
    specs = select_layers(Net(), Config(layers=("layers.1.*",), blocks=("layers.1",),
                                        signal_layers=("*.norm",), hist_layers=("*mlp.1",)))
    assert names(specs) == ["layers.1", "layers.1.norm", "layers.1.mlp.0", "layers.1.mlp.1"]
    assert [s.name for s in specs if s.signal] == ["layers.1.norm"]
    assert [s.name for s in specs if s.hist] == ["layers.1.mlp.1"]


def test_units_are_channels_for_conv_outputs_and_the_last_dim_otherwise():
    by_name = {s.name: s for s in select_layers(Net(), Config(unit_dim={"embed": 0}))}
    assert unit_dim_for(by_name["conv"], 3) == 1  # (N, C, L)
    assert unit_dim_for(by_name["head"], 3) == 2  # (B, T, features)
    assert unit_dim_for(by_name["head"], 4) == 1  # (N, C, H, W) after any module
    assert unit_dim_for(by_name["embed"], 2) == 0  # configured


def test_bad_options_are_refused_with_the_reason():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="unknown option.*'report_evry'"):
        neurotop.watch(model, opt, report_evry=5)
    with pytest.raises(ConfigError, match=r"stats: unknown \['kurt'\]"):
        neurotop.watch(model, opt, stats=["mean", "kurt"])
    with pytest.raises(ConfigError, match="report_every must be an integer >= 1"):
        neurotop.watch(model, opt, report_every=0)
    with pytest.raises(ConfigError, match="hist_exponents"):
        Config(hist_exponents=(4, 2))
    assert Config(stats=("std", "mean")).stats == ("mean", "std")  # canonical order
    assert Config().replace(report_every=3).to_dict()["report_every"] == 3
