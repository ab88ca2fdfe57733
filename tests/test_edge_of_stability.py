"""Edge of stability, reproduced (issue 16, items 3 and 6): ``demos/edge_of_stability.py``,
shortened, sharpens until lambda_max reaches 2/lr, raises ``edge_of_stability`` (E7) within a
bounded step window and stays pinned within 10 % of 2/lr; its healthy twin (a tenth of the
lr) stays far from its 2/lr and raises no E7. The probe's scalars are in the recording and
the CSV export. Also the rule itself on known values: Adam's preconditioned sharpness
against 38/lr, persistence in probes, one alert per incident, critical past 2x."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from neurotop.service.curvature_rules import PROBE_SCALARS
from neurotop.service.detectors import CRITICAL, WARN, AlertRules, Detectors
from tests.helpers.alerts import recorded
from tests.helpers.cli import neurotop
from tests.helpers.package import ROOT
from tests.helpers.recorded import read_recording, record_run

DEMO = ROOT / "demos" / "edge_of_stability.py"


def run_demo(where: Path, *args: str) -> Path:
    """The demo to its end, recorded under ``where``; its session file."""
    return record_run(where, *args, script=DEMO, timeout=300)


def probes(session: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probe steps, lambda_max, eos_threshold) of every probe the run reported."""
    rec = read_recording(session)
    at = rec.scalar("probe_step")
    ok = np.isfinite(at)
    return at[ok], rec.scalar("lambda_max")[ok], rec.scalar("eos_threshold")[ok]


