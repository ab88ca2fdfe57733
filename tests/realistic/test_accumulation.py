"""Gradient accumulation over 4 micro-batches, with ``observe`` inside the micro-loop (the
micro-batch's own loss, before dividing it by 4): each report's loss is the true mean loss
of its optimizer step as plain PyTorch computes it, user scalars are averaged alike, and
training itself is exactly what it is without neurotop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from neurotop.tui.data.replay_source import ReplaySource

MICRO, STEPS = 4, 23


def train(model: nn.Module, opt: torch.optim.Optimizer, mon=None) -> list[float]:
    """The loop; returns each optimizer step's mean micro-batch loss (read by the test)."""
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x = torch.randn(64, 8, generator=gen)
        y = x.sum(1, keepdim=True)
        micro = []
        for i, (xm, ym) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO), strict=True)):
            loss = F.mse_loss(model(xm), ym)
            (loss / MICRO).backward()
            micro.append(loss.detach())
            if mon is not None:
                mon.observe(loss=loss, micro=float(i))
        opt.step()
        opt.zero_grad()
        losses.append(torch.stack(micro).mean().item())
    return losses


def test_observe_in_the_micro_loop_reports_the_true_loss(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    plain = copy.deepcopy(model)
    reference = train(plain, torch.optim.SGD(plain.parameters(), lr=0.01))

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = neurotop.watch(model, opt, name="accumulation", report_every=3, record=tmp_path)
    try:
        watched = train(model, opt, mon)
    finally:
        mon.close()
    assert watched == reference, "watching changed the training"
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)

    src = ReplaySource(mon.recorder.path)
    src.load()
    steps, loss = src.store.scalar("loss")
    assert len(steps) >= STEPS // 3
    want = np.array([reference[s - 1] for s in steps], np.float32)
    np.testing.assert_allclose(loss, want, rtol=1e-6)  # not a quarter, not the last micro
    last = np.array([r / MICRO for r in reference])  # what observing `loss / 4` once shows
    assert not np.allclose(loss, last[steps - 1], rtol=0.1)
    _, micro = src.store.scalar("micro")
    assert micro.tolist() == [pytest.approx(1.5)] * len(steps)  # mean of 0, 1, 2, 3
