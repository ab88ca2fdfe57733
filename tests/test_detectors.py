"""The detectors of METRICS.md E: each rule fires when its condition holds long enough, once
per incident, and again only when it gets worse; auto-pause follows the alerts; a real
training run with a planted dying layer logs and records the alert with no viewer."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import neurotop
from neurotop.protocol import wire
from neurotop.protocol.sessionfile import KIND_CODES, MESSAGE, SessionReader, split_frames
from neurotop.service.autopause import AutoPause
from neurotop.service.detectors import ALERTS, AlertRules, AlertRulesError, Detectors, alert_rules

STATS = ["mean", "rms", "max_abs", "massive_ratio", "dead_frac", "dead_frac_window",
         "nonfinite", "grad_rms"]
LAYERS = ["fc0", "act0", "fc1", "act1", "fc2", "act2", "head"]
TYPES = ["Linear", "ReLU"] * 3 + ["Linear"]
SCHEMA = {"layers": LAYERS, "layer_types": TYPES, "blocks": [], "stats": STATS,
          "scalars": ["loss", "grad_norm", "first_nonfinite", "lr"]}
NAN = float("nan")


def healthy() -> np.ndarray:
    """A report of a healthy ReLU stack: every rule quiet."""
    b = np.zeros((len(LAYERS), len(STATS)), np.float32)
    col = {s: j for j, s in enumerate(STATS)}
    b[:, col["rms"]] = 1.0
    b[:, col["max_abs"]] = 4.0
    b[:, col["massive_ratio"]] = 6.0
    b[:, col["dead_frac"]] = b[:, col["dead_frac_window"]] = 0.05
    b[:, col["grad_rms"]] = 1e-3
    return b


def scalars(loss: float = 1.0, grad_norm: float = 1.0, first: float = -1) -> np.ndarray:
    return np.array([loss, grad_norm, first, 0.1], np.float32)


def set_(b: np.ndarray, layer: str, stat: str, v: float) -> np.ndarray:
    b = b.copy()
    b[LAYERS.index(layer), STATS.index(stat)] = v
    return b


def run(det: Detectors, reports: list[tuple[np.ndarray, np.ndarray]], first_step: int = 1
        ) -> list[tuple[int, str, str, str]]:
    out = []
    for k, (block, sc) in enumerate(reports):
        step = first_step + k
        out += [(a.step, a.name, a.level, a.layer) for a in det.check(step, block, sc, SCHEMA)]
    return out


def test_healthy_reports_raise_nothing():
    rng = np.random.default_rng(0)
    det = Detectors()
    reports = [(healthy() * rng.uniform(0.9, 1.1), scalars(1.0 + rng.normal(0, 0.02),
                                                           1.0 + rng.normal(0, 0.1)))
               for _ in range(200)]
    assert run(det, reports) == []


def test_dying_layer_persists_fires_once_escalates_and_rearms():
    det = Detectors(AlertRules(persist=3, rearm=2))
    warn = set_(healthy(), "act1", "dead_frac_window", 0.6)
    crit = set_(healthy(), "act1", "dead_frac_window", 0.95)
    ok = scalars()
    # Two reports are not enough; the third fires; later reports of the same incident don't.
    got = run(det, [(warn, ok)] * 5 + [(crit, ok)] * 3 + [(healthy(), ok)] * 2
              + [(warn, ok)] * 3)
    dying = [g for g in got if g[1] == "dying_layer"]
    assert dying == [(3, "dying_layer", "warn", "act1"), (6, "dying_layer", "critical", "act1"),
                     (13, "dying_layer", "warn", "act1")]
    # Rises by more than 0.3 within 100 steps are jumps, reported at once: 60 % -> 95 %,
    # and 5 % -> 60 % after the healthy reports.
    assert [g for g in got if g[1] == "dead_jump"] == [(6, "dead_jump", "warn", "act1"),
                                                      (11, "dead_jump", "warn", "act1")]
    # A value hovering at the threshold is one incident until it stays clear for `rearm`.
    hover = [set_(healthy(), "act1", "dead_frac_window", 0.45 + 0.1 * (k % 2)) for k in range(40)]
    got = run(Detectors(AlertRules(persist=1)), [(b, ok) for b in hover])
    assert [g for g in got if g[1] == "dying_layer"] == [(2, "dying_layer", "warn", "act1")]
    # A logits layer whose outputs are all negative is not dying: only activations count.
    assert run(Detectors(), [(set_(healthy(), "head", "dead_frac_window", 1.0), ok)] * 5) == []


def test_massive_activation_and_its_growth():
    det = Detectors(AlertRules(persist=2, growth_window=5))
    ok = scalars()
    grow = [set_(set_(healthy(), "fc1", "massive_ratio", 6.0 * 2 ** k), "fc1", "max_abs",
                 4.0 * 2 ** k) for k in range(8)]
    got = run(det, [(b, ok) for b in grow])
    # 6 -> 96 within 5 reports is 16x > 10x, held for 2 reports; max|a| never passes 100.
    assert [g for g in got if g[1] == "massive_growth"] == [(7, "massive_growth", "warn", "fc1")]
    assert not [g for g in got if g[1] == "massive_activation"]
    big = set_(set_(healthy(), "fc2", "max_abs", 300.0), "fc2", "massive_ratio", 2000.0)
    got = run(Detectors(AlertRules(persist=2)), [(big, ok)] * 3)
    assert got == [(2, "massive_activation", "warn", "fc2")]
    # max|a| > 100 alone (a large but evenly spread activation) is not massive.
    wide = set_(set_(healthy(), "fc2", "max_abs", 300.0), "fc2", "massive_ratio", 5.0)
    assert run(Detectors(), [(wide, ok)] * 5) == []


def test_nonfinite_is_critical_at_once_and_names_the_first_layer():
    det = Detectors(AlertRules(rearm=1))
    # A loss the loop never observed is NaN in every report: not an alert.
    assert run(det, [(healthy(), scalars(loss=NAN))] * 3) == []
    # A layer that did not run this step is an all-NaN row: not an alert either.
    skipped = healthy()
    skipped[LAYERS.index("fc2")] = NAN
    assert run(det, [(skipped, scalars())]) == []
    bad = set_(set_(healthy(), "fc2", "nonfinite", 12), "act2", "nonfinite", 12)
    alerts = det.check(7, bad, scalars(first=LAYERS.index("fc2")), SCHEMA)
    assert [(a.name, a.level, a.layer, a.value) for a in alerts] == \
        [("nonfinite", "critical", "fc2", 12.0)]
    assert "first in forward order (12 values)" in alerts[0].message
    det.check(8, healthy(), scalars(), SCHEMA)  # cleared: the incident is over (rearm=1)
    inf = det.check(9, healthy(), scalars(grad_norm=float("inf")), SCHEMA)
    assert [a.message for a in inf] == ["non-finite grad_norm (inf)"]
    det.check(10, healthy(), scalars(), SCHEMA)
    # One incident, one alert: a NaN loss with NaN activations names the first bad layer.
    both = det.check(11, set_(healthy(), "act1", "nonfinite", 5), scalars(loss=NAN), SCHEMA)
    assert [(a.layer, a.message) for a in both] == \
        [("act1", "non-finite activations in layer 'act1', the first in forward order (5 values)")]
    det.check(12, healthy(), scalars(), SCHEMA)
    loss = det.check(13, healthy(), scalars(loss=NAN), SCHEMA)  # finite before: now bad
    assert [a.message for a in loss] == ["non-finite loss (nan)"]


def test_loss_and_grad_norm_spikes_after_warmup():
    rng = np.random.default_rng(1)
    det = Detectors(AlertRules(warmup=10))
    calm = [(healthy(), scalars(2.0 - 0.005 * k + rng.normal(0, 0.01), 1.0 + rng.normal(0, 0.05)))
            for k in range(30)]
    assert run(det, calm) == []
    got = run(det, [(healthy(), scalars(loss=6.0)), (healthy(), scalars(grad_norm=40.0))],
              first_step=31)
    assert got == [(31, "loss_spike", "warn", ""), (32, "grad_spike", "warn", "")]
    # A spike in the first reports (no history yet) is not judged.
    assert run(Detectors(), [(healthy(), scalars(loss=v)) for v in (1.0, 9.0, 1.0)]) == []


def test_explode_vanish_from_the_depth_profile():
    ok = scalars()
    col = STATS.index("grad_rms")
    vanishing = healthy()
    # The backprop signal falls 4x per Linear layer towards the input: 1e-3 * 4**-k.
    for k, name in enumerate(["head", "fc2", "fc1", "fc0"]):
        vanishing[LAYERS.index(name), col] = 1e-3 * 4.0 ** -k
    got = run(Detectors(AlertRules(persist=2)), [(vanishing, ok)] * 3)
    assert got == [(2, "explode_vanish", "warn", "")]
    rms = STATS.index("rms")
    exploding = healthy()
    for k, name in enumerate(["fc0", "fc1", "fc2", "head"]):
        exploding[LAYERS.index(name), rms] = 3.0 ** k
    assert run(Detectors(AlertRules(persist=1)), [(exploding, ok)]) == \
        [(1, "explode_vanish", "warn", "")]
    # One change of width (a small head after wide layers) is not a trend: the median of the
    # ratios is 1 here, where their mean would be ln(17) / 3.
    head = healthy()
    for name in ["fc0", "fc1", "fc2"]:
        head[LAYERS.index(name), col] = 1e-4
    head[LAYERS.index("head"), col] = 1.7e-3
    assert run(Detectors(AlertRules(persist=1)), [(head, ok)] * 3) == []
    # Residual blocks grow their stream by design: their activation RMS is not judged.
    blocks = dict(SCHEMA, blocks=["fc0", "fc1", "fc2", "head"])
    det = Detectors(AlertRules(persist=1))
    assert det.check(1, exploding, ok, blocks) == []


def test_rules_are_validated_and_can_be_switched_off():
    with pytest.raises(AlertRulesError, match="unknown alert rule.*'dead_limit'"):
        alert_rules({"dead_limit": 0.5})
    with pytest.raises(AlertRulesError, match="persist must be a number > 0"):
        AlertRules(persist=0)
    with pytest.raises(AlertRulesError, match="persist must be an integer"):
        AlertRules(persist=2.5)
    with pytest.raises(AlertRulesError, match=r"unknown alert\(s\) \['dead'\]; known: nonfinite"):
        AlertRules(off=("dead",))
    with pytest.raises(AlertRulesError, match="auto_pause_alerts: unknown alert"):
        AutoPause(SimpleNamespace(value=True), ["dying"])
    quiet = Detectors(alert_rules({"off": ["dying_layer", "dead_jump"], "persist": 1}))
    assert run(quiet, [(set_(healthy(), "act0", "dead_frac_window", 1.0), scalars())]) == []
    assert set(ALERTS) >= {"nonfinite", "dying_layer", "loss_spike"}


def test_auto_pause_follows_alerts_once_per_incident():
    ap = AutoPause(SimpleNamespace(value=True), ["dying_layer"])
    det = Detectors(AlertRules(persist=1))
    [nan_alert] = det.check(3, set_(healthy(), "fc1", "nonfinite", 2), scalars(), SCHEMA)
    assert ap.alert(nan_alert, 0) == "auto-pause: non-finite activations in layer 'fc1', the " \
                                     "first in forward order (2 values) at step 3"
    assert ap.alert(nan_alert, 0) is None  # paused for it already: wait for a resume
    fired = det.check(6, set_(healthy(), "act0", "dead_frac_window", 0.99), scalars(), SCHEMA)
    assert [a.name for a in fired] == ["dying_layer", "dead_jump"]
    assert "99% of units dead" in ap.alert(fired[0], 1)  # resumed once since
    assert ap.alert(fired[1], 1) is None  # a dead_jump is not named in this policy
    assert AutoPause(SimpleNamespace(value=False)).alert(nan_alert, 0) is None  # knob off


def test_a_real_run_logs_and_records_a_dying_layer_with_no_viewer(tmp_path, caplog):
    """A ReLU stack trained on the CPU; at step 60 the first layer's bias is pushed far
    negative, so every unit of ``1`` (its ReLU) dies. The alert is logged and recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    runs = tmp_path / "runs"
    caplog.set_level(logging.WARNING, logger="neurotop.agent")
    with neurotop.watch(model, opt, name="dying", report_every=2, record=runs,
                     dead_window=3) as mon:
        for step in range(120):
            if step == 60:
                with torch.no_grad():
                    model[0].bias.fill_(-100.0)
            x = torch.randn(32, 16)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
    [session] = runs.glob("*/session.ntop")
    with SessionReader(session) as r:
        events = [wire.decode(split_frames(rec.body)).header for rec in r.records()
                  if rec.type == MESSAGE and rec.kind == KIND_CODES["event"]]
    events = [e for e in events if e.get("event") == "alert"]
    dying = [e for e in events if e["alert"] == "dying_layer"]
    assert dying, f"no dying_layer alert among {events}"
    assert dying[0]["layer"] == "1" and dying[0]["level"] == "critical"
    assert 60 < dying[0]["step"] <= 80, dying[0]
    assert dying[0]["rule"] == "E2" and "100% of units dead" in dying[0]["message"]
    assert not [e for e in events if e["step"] <= 60], f"alerts before the damage: {events}"
    logged = [r.getMessage() for r in caplog.records if "dying_layer" in r.getMessage()]
    assert logged and "layer '1'" in logged[0]


