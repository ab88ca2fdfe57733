"""The head statistics (issue 16, item 1): softmax collapse in the loss dtype, margins,
entropy and the zero-loss fraction agree with NumPy on known logits, in float32 and in
bfloat16; they reach the report as ``head.*`` scalars; and outside report windows the head
costs nothing (its reducer never runs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import neurotop
from neurotop.service.finalize import HEAD_SCALARS
from neurotop.training.head import HeadStats, loss_dtype, margin_onset
from tests.helpers.alerts import recorded
from tests.helpers.recorded import read_recording


def bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even), kept as float32."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def _rest(z: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the sum and the largest of the terms exp(z_j - z_max) other than the top
    one, each rounded to ``dtype`` as torch computes them."""
    rnd = bf16 if dtype == "bfloat16" else (lambda a: np.asarray(a, np.float32))
    zd = rnd(z)
    e = rnd(np.exp(rnd(zd - zd.max(1, keepdims=True)).astype(np.float64))).astype(np.float64)
    e[np.arange(len(z)), zd.argmax(1)] = 0
    return e.sum(1), e.max(1)


def _half_ulp(dtype: str) -> float:
    return float(torch.finfo(getattr(torch, dtype)).eps) / 2


def reference(z: np.ndarray, dtype: str, targets: np.ndarray) -> dict[str, float]:
    """METRICS.md E4 by hand: a row is collapsed when sum_j exp(z_j - z_max) is exactly 1
    in the loss dtype, i.e. the other terms add up to less than half an ulp of 1 (rows
    where the order of the additions could decide are left out of the data)."""
    rest, _ = _rest(z, dtype)
    collapsed = rest < _half_ulp(dtype)
    top2 = np.sort(z.astype(np.float64), 1)[:, ::-1][:, :2]
    margin = top2[:, 0] - top2[:, 1]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(1)
    has = targets >= 0
    zero = collapsed & (z.argmax(1) == targets) & has
    p10, p50, p90 = np.quantile(margin, [0.1, 0.5, 0.9])
    return {"head.collapse_frac": collapsed.mean(), "head.margin_p10": p10,
            "head.margin_p50": p50, "head.margin_p90": p90, "head.entropy": entropy.mean(),
            "head.zero_loss_frac": zero.sum() / has.sum()}


