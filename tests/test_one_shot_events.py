"""One-shot events between two report steps (issue 16, item 4): at the default
``report_every`` (10) a real training run gets one batch of shuffled labels at step 155 (the
loss spikes for that step only) and a NaN input at step 200 (the loss is NaN, and the update
poisons every weight). The per-step carry sees both on the device; the alerts name steps 155
and 200, not the next report steps or the first layer, and the NaN does not make every ReLU
"dying" afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from tests.helpers.alerts import recorded

SPIKE, NAN, STEPS = 155, 200, 330


@pytest.mark.slow
def test_a_one_step_spike_and_a_one_step_nan_are_alerted_at_their_steps(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 4, generator=gen)
    runs = tmp_path / "runs"
    with neurotop.watch(model, opt, name="one-shot", record=runs, auto_pause=False) as mon:
        assert mon.report_every == 10
        for _ in range(STEPS):
            step = mon.step + 1  # the step this iteration completes
            x = torch.randn(64, 16, generator=gen)
            y = (x @ teacher).argmax(1)
            if step == SPIKE:  # one bad batch: the labels shuffled
                y = y[torch.randperm(len(y), generator=gen)]
            if step == NAN:
                x[0, 0] = float("nan")
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
    alerts, steps = recorded(runs)
    assert SPIKE not in steps and NAN not in steps  # neither is a report step
    assert steps[-1] == STEPS - 9  # 13 reports after the NaN: longer than the dead window
    got = [(a["alert"], a["step"]) for a in alerts]
    assert got == [("loss_spike", SPIKE), ("nonfinite", NAN)], alerts
    spike, nan = alerts
    assert f"at step {SPIKE}" in spike["message"] and spike["rule"] == "E8"
    assert nan["level"] == "critical" and nan["layer"] == ""
    assert nan["message"] == (f"non-finite loss at step {NAN}; at step {NAN + 1}, layer '0',"
                              " the first in forward order, is non-finite too")