def test_dying_counts_functional_pre_activations_and_custom_activation_classes():
    """A Linear whose output goes into F.relu (the schema's ``activations``) and a class
    named like an activation are watched; a logits layer is not."""
    layers = ["fc1", "gelu", "head"]
    schema = {**SCHEMA, "layers": layers, "layer_types": ["Linear", "NewGELU", "Linear"],
              "activations": ["F.relu", "", ""]}
    col = {s: j for j, s in enumerate(STATS)}
    b = np.zeros((3, len(STATS)), np.float32)
    b[:, col["dead_frac_window"]] = 0.95
    det = Detectors(AlertRules(persist=1))
    got = det.check(1, b, scalars(), schema)
    assert sorted((a.layer, a.level) for a in got if a.name == "dying_layer") == [
        ("fc1", "critical"), ("gelu", "critical")]
    assert "'fc1' (before F.relu): 95% of units dead" in next(
        a.message for a in got if a.layer == "fc1")


def amp_scalars(skipped: float, scale: float = 1024.0) -> tuple[dict, np.ndarray]:
    schema = {**SCHEMA, "scalars": [*SCHEMA["scalars"], "loss_scale", "skipped_steps"]}
    return schema, np.array([1.0, 1.0, -1, 0.1, scale, skipped], np.float32)


def test_amp_skipping_fires_when_the_scaler_keeps_skipping_and_not_otherwise():
    def alerts(skips: list[float], steps: list[int]) -> list[tuple[int, str]]:
        det, out = Detectors(), []
        for step, sk in zip(steps, skips, strict=True):
            schema, sc = amp_scalars(sk)
            out += [(a.step, a.level) for a in det.check(step, healthy(), sc, schema)
                    if a.name == "amp_skipping"]
        return out

    every10 = list(range(1, 400, 10))
    # Healthy: six skips while the scaler finds its scale, then one in a while.
    healthy_skips = [0.0, 6.0] + [6.0 + k // 15 for k in range(len(every10) - 2)]
    assert alerts(healthy_skips, every10) == []
    # From report 12 on, 4 of every 14 iterations skip (4 skips + 10 steps per report).
    keeps = [0.0] * 12 + [4.0 * k for k in range(1, len(every10) - 11)]
    assert alerts(keeps, every10) == [(every10[14], "warn")]  # after `persist` reports
    # Every iteration skipped: the step does not advance between reports.
    assert alerts([0.0, 0.0, 40.0, 50.0], [1, 11, 11, 11]) == [(11, "critical")]
