"""Mixed precision with ``torch.amp.GradScaler`` (on the CPU: bf16 autocast and
``GradScaler("cpu")``), watched with ``watch(..., scaler=scaler)``, with overflows forced by
a backward hook that turns one layer's gradient into Inf on chosen iterations (what an fp16
overflow does): every gradient statistic is in unscaled units and matches plain PyTorch,
``loss_scale`` and ``skipped_steps`` are reported, a skipped iteration is not mixed into the
next step's report, ``amp_skipping`` fires when the scaler keeps skipping (critical when it
skips every step) and a healthy AMP run raises no alert."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from neurotop.protocol import wire
from neurotop.service.controller import Pending
from tests.helpers import numpy_reference as ref
from tests.helpers.reports import Reports


class Net(nn.Module):
    """An MLP whose hidden gradient can be made to overflow on chosen iterations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the watched and the plain run start alike
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)
        self.overflow = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if self.overflow and h.requires_grad:
            h.register_hook(lambda g: torch.full_like(g, math.inf))
        return self.head(F.relu(self.fc2(h)))


def train(net: Net, steps: int, overflow: set[int], mon: neurotop.Monitor | None = None,
          init_scale: float = 2.0 ** 12, each=None) -> list[dict]:
    """The AMP loop; returns what plain PyTorch says at each iteration (read by the test):
    the scale its backward used, the unscaled pre-clip norm, whether the step was skipped,
    and fc2's unscaled output gradient."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10 ** 6)
    if mon is None:
        mon = _null()
    else:
        mon = mon(net, opt, scaler)
    grads: list[torch.Tensor] = []

    def probe(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
        o.register_hook(lambda g: grads.append(g.detach().float().clone()))

    net.fc2.register_forward_hook(probe)
    gen = torch.Generator().manual_seed(3)
    out = []
    for it in range(steps):
        if each is not None:
            each(it)
        x = torch.randn(32, 16, generator=gen)
        y = torch.randint(0, 4, (32,), generator=gen)
        net.overflow = it in overflow
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        grads.clear()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.unscale_(opt)
        norm = float(nn.utils.clip_grad_norm_(net.parameters(), 1e9))
        mon.observe(loss=loss)
        before = [p.detach().clone() for p in net.parameters()]
        scaler.step(opt)
        scaler.update()
        skipped = all(torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
        out.append({"scale": scale, "norm": norm, "skipped": skipped,
                    "dh": (grads[0] / scale).numpy() if grads else None})
    mon.close()
    return out


class _null:
    def observe(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def run_watched(tmp_path, steps: int, overflow: set[int], each=None, **options):
    """Train watched; returns the reports and plain PyTorch's log of the same run."""
    got: dict = {}

    def make(net, opt, scaler):
        got["mon"] = mon = neurotop.watch(net, opt, scaler=scaler, name="amp",
                                          record=tmp_path, **options)
        got["rep"] = Reports(mon)
        return mon

    net = Net()
    log = train(net, steps, overflow, make, each=each and (lambda it: each(got["mon"], it)))
    got["rep"].steps(settle=1.0)
    got["rep"].close()
    return got["mon"], got["rep"], log


def test_unscaled_statistics_scale_and_skips_match_plain_pytorch(tmp_path):
    overflow = {3, 4, 11}
    plain = train(Net(), 24, overflow)
    mon, rep, log = run_watched(tmp_path, 24, overflow, report_every=2, auto_pause=False)
    # Watching changed nothing, and the overflows were real skips.
    np.testing.assert_array_equal([e["norm"] for e in log], [e["norm"] for e in plain])
    assert [i for i, e in enumerate(log) if e["skipped"]] == sorted(overflow)
    taken = [i for i, e in enumerate(log) if not e["skipped"]]  # iteration of each step
    steps = rep.steps(settle=0)
    assert len(steps) >= 8
    for s in steps:
        it = taken[s - 1]
        e = log[it]
        st = rep.stats(s)
        assert st.scalars["loss_scale"] == e["scale"]
        assert st.scalars["skipped_steps"] == sum(1 for i in overflow if i < it)
        np.testing.assert_allclose(st.scalars["grad_norm"], e["norm"], rtol=1e-4)
        # dL/dh of fc2 in unscaled units: ~1e-3, where the scaled value is ~4 (x 2**12)
        g = ref.row_sample(e["dh"], 4096).astype(np.float64)
        want = math.sqrt(np.mean(g * g))
        assert want < 0.05
        np.testing.assert_allclose(st.layer("fc2")["grad_rms"], want, rtol=1e-4)
    assert not [a for a in rep.events("alert") if a["alert"] == "amp_skipping"]


def test_amp_skipping_fires_when_the_scaler_keeps_skipping(tmp_path):
    overflow = set(range(60, 150, 3))  # one iteration in three, from iteration 60
    _, rep, _ = run_watched(tmp_path, 150, overflow, report_every=5)
    alerts = [a for a in rep.events("alert") if a["alert"] == "amp_skipping"]
    assert alerts and alerts[0]["level"] == "warn", rep.events("alert")
    assert alerts[0]["step"] > 40  # not before the skipping began
    assert 0.2 < alerts[0]["value"] < 0.5


def test_amp_skipping_is_critical_when_every_step_is_skipped(tmp_path):
    _, rep, log = run_watched(tmp_path, 100, set(range(20, 100)), report_every=5,
                              auto_pause=False)
    assert sum(e["skipped"] for e in log) == 80
    alerts = [a for a in rep.events("alert") if a["alert"] == "amp_skipping"]
    assert [a["level"] for a in alerts] == ["critical"], rep.events("alert")
    # No optimizer step after step 20, yet the run kept reporting: from 32 skips in a row
    # on, every 5 skips (32, 37, ..., 77), with the skipped steps' (non-finite) gradient norm.
    steps = rep.steps(settle=0)
    assert steps.count(20) == 10
    norms = [dict(zip(rep._schema(m.header["schema_id"])["scalars"], m.arrays[1].tolist(),
                      strict=True))["grad_norm"]
             for m in rep.msgs if m.kind == wire.STATS and m.header["step"] == 20]
    assert len(norms) == 10 and not any(math.isfinite(v) for v in norms), norms


def test_commands_apply_while_every_step_is_skipped(tmp_path):
    acks: list[dict] = []

    def each(mon: neurotop.Monitor, it: int) -> None:
        if it == 40:  # stuck since iteration 20, at step 20
            mon.controller.submit(Pending("s", "stop", {}, "me@host", acks.append))

    mon, _, _ = run_watched(tmp_path, 50, set(range(20, 50)), each=each, auto_pause=False)
    assert [(a["ok"], a["step"]) for a in acks] == [(True, 20)]
    assert mon.should_stop


def test_a_healthy_amp_run_raises_no_alert(tmp_path):
    _, rep, log = run_watched(tmp_path, 150, set(), report_every=5)
    assert not any(e["skipped"] for e in log)
    assert len(rep.steps(settle=0)) >= 30
    assert rep.events("alert") == []
    assert rep.stats(rep.steps(settle=0)[-1]).scalars["skipped_steps"] == 0
