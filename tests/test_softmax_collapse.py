"""Softmax collapse, reproduced (issue 16, items 3 and 6): ``demos/softmax_collapse.py``,
shortened, collapses its head in float32 and raises ``softmax_collapse`` (E4, critical) at
the head within a bounded step window; its healthy twin (the same run with weight decay)
raises no E4 or E12, its margin staying under float32's onset. The head statistics are in
the recording and in the CSV export. Also the E4 warning and E12 on known values."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from neurotop.service.detectors import CRITICAL, WARN, AlertRules, Detectors
from neurotop.service.finalize import HEAD_SCALARS
from tests.helpers.alerts import recorded
from tests.helpers.cli import neurotop
from tests.helpers.package import ROOT
from tests.helpers.recorded import read_recording, record_run

DEMO = ROOT / "demos" / "softmax_collapse.py"
HEAD_ALERTS = ("softmax_collapse", "overconfidence")


def run_demo(where: Path, *args: str) -> Path:
    """The demo to its end, recorded under ``where``; its session file."""
    return record_run(where, *args, script=DEMO, timeout=300)


@pytest.mark.slow
def test_demo_collapses_its_head_and_says_so(tmp_path: Path):
    session = run_demo(tmp_path, "--steps", "400")
    alerts, _ = recorded(tmp_path / "runs")
    e4 = [a for a in alerts if a["alert"] == "softmax_collapse"]
    assert e4, alerts
    first = e4[0] if e4[0]["level"] == CRITICAL else e4[1]
    assert first["level"] == CRITICAL and first["rule"] == "E4" and first["layer"] == "4"
    assert 50 <= first["step"] <= 400, first  # measured: step 126
    assert "one-hot in float32" in first["message"] and "set weight_decay" in first["message"]
    rec = read_recording(session)
    assert rec.scalar("head.collapse_frac")[-1] > 0
    assert rec.scalar("head.zero_loss_frac")[-1] > 0
    assert rec.scalar("head.collapse_frac")[0] == 0  # collapse came with training
    # The export carries them like any scalar.
    out = tmp_path / "csv"
    done = neurotop("export", str(session), "--csv", str(out), timeout=60)
    assert done.returncode == 0, done.stderr
    with open(out / "scalars.csv") as f:
        header = next(csv.reader(f))
    assert set(HEAD_SCALARS) <= set(header)


@pytest.mark.slow
def test_healthy_twin_with_weight_decay_raises_no_head_alert(tmp_path: Path):
    session = run_demo(tmp_path, "--steps", "600", "--weight-decay", "1")
    alerts, _ = recorded(tmp_path / "runs")
    assert not [a for a in alerts if a["alert"] in HEAD_ALERTS], alerts
    rec = read_recording(session)
    assert np.all(rec.scalar("head.collapse_frac") == 0)
    assert np.all(rec.scalar("head.margin_p90") < rec.schema["head"]["margin_onset"])
    assert rec.scalar("train_acc")[-1] == 1.0  # it memorized the task all the same


SCHEMA = {"layers": [], "stats": [], "head": {"name": "lm_head", "classes": 100,
                                              "dtype": "bfloat16", "margin_onset": math.log(256)},
          "scalars": ["loss", *HEAD_SCALARS]}


def report(loss: float, collapse: float, p90: float, entropy: float) -> np.ndarray:
    return np.array([loss, collapse, 1.0, 2.0, p90, entropy, 0.0], np.float32)


def test_margin_past_the_dtypes_onset_warns_before_the_collapse():
    d, got = Detectors(AlertRules()), []
    for step in range(10, 60, 10):
        got += d.check(step, np.zeros((0, 0)), report(0.5, 0.0, 6.0, 1.0), SCHEMA)
    got += d.check(60, np.zeros((0, 0)), report(0.5, 0.02, 7.0, 1.0), SCHEMA)
    assert [(a.name, a.level, a.step) for a in got] == [
        ("softmax_collapse", WARN, 30), ("softmax_collapse", CRITICAL, 60)]
    assert got[0].layer == "lm_head" and "5.55 where a bfloat16 softmax" in got[0].message


def test_overconfidence_needs_a_loss_that_is_not_earned():
    low = 0.05 * math.log(100) / 2
    sure_and_wrong, sure_and_right = Detectors(), Detectors()
    a = [x for s in (10, 20, 30) for x in sure_and_wrong.check(
        s, np.zeros((0, 0)), report(3.0, 0.0, 1.0, low), SCHEMA)]
    b = [x for s in (10, 20, 30) for x in sure_and_right.check(
        s, np.zeros((0, 0)), report(low, 0.0, 1.0, low), SCHEMA)]
    assert [(x.name, x.level, x.step, x.layer) for x in a] == [
        ("overconfidence", WARN, 30, "lm_head")]
    assert a[0].event()["rule"] == "E12" and "try:" in a[0].message
    assert b == []
