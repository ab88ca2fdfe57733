"""Representation collapse, reproduced (issue 16, item 3, E11): a siamese encoder trained to
make two noisy views of an input agree, by cosine similarity alone, finds the trivial
solution (every input mapped to one direction: SimSiam without its stop-gradient) and its
features' effective rank on the probe batch falls: ``representation_collapse`` fires at the
encoder's output. Its healthy twin, the same encoder with VICReg's variance and covariance
terms, keeps its rank and raises nothing; so does a supervised classifier learning a
teacher. NC1 (with labels, after zero train error) on known values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import neurotop
from neurotop.service.curvature_rules import PROBE_SCALARS
from neurotop.service.detectors import WARN, AlertRules, Detectors
from tests.helpers.alerts import recorded
from tests.helpers.recorded import read_recording


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # Hessian-vector products crawl with 2 threads on 2 loaded cores
    yield
    torch.set_num_threads(n)


def siamese_loss(z1: torch.Tensor, z2: torch.Tensor, vicreg: bool) -> torch.Tensor:
    loss = -nn.functional.cosine_similarity(z1, z2).mean()
    if vicreg:  # Bardes et al. 2022: keep every dimension's spread, decorrelate them
        for z in (z1, z2):
            loss = loss + torch.relu(1 - z.std(0)).mean()
            zc = z - z.mean(0)
            c = zc.T @ zc / (len(z) - 1)
            loss = loss + (c - torch.diag(torch.diag(c))).pow(2).sum() / z.shape[1]
    return loss


def train_siamese(vicreg: bool, steps: int = 400) -> tuple[list[dict], Path]:
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    enc = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    views = (x[:256] + 0.1 * torch.randn(256, 16, generator=g),
             x[:256] + 0.1 * torch.randn(256, 16, generator=g))
    with neurotop.watch(enc, opt, report_every=10, probe_every=20, features="2") as mon:
        mon.probe(lambda: siamese_loss(enc(views[0]), enc(views[1]), vicreg))
        for _ in range(steps):
            xb = x[torch.randint(0, 512, (128,), generator=g)]
            loss = siamese_loss(enc(xb + 0.1 * torch.randn_like(xb)),
                                enc(xb + 0.1 * torch.randn_like(xb)), vicreg)
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
        runs = Path(mon.recorder.path).parent.parent
    alerts, _ = recorded(runs)
    return alerts, next(runs.glob("*/session.ntop"))


def test_a_collapsing_encoder_fires_at_its_output():
    alerts, session = train_siamese(vicreg=False)
    e11 = [a for a in alerts if a["alert"] == "representation_collapse"]
    assert e11, alerts
    a = e11[0]
    assert a["rule"] == "E11" and a["level"] == WARN and a["layer"] == "2"
    assert 60 <= a["step"] <= 300, a  # measured: step 120
    assert "effective rank" in a["message"] and "try:" in a["message"]
    erank = read_recording(session).scalar("feature_erank")
    erank = erank[np.isfinite(erank)]
    assert erank[-1] < 0.5 * erank.max()  # it did collapse: a third of its peak, measured


def test_its_healthy_twin_with_vicreg_keeps_its_rank():
    alerts, session = train_siamese(vicreg=True)
    assert not [a for a in alerts if a["alert"] == "representation_collapse"], alerts
    erank = read_recording(session).scalar("feature_erank")
    erank = erank[np.isfinite(erank)]
    assert len(erank) >= 19 and erank[-1] > 0.9 * erank[2:].max()


def test_a_supervised_classifier_learning_a_teacher_raises_no_e11(tmp_path: Path):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xp = torch.randn(512, 20)
    with torch.no_grad():
        yp = teacher(xp).argmax(1)
    with neurotop.watch(model, opt, report_every=10, probe_every=20, features="3") as mon:
        mon.probe_batch(xp, yp)
        for _ in range(400):
            x = torch.randn(128, 20)
            with torch.no_grad():
                y = teacher(x).argmax(1)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
    alerts, _ = recorded(tmp_path / "runs")
    assert not [a for a in alerts if a["alert"] == "representation_collapse"], alerts
    rec = read_recording(next((tmp_path / "runs").glob("*/session.ntop")))
    acc = rec.scalar("probe_acc")
    assert np.nanmax(acc) > 0.8  # it learnt
    assert np.isfinite(rec.scalar("nc1")).sum() >= 19


SCHEMA = {"layers": [], "stats": [], "scalars": ["loss", "train_acc", *PROBE_SCALARS],
          "probe": {"features": "penultimate"}}


def report(step: int, acc: float, nc1: float, erank: float = math.nan) -> np.ndarray:
    v = dict.fromkeys(PROBE_SCALARS, math.nan)
    v.update(nc1=nc1, feature_erank=erank, probe_step=step)
    return np.array([0.1, acc, *v.values()], np.float32)


def test_nc1_rising_after_zero_train_error_fires_and_not_before():
    d, got = Detectors(AlertRules()), []
    # Before zero train error NC1 may go anywhere; after it, it fell to 0.2, then rose.
    seq = [(0.8, 3.0), (0.9, 9.0), (1.0, 0.5), (1.0, 0.2), (1.0, 0.3), (1.0, 0.45),
           (1.0, 0.5), (1.0, 0.6)]
    for k, (acc, v) in enumerate(seq):
        got += d.check(10 * (k + 1), np.zeros((0, 0)), report(10 * (k + 1), acc, v), SCHEMA)
    assert [(a.name, a.level, a.step, a.layer) for a in got] == [
        ("representation_collapse", WARN, 70, "penultimate")]
    assert "NC1" in got[0].message and "step 40" in got[0].message
    steady = Detectors(AlertRules())
    assert not [a for k in range(20) for a in steady.check(
        10 * (k + 1), np.zeros((0, 0)), report(10 * (k + 1), 1.0, 0.2 + 0.05 * (k % 2)),
        SCHEMA)]


def test_erank_drop_fires_once_and_a_tiny_layer_never():
    d, got = Detectors(AlertRules()), []
    for k, e in enumerate([30, 30, 20, 20, 19, 19, 15, 10, 9, 8]):
        got += d.check(10 * (k + 1), np.zeros((0, 0)), report(10 * (k + 1), math.nan,
                                                                math.nan, e), SCHEMA)
    # probes 1-2 are warmup; the peak is 20 from probe 3; 15 is 25 % down, twice in a row
    assert [(a.name, a.step) for a in got] == [("representation_collapse", 80)]
    # With 5 class labels, rank 8 still holds a direction per class: compression, not collapse.
    labelled, five = Detectors(AlertRules()), {**SCHEMA, "probe": {"classes": 5}}
    assert not [a for k, e in enumerate([30, 30, 20, 20, 19, 19, 15, 10, 9, 8])
                for a in labelled.check(10 * (k + 1), np.zeros((0, 0)), report(
                    10 * (k + 1), math.nan, math.nan, e), five)]
    tiny = Detectors(AlertRules())
    assert not [a for k, e in enumerate([1.9, 1.9, 1.9, 1.0, 1.0, 1.0]) for a in tiny.check(
        10 * (k + 1), np.zeros((0, 0)), report(10 * (k + 1), math.nan, math.nan, e), SCHEMA)]
