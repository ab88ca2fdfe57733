"""Activations applied functionally (``F.relu(self.fc1(x))``, as the classic MNIST and VAE
examples do) and custom activation classes: the layer before a functional activation is
marked in the schema (``activations``: ``"F.relu"``) and its dead fraction, which matches
plain PyTorch, raises ``dying_layer`` when units are planted dead; a custom GELU class is an
activation by its name, a wrapper calling ``F.silu`` by what it computes; healthy models
raise nothing, and a logits layer never counts."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from tests.helpers.reports import Reports

STEPS = 30


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """The shape of the MNIST example: functional ReLUs and max-pool, dropout modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, 1), nn.Conv2d(8, 16, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)


class NewGELU(nn.Module):
    """The tanh GELU written out, as minGPT does: no autograd node says "activation"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class Nonlin(nn.Module):
    """A wrapper with an unremarkable name around a functional activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class CustomActs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(16, 64), NewGELU()
        self.fc2, self.act2 = nn.Linear(64, 64), Nonlin()
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def plant_dead(layer: nn.Module, units: int) -> None:
    """Units whose pre-activation is never positive: a bias far below the inputs' reach."""
    with torch.no_grad():
        layer.bias[:units] = -100.0


def run(tmp_path, net: nn.Module, shape: tuple[int, ...], probe: list[str]):
    """Train watched; returns the reports and each probed layer's outputs per step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = neurotop.watch(net, opt, name="functional", record=tmp_path, report_every=2)
    outs: dict[str, list[np.ndarray]] = {n: [] for n in probe}
    mods = dict(net.named_modules())
    for n in probe:
        mods[n].register_forward_hook(
            lambda m, i, o, n=n: outs[n].append(o.detach().numpy().copy()))
    rep = Reports(mon)
    gen = torch.Generator().manual_seed(0)
    per_step = []
    try:
        for _ in range(STEPS):
            x = torch.randn(32, *shape, generator=gen)
            y = torch.randint(0, 4, (32,), generator=gen)
            for o in outs.values():
                o.clear()
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            per_step.append({n: o[0] for n, o in outs.items()})
            opt.step()
        rep.stats(1 + (mon.step - 1) // mon.report_every * mon.report_every)  # the last
        rep.steps(settle=0.5)
    finally:
        mon.close()
        rep.close()
    return rep, per_step


def dead_fraction(a: np.ndarray) -> float:
    """Plain NumPy: units (the last dim, or the channels of NCHW) never positive."""
    axes = (0, 2, 3) if a.ndim == 4 else tuple(range(a.ndim - 1))
    return float(np.mean(a.max(axis=axes) <= 0))


def dying(rep: Reports) -> dict[str, str]:
    return {a["layer"]: a["message"] for a in rep.events("alert") if a["alert"] == "dying_layer"}


def test_mlp_with_functional_relu(tmp_path):
    torch.manual_seed(0)
    net = MLP()
    plant_dead(net.fc1, 48)  # 75 %
    rep, per_step = run(tmp_path, net, (16,), ["fc1", "fc2"])
    last = rep.stats(rep.steps(settle=0)[-1])
    acts = dict(zip(last.schema["layers"], last.schema["activations"], strict=True))
    assert acts == {"fc1": "F.relu", "fc2": "F.relu", "fc3": ""}
    for s in rep.steps(settle=0):
        for n in ("fc1", "fc2"):
            assert rep.stats(s).layer(n)["dead_frac"] == dead_fraction(per_step[s - 1][n])
    assert last.layer("fc1")["dead_frac"] == 0.75
    alerts = dying(rep)
    assert list(alerts) == ["fc1"], rep.events("alert")
    assert "before F.relu" in alerts["fc1"] and "75%" in alerts["fc1"]


def test_cnn_shaped_like_the_mnist_example(tmp_path):
    torch.manual_seed(0)
    net = CNN()
    plant_dead(net.conv2, 15)  # 15 of 16 channels: critical
    rep, per_step = run(tmp_path, net, (1, 14, 14), ["conv1", "conv2", "fc1"])
    last = rep.stats(rep.steps(settle=0)[-1])
    acts = dict(zip(last.schema["layers"], last.schema["activations"], strict=True))
    assert acts == {"conv1": "F.relu", "conv2": "F.relu", "dropout1": "", "fc1": "F.relu",
                    "dropout2": "", "fc2": ""}
    for s in rep.steps(settle=0):
        for n in ("conv1", "conv2", "fc1"):
            assert rep.stats(s).layer(n)["dead_frac"] == dead_fraction(per_step[s - 1][n])
    levels = [a["level"] for a in rep.events("alert") if a["layer"] == "conv2"]
    assert levels == ["critical"], rep.events("alert")
    assert list(dying(rep)) == ["conv2"]


def test_custom_activation_classes(tmp_path):
    torch.manual_seed(0)
    net = CustomActs()
    plant_dead(net.fc1, 40)  # NewGELU(x) <= 0 where x is: 62.5 % of act1 is dead
    rep, per_step = run(tmp_path, net, (16,), ["act1", "act2"])
    last = rep.stats(rep.steps(settle=0)[-1])
    acts = dict(zip(last.schema["layers"], last.schema["activations"], strict=True))
    # Nonlin computes F.silu itself; NewGELU is an activation by its class name, and fc1 is
    # not marked: what follows it is a module, measured on its own.
    assert acts == {"fc1": "", "act1": "", "fc2": "", "act2": "silu", "head": ""}
    for s in rep.steps(settle=0):
        assert rep.stats(s).layer("act1")["dead_frac"] == dead_fraction(per_step[s - 1]["act1"])
    assert last.layer("act1")["dead_frac"] == 0.625
    assert list(dying(rep)) == ["act1"], rep.events("alert")


class BatchNormCNN(nn.Module):
    """Conv, BatchNorm, F.relu: the standard vision block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class TinyGPT(nn.Module):
    """Two pre-LN transformer blocks (attention + GELU MLP) over a sequence of vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(
            32, 4, 64, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(2)])
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.inp(x))).mean(1))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(16, 32, batch_first=True), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def test_healthy_models_raise_nothing(tmp_path):
    """Standard models at PyTorch's default init: no detector may fire on them."""
    torch.manual_seed(0)
    default_mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                nn.Linear(64, 4))
    for k, (net, shape) in enumerate([(MLP(), (16,)), (CNN(), (1, 14, 14)),
                                      (CustomActs(), (16,)), (default_mlp, (16,)),
                                      (BatchNormCNN(), (1, 14, 14)), (TinyGPT(), (8, 16)),
                                      (LSTMNet(), (8, 16))]):
        torch.manual_seed(k)
        rep, _ = run(tmp_path / str(k), net, shape, [])
        assert rep.events("alert") == [], (type(net).__name__, rep.events("alert"))
