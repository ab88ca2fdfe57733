"""A hand-written SGD loop with no optimizer object, as in tutorials and research code:
``watch(model)`` and ``mon.step()`` as the step boundary. Reports come at the right steps
with the observed loss, parameter statistics match plain PyTorch (the weights before the
update, the gradients and the update of the step), and pause holds at ``mon.step()``."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import neurotop
from neurotop.tui.data.client import CommandError, Endpoints, LiveClient
from tests.helpers import numpy_reference as ref
from tests.helpers.reports import Reports
from tests.helpers.waiting import wait_until

LR = 0.05


def sgd_step(model: nn.Module, mon, x, y, seen: dict | None = None) -> float:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    mon.observe(loss=loss)
    if seen is not None:
        seen.update({n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()})
    with torch.no_grad():
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-LR)
    mon.step()
    model.zero_grad()
    return float(loss.detach())


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def test_manual_boundary_reports_and_parameter_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = data()
    with neurotop.watch(model, None, report_every=2, record=False) as mon:
        assert mon.optimizer is None
        reports = Reports(mon)
        losses, seen = [], {}
        for k in range(1, 6):
            losses.append(sgd_step(model, mon, x, y, seen if k == 3 else None))
        assert mon.step == 5
        assert reports.steps(last=5)[:3] == [1, 3, 5]
        got = reports.stats(3)
        params = reports.params(3)
        reports.close()
    assert got.scalars["loss"] == pytest.approx(losses[2], rel=1e-6)
    assert list(params) == [n for n, _ in model.named_parameters()]
    total = 0.0
    for n, (before, grad) in seen.items():
        after = before - LR * grad
        want = ref.param_stats(before.numpy(), after.numpy(), grad.numpy(), 4096)
        for s, v in want.items():
            assert params[n][s] == pytest.approx(v, rel=1e-4, abs=1e-7), (n, s)
        total += float((grad.double() ** 2).sum())
    assert got.scalars["grad_norm"] == pytest.approx(np.sqrt(total), rel=1e-5)
    assert np.isnan(got.scalars.get("lr", np.nan))  # no optimizer: no lr scalar


def test_pause_holds_at_the_manual_boundary_and_lr_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = data()
    with neurotop.watch(model, report_every=1, record=False) as mon:
        info = mon.connection
        client = LiveClient(Endpoints(info.telemetry, info.control, info.key_bytes)).start()
        try:
            with pytest.raises(CommandError, match="no optimizer"):
                client.command("set", {"knob": "lr", "value": 0.1}).result(10)
            fut = client.command("pause")
            stop = threading.Event()

            def train() -> None:
                while not stop.is_set():
                    sgd_step(model, mon, x, y)

            t = threading.Thread(target=train, daemon=True)
            t.start()
            ack = fut.result(10)
            assert ack["ok"]
            wait_until(lambda: mon.paused, what="the pause")
            held = mon.step
            assert held == ack["step"]
            time.sleep(0.3)
            assert mon.step == held  # held inside mon.step(): the loop does not advance
            stop.set()
            client.command("resume").result(10)
            t.join(10)
            assert not t.is_alive() and mon.step == held
        finally:
            client.close()


def test_manual_step_refused_when_an_optimizer_is_the_boundary():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with neurotop.watch(model, opt, record=False) as mon:
        with pytest.raises(RuntimeError, match="count each step twice"):
            mon.step()
        assert mon.step == 0