@pytest.fixture(scope="module")
def eos_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo shortened to 600 steps (its directory, its session), for the tests below."""
    where = tmp_path_factory.mktemp("eos")
    return where, run_demo(where, "--steps", "600")


@pytest.mark.slow
def test_demo_sharpens_to_two_over_lr_stays_there_and_says_so(eos_run: tuple[Path, Path],
                                                             tmp_path: Path):
    where, session = eos_run
    alerts, _ = recorded(where / "runs")
    e7 = [a for a in alerts if a["alert"] == "edge_of_stability"]
    assert e7, alerts
    first = e7[0]
    assert first["level"] == WARN and first["rule"] == "E7"
    assert 100 <= first["step"] <= 350, first  # measured: step 200
    assert "2/lr = 20" in first["message"] and "`set lr x0.5`" in first["message"]
    at, lam, thr = probes(session)
    assert np.all(thr == pytest.approx(20.0))
    assert lam[0] < 0.5 * 20  # it started flat: the sharpness came with training
    # Pinned at 2/lr: GD's self-stabilization swings it around the threshold, in a sawtooth
    # that narrows (measured: 10 .. 28 right after the alert, 17 .. 23 from step 450 on):
    # there the median is within 10 % of 2/lr and every probe within 20 %.
    pinned = lam[at > 450]
    assert len(pinned) >= 14
    assert float(np.median(pinned)) == pytest.approx(20.0, rel=0.10), pinned
    assert np.all(np.abs(pinned / 20.0 - 1) < 0.2), pinned
    # The export carries the probe's scalars like any other.
    out = tmp_path / "csv"
    done = neurotop("export", str(session), "--csv", str(out), timeout=60)
    assert done.returncode == 0, done.stderr
    with open(out / "scalars.csv") as f:
        header = next(csv.reader(f))
    assert {"lambda_max", "eos_threshold", "hessian_trace"} <= set(header)


@pytest.mark.slow
async def test_the_overview_plots_sharpness_against_two_over_lr(eos_run: tuple[Path, Path]):
    from neurotop.tui.data.replay_source import ReplaySource
    from neurotop.tui.screens.dashboard import Plot
    from neurotop.tui.screens.replay_app import ReplayApp
    from tests.helpers.pilot import until

    source = ReplaySource(eos_run[1]).start()
    try:
        app = ReplayApp(source)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.store.status.step >= 591, what="the recording")
            plot = app.query_one("#ov-plot-1", Plot)
            await until(pilot, lambda: plot.text.startswith("sharpness vs 2/lr"),
                        what="the sharpness plot in the lr plot's place")
            assert "λmax" in plot.text and "2/lr 20" in plot.text
    finally:
        source.close()


@pytest.mark.slow
def test_healthy_twin_at_a_small_lr_raises_no_e7(tmp_path: Path):
    session = run_demo(tmp_path, "--steps", "600", "--lr", "0.01")
    alerts, _ = recorded(tmp_path / "runs")
    assert not [a for a in alerts if a["alert"] == "edge_of_stability"], alerts
    at, lam, thr = probes(session)
    assert len(at) >= 55 and np.all(thr == pytest.approx(200.0))
    assert np.all(lam < 0.25 * thr)  # measured: at most 6, against 2/lr = 200


@pytest.mark.slow
def test_full_batch_adam_pins_its_preconditioned_sharpness_at_38_over_lr(tmp_path: Path):
    session = run_demo(tmp_path, "--adam", "--lr", "0.01", "--steps", "400",
                       "--probe-every", "25")
    alerts, _ = recorded(tmp_path / "runs")
    e7 = [a for a in alerts if a["alert"] == "edge_of_stability"]
    assert e7 and "preconditioned sharpness" in e7[0]["message"], alerts
    assert e7[0]["step"] <= 250 and "= 3800" in e7[0]["message"]  # measured: step 125
    rec = read_recording(session)
    ok = np.isfinite(rec.scalar("probe_step"))
    pre, thr = rec.scalar("precond_sharpness")[ok], rec.scalar("eos_threshold")[ok]
    assert np.all(thr == pytest.approx(3800.0))
    # Cohen et al. 2022: it hovers just under 38/lr (measured 3080 .. 3990 from step 50 on)
    assert float(np.median(pre[2:])) == pytest.approx(3800.0, rel=0.15), pre


SCHEMA = {"layers": [], "stats": [], "scalars": ["loss", "lr", *PROBE_SCALARS],
          "probe": {"features": "", "threshold": "(2+2b1)/((1-b1) lr) (b1=0.9)"}}


def report(step: float | None, lam: float, pre: float, thr: float) -> np.ndarray:
    v = dict.fromkeys(PROBE_SCALARS, math.nan)
    if step is not None:
        v.update(lambda_max=lam, precond_sharpness=pre, eos_threshold=thr, probe_step=step)
    return np.array([0.5, 1e-3, *v.values()], np.float32)


def test_adam_is_judged_by_its_preconditioned_sharpness_against_38_over_lr():
    d, got = Detectors(AlertRules()), []
    # lambda_max far past 2/lr = 2000 means nothing for Adam; P^-1 H at 0.95 x 38/lr does,
    # on the second probe in a row; reports without a probe in between keep the verdict.
    for step, probe, pre in [(10, 10, 1000.0), (20, None, 0), (30, 30, 36_100.0),
                             (40, None, 0), (50, 50, 37_000.0), (60, None, 0),
                             (70, 70, 36_500.0)]:
        got += d.check(step, np.zeros((0, 0)), report(probe, 5e4, pre, 38_000.0), SCHEMA)
    assert [(a.name, a.level, a.step) for a in got] == [("edge_of_stability", WARN, 50)]
    a = got[0]
    assert a.event()["rule"] == "E7" and "preconditioned sharpness" in a.message
    assert "(2+2b1)/((1-b1) lr)" in a.message and "`set lr x0.5`" in a.message
    # Far past the threshold: critical, at once (the condition held on the probes before).
    got = d.check(90, np.zeros((0, 0)), report(90, 5e4, 80_000.0, 38_000.0), SCHEMA)
    got += d.check(100, np.zeros((0, 0)), report(100, 5e4, 81_000.0, 38_000.0), SCHEMA)
    assert [(a.level, a.step) for a in got] == [(CRITICAL, 90)]
    assert "will diverge" in got[0].message


def test_sgd_below_the_threshold_and_one_off_probes_raise_nothing():
    d, got = Detectors(AlertRules()), []
    for k in range(1, 30):  # a sawtooth: never two probes in a row at 0.9 x 2/lr
        lam = 19.0 if k % 2 else 10.0
        got += d.check(10 * k, np.zeros((0, 0)), report(10 * k, lam, math.nan, 20.0), SCHEMA)
    assert got == []
    assert d.check(300, np.zeros((0, 0)), report(None, 0, 0, 0), SCHEMA) == []
