"""The per-step carry (``neurotop.training.carry``) on a real CPU training run: each report
carries the largest loss and global gradient norm of the steps since the last report, with
their steps, and the first step whose loss was not finite, equal to the values the loop
computed itself on every step."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from tests.helpers.reports import Reports

SPIKE, NAN, STEPS, EVERY = 15, 27, 40, 10


def test_each_report_carries_the_worst_step_of_its_window():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3), nn.Linear(3, 3, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    losses, norms = {}, {}
    mon = neurotop.watch(model, opt, name="carry", report_every=EVERY, record=False,
                         auto_pause=False)
    reports = Reports(mon)
    try:
        for _ in range(STEPS):
            step = mon.step + 1
            x = torch.randn(16, 8, generator=gen) * (30.0 if step == SPIKE else 1.0)
            loss = F.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=gen))
            opt.zero_grad()
            loss.backward()
            norms[step] = float(np.linalg.norm(np.concatenate(
                [p.grad.numpy().ravel() for p in model.parameters()]).astype(np.float64)))
            losses[step] = loss.item()
            # a float is observed too: at NAN the script's own accounting went wrong
            mon.observe(loss=float("nan") if step == NAN else loss)
            opt.step()
        got = {s: reports.stats(s).scalars for s in range(1, STEPS + 1, EVERY)}
    finally:
        reports.close()
        mon.close()
    losses[NAN] = math.nan
    assert list(got) == [1, 11, 21, 31]  # the first step reports, then every EVERY-th
    for end, scalars in got.items():
        window = range(max(1, end - EVERY + 1), end + 1)
        finite = [s for s in window if math.isfinite(losses[s])]
        top = max(finite, key=losses.__getitem__)
        assert scalars["loss_max"] == np.float32(losses[top])
        assert scalars["loss_max_step"] == top
        assert scalars["loss_nonfinite_step"] == (NAN if NAN in window else -1)
        worst = max(window, key=norms.__getitem__)
        assert scalars["grad_norm_max"] == np.float32(norms[worst]) or math.isclose(
            scalars["grad_norm_max"], norms[worst], rel_tol=1e-5)
        assert scalars["grad_norm_max_step"] == worst
        assert scalars["grad_norm_nonfinite_step"] == -1
    assert got[21]["loss_max_step"] == SPIKE and got[21]["grad_norm_max_step"] == SPIKE
    assert got[31]["loss_nonfinite_step"] == NAN
