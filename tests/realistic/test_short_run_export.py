"""A 40-step run with a user scalar, recorded and exported before the schema's periodic
resend (every 5 s) ever happens: every CSV column holds its own values, because the agent
sends the schema that labels a report before the report (the first ``observe(myacc=...)``
changes it)."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

import neurotop
from neurotop.tui.data.export import export_csv
from neurotop.tui.data.replay_source import ReplaySource

STEPS, LR = 40, 0.05


def test_user_scalars_land_in_their_own_columns(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    mon = neurotop.watch(model, opt, name="short", report_every=5, record=tmp_path)
    gen = torch.Generator().manual_seed(0)
    losses = {}
    try:
        for step in range(1, STEPS + 1):
            x = torch.randn(32, 8, generator=gen)
            y = (x[:, 0] > 0).long()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss, myacc=1000.0 + step)
            losses[step] = loss.item()
            opt.step()
    finally:
        mon.close()

    out = tmp_path / "csv"
    export_csv(ReplaySource(mon.recorder.path), out)
    with open(out / "scalars.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and "myacc" in rows[0] and "lr" in rows[0]
    for r in rows:
        step = int(r["step"])
        assert float(r["myacc"]) == 1000.0 + step
        assert float(r["lr"]) == pytest.approx(LR)
        assert float(r["loss"]) == pytest.approx(losses[step], rel=1e-6)
