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
from neurotop.service.finalize import CARRY_SCALARS
from neurotop.training.layers import find_blocks

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

    def profile(per_layer: float, stat: int = col) -> np.ndarray:
        """The signal falls ``per_layer`` times per Linear layer towards the input."""
        b = healthy()
        for k, name in enumerate(["head", "fc2", "fc1", "fc0"]):
            b[LAYERS.index(name), stat] = 1e-3 * per_layer ** -k
        return b

    # 6x per layer, 216x over the 4 layers: vanishing.
    got = run(Detectors(AlertRules(persist=2)), [(profile(6.0), ok)] * 3)
    assert got == [(2, "explode_vanish", "warn", "")]
    [alert] = Detectors(AlertRules(persist=1)).check(1, profile(6.0), ok, SCHEMA)
    assert "grows 6.00x per layer, 216x over 4 Linear layers (fc0 .. head)" in alert.message
    # A drift that does not add up over the depth is not an incident: 1.12x per layer (the
    # demo MLP's), or 2.5x per layer over 4 layers, 16x (a default-initialised MLP's).
    for drift in (1.12, 2.5):
        assert run(Detectors(AlertRules(persist=1)), [(profile(drift), ok)] * 3) == []
    rms = STATS.index("rms")
    exploding = healthy()
    for k, name in enumerate(["fc0", "fc1", "fc2", "head"]):
        exploding[LAYERS.index(name), rms] = 5.0 ** k
    assert run(Detectors(AlertRules(persist=1)), [(exploding, ok)]) == \
        [(1, "explode_vanish", "warn", "")]
    # 1000x from the first layer's signal to the last one's is critical at once.
    got = run(Detectors(AlertRules(persist=1)), [(profile(12.0), ok)])
    assert got == [(1, "explode_vanish", "warn", ""), (1, "explode_vanish", "critical", "")]
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


def test_explode_vanish_judges_each_model_of_a_gan_on_its_own():
    """Two watched models (a GAN) are two networks: G's layers and D's do not form one
    chain, so a signal that differs between them is no drift; a drift within one is."""
    layers = [f"{m}.{n}" for m in ("G", "D") for n in ("fc0", "fc1", "fc2", "fc3")]
    schema = {"layers": layers, "layer_types": ["Linear"] * 8, "blocks": [], "stats": STATS,
              "scalars": SCHEMA["scalars"], "models": ["G", "D"]}
    col = STATS.index("grad_rms")
    b = np.zeros((8, len(STATS)), np.float32)
    b[:, STATS.index("rms")] = 1.0
    b[:4, col], b[4:, col] = 1e-6, 1e-2  # G's loss is not D's: 10,000x apart, each flat
    ok = scalars()
    det = Detectors(AlertRules(persist=1))
    assert det.check(1, b, ok, schema) == []
    assert det.check(1, b, ok, dict(schema, models=[])) != []  # as one stack it would fire
    b[4:, col] = 1e-2 * 6.0 ** -np.arange(4)[::-1]  # D's own signal vanishes towards its input
    [alert] = [a for a in Detectors(AlertRules(persist=1)).check(1, b, ok, schema)
               if a.level == "warn"]
    assert "(D.fc0 .. D.fc3)" in alert.message


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


CARRY = {**SCHEMA, "scalars": [*SCHEMA["scalars"], *CARRY_SCALARS]}


def carried(loss: float = 1.0, grad_norm: float = 1.0, first: float = -1, *,
            loss_max: float | None = None, loss_at: float = NAN, loss_bad: float = -1,
            gn_max: float | None = None, gn_at: float = NAN, gn_bad: float = -1
            ) -> np.ndarray:
    """Scalars of a report with the per-step carry (the worst step since the last report)."""
    top = loss if loss_max is None else loss_max
    gtop = grad_norm if gn_max is None else gn_max
    return np.array([loss, grad_norm, first, 0.1, top, loss_at, loss_bad, gtop, gn_at, gn_bad],
                    np.float32)


def run_carry(det: Detectors, reports: list[tuple[np.ndarray, np.ndarray]], every: int = 10
              ) -> list[tuple[int, str, str, str]]:
    """Reports at steps 1, 11, 21, ...: the default ``report_every``."""
    out = []
    for k, (block, sc) in enumerate(reports):
        out += [(a.step, a.name, a.level, a.layer)
                for a in det.check(1 + every * k, block, sc, CARRY)]
    return out


def test_a_tiny_loss_that_doubles_is_no_spike_but_a_real_one_is():
    """The memorised task of issue 16: its loss moves from 0.0098 to 0.020, twice the median
    but half a percent of the way back to where it started (ln 10); a rise to 0.5 is a spike."""
    rng = np.random.default_rng(2)
    start = [(healthy(), carried(2.3 * 0.7 ** k)) for k in range(15)]
    calm = [(healthy(), carried(0.0098 + rng.normal(0, 2e-4))) for _ in range(30)]
    assert run_carry(Detectors(), start + calm + [(healthy(), carried(0.020))] * 2) == []
    got = run_carry(Detectors(), start + calm + [(healthy(), carried(0.5))])
    assert got == [(451, "loss_spike", "warn", "")]


