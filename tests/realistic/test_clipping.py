"""The script clips its own gradients (``clip_grad_norm_`` between ``backward`` and
``optimizer.step()``, as most GPT trainers do): the reported ``grad_norm`` and the
per-parameter gradient norms are those before the clip, exactly the norm
``clip_grad_norm_`` returns, so ``grad_spike`` still sees a spike that the clip hides from
the optimizer; a healthy clipped run raises nothing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from tests.helpers.reports import Reports

STEPS, CLIP = 40, 0.05


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 1))


def train(net: nn.Module, opt: torch.optim.Optimizer, mon: neurotop.Monitor | None,
          spike_at: int | None = None) -> tuple[list[float], list[dict[str, float]]]:
    """The loop; returns each step's pre-clip global norm (``clip_grad_norm_``'s return
    value) and per-parameter norms, read by the test, not by neurotop."""
    gen = torch.Generator().manual_seed(1)
    total, per_param = [], []
    for step in range(STEPS):
        x = torch.randn(32, 16, generator=gen)
        y = x[:, :1] * 2
        if step == spike_at:
            y = y + 300.0  # a batch of outliers: its gradient is ~1000x the usual
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        per_param.append({n: p.grad.norm().item() for n, p in net.named_parameters()})
        total.append(float(nn.utils.clip_grad_norm_(net.parameters(), CLIP)))
        if mon is not None:
            mon.observe(loss=loss)
        opt.step()
    return total, per_param


def watched(tmp_path, spike_at: int | None, **options):
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = neurotop.watch(net, opt, name="clipping", record=tmp_path, **options)
    rep = Reports(mon)
    try:
        total, per_param = train(net, opt, mon, spike_at)
        rep.stats(1 + (mon.step - 1) // mon.report_every * mon.report_every)  # the last
        rep.steps(settle=0.5)  # and the alerts after it
    finally:
        mon.close()
        rep.close()
    return rep, total, per_param


def test_grad_norm_is_the_norm_before_the_scripts_clip(tmp_path):
    rep, total, per_param = watched(tmp_path, None, report_every=4)
    steps = rep.steps(settle=0)
    assert len(steps) >= 8
    assert max(total) > 5 * CLIP  # the clip is active: a post-clip norm would read ~CLIP
    for s in steps:
        st = rep.stats(s)
        np.testing.assert_allclose(st.scalars["grad_norm"], total[s - 1], rtol=1e-4)
        rows = rep.params(s)
        for name, norm in per_param[s - 1].items():
            np.testing.assert_allclose(rows[name]["grad_norm"], norm, rtol=1e-4)
    assert rep.events("alert") == []  # a healthy clipped run raises nothing


def test_grad_spike_fires_on_a_spike_the_clip_hides(tmp_path):
    rep, total, _ = watched(tmp_path, spike_at=29, report_every=1)
    assert total[29] > 100 * np.median(total[:29])
    spikes = [a for a in rep.events("alert") if a["alert"] == "grad_spike"]
    assert [a["step"] for a in spikes] == [30], rep.events("alert")
    np.testing.assert_allclose(spikes[0]["value"], total[29], rtol=1e-4)


def neurotop_hooks(net: nn.Module) -> int:
    """The neurotop post-accumulate-grad hooks on the model's parameters."""
    return sum(type(h).__module__.startswith("neurotop")
               for p in net.parameters() for h in (p._post_accumulate_grad_hooks or {}).values())


def test_parameter_hooks_exist_in_report_windows_only(tmp_path):
    """A non-report step runs no neurotop hook in backward: the parameters' hooks are
    registered as a report window opens and removed once its report is taken."""
    net = model()
    n = len(list(net.parameters()))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = neurotop.watch(net, opt, name="clipping", record=tmp_path, report_every=4)
    rep = Reports(mon)
    try:
        total: list[float] = []
        gen = torch.Generator().manual_seed(1)
        for _step in range(12):
            report = mon.step % 4 == 0  # this step ends a report window
            assert neurotop_hooks(net) == (n if report else 0), mon.step
            x = torch.randn(32, 16, generator=gen)
            loss = F.mse_loss(net(x), x[:, :1] * 2)
            opt.zero_grad()
            loss.backward()
            total.append(float(nn.utils.clip_grad_norm_(net.parameters(), CLIP)))
            mon.observe(loss=loss)
            opt.step()
        st = rep.stats(9)  # the pre-clip norm, measured by the hooks of that window
        np.testing.assert_allclose(st.scalars["grad_norm"], total[8], rtol=1e-4)
    finally:
        mon.close()
        rep.close()
    assert neurotop_hooks(net) == 0  # ``close`` removes them
