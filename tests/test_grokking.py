"""Grokking, reproduced (issue 16, items 3 and 6): ``demos/grokking.py`` memorizes modular
addition at weight decay 0 and raises ``grokking_stall`` (E5) in a bounded step window, with
the advice to raise weight decay; raised live through ``neurotop ctl``, test accuracy climbs
and ``grokking`` (E6) fires; the easy twin (the same model on a task it generalizes at once)
raises neither. With the head watched, E5 (the NLM direction) comes before E4 (softmax
collapse), the order of GROK-NS. Also both rules on known values, including what must not
fire them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from neurotop.protocol import wire
from neurotop.service.detectors import CRITICAL, INFO, WARN, AlertRules, Detectors
from tests.helpers.alerts import recorded
from tests.helpers.cli import neurotop
from tests.helpers.package import ROOT
from tests.helpers.recorded import read_recording, record_run
from tests.helpers.telemetry import Subscriber
from tests.helpers.waiting import wait_until

DEMO = ROOT / "demos" / "grokking.py"
GROK = ("grokking_stall", "grokking")


def run_demo(where: Path, *args: str) -> Path:
    """The demo to its end, recorded under ``where``; its session file."""
    return record_run(where, *args, script=DEMO, timeout=300)


@pytest.fixture(scope="module")
def stalled(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """The demo at weight decay 0 with its head watched, past its softmax collapse."""
    where = tmp_path_factory.mktemp("stalled")
    session = run_demo(where, "--steps", "560", "--head")
    return recorded(where / "runs")[0], session


@pytest.mark.slow
def test_memorizing_at_weight_decay_0_raises_the_stall_with_its_advice(stalled):
    alerts, session = stalled
    [e5] = [a for a in alerts if a["alert"] == "grokking_stall"]  # one incident
    assert e5["rule"] == "E5" and e5["level"] == WARN
    assert 200 <= e5["step"] <= 450, e5  # measured: step 301
    assert "`set weight_decay 1`" in e5["message"] and "test acc 0." in e5["message"]
    assert e5["value"] > 0.8  # the mean cos(-g, theta) it judged
    assert not [a for a in alerts if a["alert"] == "grokking"]
    rec = read_recording(session)
    assert rec.scalar("train_acc")[-1] == 1.0 and rec.scalar("test_acc")[-1] < 0.05


@pytest.mark.slow
def test_the_nlm_stall_comes_before_the_softmax_collapse(stalled):
    """GROK-NS: without weight decay the gradient first aligns with the weights (NLM, E5),
    which scales the logits until rows round to one-hot (SC, E4)."""
    alerts, _ = stalled
    order = [(a["step"], a["alert"]) for a in alerts
             if a["alert"] == "grokking_stall"
             or (a["alert"] == "softmax_collapse" and a["level"] == CRITICAL)]
    assert [n for _, n in order] == ["grokking_stall", "softmax_collapse"], alerts
    assert order[0][0] < order[1][0]  # measured: 301, 521


@pytest.mark.slow
def test_raising_weight_decay_live_rescues_generalization(start_run, tmp_path: Path):
    run = start_run("--steps", "20000", script=DEMO)  # until stopped, at any speed
    log = tmp_path / "runs" / run.info.run_id / "alerts.jsonl"

    def fired(name: str) -> dict | None:
        lines = log.read_text().splitlines() if log.exists() else []
        return next((a for a in map(json.loads, lines) if a["alert"] == name), None)

    with Subscriber(run.info.telemetry).ready() as sub:  # to see test acc climb live
        e5 = wait_until(lambda: fired("grokking_stall"), 120, 0.2, "grokking_stall")
        out = neurotop("ctl", run.info.run_id, "set", "weight_decay", "1", timeout=60)
        assert out.returncode == 0, out.stderr
        ack = json.loads(out.stdout)
        assert (ack["old"], ack["new"]) == (0.0, 1.0), ack
        raised = ack["step"]
        e6 = wait_until(lambda: fired("grokking"), 150, 0.2, "grokking")
        sub.collect(150, until=lambda m: live_test_acc(sub.msgs, m) > 0.5)
    out = neurotop("ctl", run.info.run_id, "stop", timeout=60)
    assert out.returncode == 0, out.stderr
    assert run.proc.wait(60) == 0
    assert e5["step"] <= raised < e6["step"], (e5, raised, e6)
    assert e6["rule"] == "E6" and e6["level"] == INFO and "weight norm fell" in e6["message"]
    assert e6["step"] - raised <= 500, (raised, e6)  # measured: ~320 steps
    rec = read_recording(next((tmp_path / "runs").glob("*/session.ntop")))
    steps, test = np.array(rec.steps), rec.scalar("test_acc")
    before, after = test[steps <= raised], test[steps > raised]
    assert before.max() < 0.05  # stalled until the raise
    # and climbing after it (measured: 0.001 at the raise at step 343, 0.08 at E6 at 661,
    # 0.5 by step 800, 0.99 by step 1000)
    assert after.max() > 0.5, after[-5:]
    climb = int(steps[steps > raised][np.argmax(after > 0.5)]) - raised
    assert climb <= 1000, climb  # measured: ~450 steps


def live_test_acc(msgs: list[wire.Message], m: wire.Message) -> float:
    """``test_acc`` of the stats message ``m``, by the last schema received (NaN before)."""
    schema = next((x.header for x in reversed(msgs) if x.kind == wire.SCHEMA), None)
    if m.kind != wire.STATS or schema is None or "test_acc" not in schema["scalars"]:
        return math.nan
    return float(m.arrays[1][schema["scalars"].index("test_acc")])


@pytest.mark.slow
def test_easy_twin_raises_neither(tmp_path: Path):
    session = run_demo(tmp_path, "--steps", "400", "--task", "first")
    alerts, _ = recorded(tmp_path / "runs")
    assert not [a for a in alerts if a["alert"] in GROK], alerts
    rec = read_recording(session)
    assert rec.scalar("test_acc")[-1] == 1.0  # it generalized, at weight decay 0


# -- the rules on known values -------------------------------------------------------------

SCHEMA = {"layers": [], "stats": [], "scalars": ["loss", "train_acc", "test_acc"],
          "params": ["w1", "w2"], "param_stats": ["weight_norm", "nlm_cos"]}


def feed(series: list[tuple[float, float, float, float]], rules: AlertRules | None = None,
         every: int = 10) -> list[tuple[int, str, str]]:
    """(train acc, test acc, ||theta||, cos) per report, every ``every`` steps: what fired."""
    d, out = Detectors(rules or AlertRules()), []
    for i, (train, test, norm, cos) in enumerate(series):
        w = norm / math.sqrt(2)  # two parameters of equal norm
        params = np.array([[w, cos], [w, cos]], np.float32)
        scalars = np.array([0.1, train, test], np.float32)
        out += [(a.step, a.name, a.level)
                for a in d.check(every * (i + 1), np.zeros((0, 0)), scalars, SCHEMA, params)]
    return out


def stall(n: int = 40, test: float = 0.01, rise: float = 0.003, cos: float = 0.85):
    """Memorized, test flat, ||theta|| rising ``rise`` of itself per report."""
    return [(1.0, test, 50 * (1 + rise) ** i, cos) for i in range(n)]


def test_stall_fires_once_after_its_window_and_persistence():
    got = feed(stall())
    assert got == [(220, "grokking_stall", WARN)]  # 20 reports, then 3 in a row


@pytest.mark.parametrize("what, series", [
    ("cos at 0.75: not the NLM direction", stall(cos=0.75)),
    ("norm flat (+0.5% over the window)", stall(rise=0.00025)),
    ("test at 95%: generalized", stall(test=0.95)),
    ("test rising", [(1.0, 0.01 + 0.002 * i, 50 * 1.003 ** i, 0.85) for i in range(40)]),
    ("train still being fitted", [(0.9, 0.01, 50 * 1.003 ** i, 0.85) for i in range(40)]),
])
def test_stall_needs_every_condition(what, series):
    assert feed(series) == [], what


def test_stall_ignores_the_norm_rise_while_the_training_set_was_fitted():
    """The norm grows fastest while fitting; the window must lie after it (a wd=1 run)."""
    fit = [(i / 10, 0.01, 10 + 4.5 * i, 0.85) for i in range(10)]
    flat = [(1.0, 0.01, 55 * 0.9995 ** i, 0.85) for i in range(40)]
    assert feed(fit + flat) == []


def grok(noise: float = 0.0):
    """Memorized (test 1 %), then test climbing 3 points a report while ||theta|| falls;
    with label noise, train acc unlearns down to 1 - noise meanwhile."""
    memo = [(1.0, 0.01, 60.0, 0.9)] * 5
    climb = [(1.0 - noise * min(i / 20, 1), min(0.01 + 0.03 * i, 1.0), 60 * 0.995 ** i, 0.9)
             for i in range(30)]
    return memo + climb


def test_grokking_fires_as_info_when_test_climbs_and_the_norm_falls():
    got = feed(grok())
    assert [(n, lv) for _, n, lv in got] == [("grokking", INFO)]
    assert 200 <= got[0][0] <= 260


def test_grokking_with_label_noise_still_fires():
    assert [n for _, n, _ in feed(grok(noise=0.2))] == ["grokking"]


def test_ordinary_learning_is_not_grokking():
    """Train and test rising together, norm falling under weight decay: no memorization
    came first, so nothing was delayed."""
    series = [(min(0.2 + 0.03 * i, 1.0), min(0.15 + 0.03 * i, 0.95), 60 * 0.995 ** i, 0.9)
              for i in range(40)]
    assert feed(series) == []


def test_no_accuracies_or_no_parameter_statistics_judge_nothing():
    d = Detectors()
    for i in range(40):
        scalars = np.array([0.1, 1.0, 0.01], np.float32)
        assert d.check(10 * i, np.zeros((0, 0)), scalars, SCHEMA, None) == []
    d = Detectors()
    only_loss = dict(SCHEMA, scalars=["loss"])
    params = np.array([[40.0, 0.9], [40.0, 0.9]], np.float32)
    for i in range(40):
        params = params * 1.01
        assert d.check(10 * i, np.zeros((0, 0)), np.array([0.1], np.float32), only_loss,
                       params) == []


def test_rules_are_validated_and_can_be_turned_off():
    assert feed(stall(), AlertRules(off=("grokking_stall",))) == []
    assert feed(stall(), AlertRules(grok_cos=0.9)) == []
    with pytest.raises(ValueError, match="grok_window must be an integer"):
        AlertRules(grok_window=2.5)
    with pytest.raises(ValueError, match="grok_window must be at least 3, got 2"):
        Detectors(AlertRules(grok_window=2))


def test_accuracies_in_percent_are_not_judged():
    """99.5 (%) would read as memorized on every report, 30 (%) as a test acc of 3000 %."""
    assert feed([(100.0, 1.0, n, c) for _, _, n, c in stall()]) == []