def known_logits(rows: int = 400, classes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose top-1 margin is spread from 0 to 40: below both onsets, between
    bfloat16's (5.5) and float32's (16.6), and past both; every 7th target is wrong and
    every 11th ignored (-100)."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, (rows, classes)).astype(np.float32)
    top = rng.integers(0, classes, rows)
    z[np.arange(rows), top] = z.max(1) + np.linspace(0, 40, rows, dtype=np.float32)
    targets = top.copy()
    targets[::7] = (top[::7] + 1) % classes
    targets[::11] = -100
    keep = np.ones(rows, bool)
    for dtype in ("float32", "bfloat16"):  # no row where the summation order decides
        rest, top_other = _rest(z, dtype)
        keep &= (rest < 0.9 * _half_ulp(dtype)) | (top_other > 1.1 * _half_ulp(dtype))
    return z[keep], targets[keep]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_statistics_match_numpy(dtype: str):
    z, targets = known_logits()
    head = HeadStats("fc")
    logits = torch.from_numpy(z).to(getattr(torch, dtype))
    zf = logits.float().numpy()  # what the head saw, after its own rounding
    parts = [150, len(z) - 150]  # two calls of the head in one window
    for part, t in zip(torch.split(logits, parts), torch.split(torch.from_numpy(targets), parts),
                       strict=True):
        head.add(part)
        head.add_targets(t)
    got = {k: float(v) for k, v in head.take(torch.device("cpu")).items()}
    want = reference(zf, dtype, targets)
    assert set(got) == set(HEAD_SCALARS)
    for k in HEAD_SCALARS:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    # The rule is the dtype's: bfloat16 collapses rows that float32 still resolves.
    assert 0 < want["head.collapse_frac"] < 1
    assert head.schema() == {"name": "fc", "classes": 6, "dtype": dtype,
                             "margin_onset": pytest.approx(margin_onset(logits.dtype))}


def test_onsets_are_metrics_md_values():
    assert margin_onset(torch.float32) == pytest.approx(16.6, abs=0.05)
    assert margin_onset(torch.float16) == pytest.approx(7.6, abs=0.05)
    assert margin_onset(torch.bfloat16) == pytest.approx(5.5, abs=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cross_entropy autocasts to float32
        assert loss_dtype(torch.zeros(2, 3, dtype=torch.bfloat16)) == torch.float32
    assert loss_dtype(torch.zeros(2, 3, dtype=torch.bfloat16)) == torch.bfloat16


def test_targets_that_do_not_match_the_rows_give_no_zero_loss_fraction():
    head = HeadStats("fc")
    head.add(torch.randn(8, 4))
    head.add_targets(torch.zeros(5, dtype=torch.long))
    out = head.take(torch.device("cpu"))
    assert "head.zero_loss_frac" not in out and "head.collapse_frac" in out


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.lm_head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(x))


def train(mon: neurotop.Monitor, model: nn.Module, opt: torch.optim.Optimizer, steps: int,
          *, observe_logits: bool = False) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        if observe_logits:
            mon.observe(loss=loss, logits=logits, targets=y)
        else:
            mon.observe(loss=loss, targets=y)
        opt.step()


@pytest.mark.parametrize("how", ["hook", "observe"])
def test_head_scalars_reach_the_recording_and_cost_nothing_between_reports(tmp_path, how):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    head = {"head": "lm_head"} if how == "hook" else {}
    steps, every = 50, 10
    with neurotop.watch(model, opt, record=tmp_path, report_every=every, **head) as mon:
        train(mon, model, opt, steps, observe_logits=how == "observe")
        reductions, reports = mon._head.reductions, mon._reports
    # One reduction per report (one forward each), none on the other 45 steps.
    assert reductions == reports == 1 + steps // every - 1
    rec = read_recording(next(tmp_path.glob("*/session.ntop")))
    assert rec.schema["head"]["name"] == ("lm_head" if how == "hook" else "logits")
    assert rec.schema["head"]["classes"] == 5
    for k in HEAD_SCALARS:
        v = rec.scalar(k)
        assert len(v) == reports and np.all(np.isfinite(v)), k
    ent = rec.scalar("head.entropy")
    assert np.all((0 < ent) & (ent <= math.log(5)))
    assert np.all(rec.scalar("head.collapse_frac") == 0)  # a healthy start
    alerts, _ = recorded(tmp_path)
    assert not [a for a in alerts if a["alert"] in ("softmax_collapse", "overconfidence")]


def test_bad_head_is_one_clear_error(tmp_path):
    model = Net()
    with pytest.raises(ValueError, match="no such module"):
        neurotop.watch(model, record=False, head="lm_haed")
    with pytest.raises(ValueError, match="needs the head's logits"):
        with neurotop.watch(model, record=False) as mon:
            mon.observe(targets=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="without watch"):
        with neurotop.watch(model, record=False, head=model.lm_head) as mon:
            mon.observe(logits=torch.zeros(3, 5))


def test_under_torch_compile_the_head_hook_breaks_no_graph(tmp_path):
    """Plain steps run the graph compiled without neurotop (the hook reads one flag and
    returns); report steps run eagerly and still reduce the head."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def run(watched: bool) -> tuple[int, int, int]:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = neurotop.watch(model, opt, record=tmp_path / str(watched), report_every=5,
                             head="lm_head") if watched else None
        net = torch.compile(model, backend="eager")
        try:
            for _ in range(12):
                x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                if mon:
                    mon.observe(loss=loss, targets=y)
                opt.step()
        finally:
            if mon:
                mon.close()
        return (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"],
                mon._head.reductions if mon else 0)

    plain, watched = run(False), run(True)
    assert watched[0] == plain[0] == 0
    assert watched[1] == plain[1]
    assert watched[2] == 3  # the report steps' forwards: steps 1, 6 and 11