def test_a_gradient_blip_at_a_vanished_norm_is_no_spike():
    """A memorised task's grad norm has fallen a thousandfold: a 10x blip stays tiny."""
    reports = [(healthy(), carried(grad_norm=1.0 * 0.6 ** k)) for k in range(12)]
    reports += [(healthy(), carried(grad_norm=1e-3))] * 20 + [(healthy(), carried(
        grad_norm=2e-2))]
    assert run_carry(Detectors(), reports) == []
    reports[-1] = (healthy(), carried(grad_norm=0.5))
    assert run_carry(Detectors(), reports) == [(321, "grad_spike", "warn", "")]


def test_one_step_events_between_reports_name_their_step():
    """The carry holds each window's worst step: a loss spike at step 155, over by the report
    of step 161, and a NaN loss at step 200 whose poisoned weights make the report of step
    201 non-finite from the first layer on: both alerts name the step it happened at."""
    rng = np.random.default_rng(3)
    calm = [(healthy(), carried(1.0 + rng.normal(0, 0.01))) for _ in range(16)]
    spike = (healthy(), carried(1.0, loss_max=5.0, loss_at=155))
    poisoned = healthy()
    poisoned[:, STATS.index("nonfinite")] = 64
    poisoned[:, STATS.index("mean")] = NAN
    nan = (poisoned, carried(NAN, NAN, first=0, loss_bad=200, gn_bad=200))
    det = Detectors()
    got = run_carry(det, calm + [spike] + [(healthy(), carried())] * 3)
    assert got == [(155, "loss_spike", "warn", "")]
    alerts = det.check(201, *nan, CARRY)
    assert [(a.name, a.step, a.layer) for a in alerts] == [("nonfinite", 200, "")]
    assert alerts[0].message == ("non-finite loss at step 200; at step 201, layer 'fc0',"
                                 " the first in forward order, is non-finite too")
    # Without the carry the report's first layer is named, at the report's step.
    [plain] = Detectors().check(201, poisoned, scalars(NAN, NAN, first=0), SCHEMA)
    assert (plain.step, plain.layer) == (201, "fc0")


def test_after_a_nan_no_layer_is_called_dying():
    """Once every layer is NaN, the dead-unit window reads 100 % on every ReLU (NaN is never
    positive): ``nonfinite`` has said it all; dying_layer and dead_jump stay silent, also
    in the reports after it, while the window still holds the NaN reports."""
    det = Detectors(AlertRules(persist=1))
    ok = [(healthy(), scalars())] * 5
    dead = healthy()
    dead[:, STATS.index("dead_frac_window")] = 1.0
    nan = dead.copy()
    nan[:, STATS.index("nonfinite")] = 64
    got = run(det, ok + [(nan, scalars(NAN, NAN, first=0))] * 12)
    assert got == [(6, "nonfinite", "critical", "fc0")]
    # A run that recovers: its window still holds the NaN reports for `dead_window` (10)
    # reports, then its layers are judged again (here they are dead: the rules fire).
    det = Detectors(AlertRules(persist=1))
    got = run(det, ok + [(nan, scalars(NAN, NAN, first=0))] * 2 + [(dead, scalars())] * 12)
    assert got == [(6, "nonfinite", "critical", "fc0")] + [
        (17, "dying_layer", "critical", a) for a in ("act0", "act1", "act2")]


def test_massive_growth_needs_a_large_ratio():
    """A max/median ratio growing 10x from 3 to 30 is an ordinary heavy tail."""
    grow = [set_(healthy(), "fc1", "massive_ratio", 3.0 * 1.6 ** k) for k in range(8)]
    assert run(Detectors(AlertRules(persist=1, growth_window=5)), [(b, scalars())
                                                                  for b in grow]) == []


def test_nested_sequential_pairs_are_not_residual_blocks():
    """``Sequential(Sequential(Linear, ReLU), ...)`` is a plain stack: its Linear layers are
    the chain explode/vanish judges, not the pairs; transformer layers are blocks."""
    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)])
    assert find_blocks(mlp) == []
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, batch_first=True), 3,
                                enable_nested_tensor=False)
    assert find_blocks(enc) == ["layers.0", "layers.1", "layers.2"]
    stages = nn.Sequential(*[nn.Sequential(*[nn.TransformerEncoderLayer(8, 2) for _ in range(2)])
                             for _ in range(2)])
    assert find_blocks(stages) == ["0.0", "0.1", "1.0", "1.1"]
