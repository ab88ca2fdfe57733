"""Detectors (METRICS.md section E): the agent thread turns each report into alerts.

They read the host copy of a report that the agent publishes anyway, so they cost the
training thread nothing, and they run whether or not a viewer is attached: an alert is
logged, recorded in the session file and published as an ``alert`` event. Torch-free.

A rule must hold for ``persist`` reports in a row before it fires (non-finite values, spikes
and jumps fire at once), and it fires once per incident: within an incident it fires again
only if it gets worse (warn -> critical), and the incident ends (re-arming the rule) once
the condition has been absent for ``rearm`` reports in a row.

Every rule has a minimum effect size besides its statistical test, so that a healthy run
raises nothing: a ratio that is significant but small (a 2x loss "spike" at a loss of 0.01,
a per-layer drift that spans 2x over the whole depth) is not an incident.

One-shot events between reports are seen through the per-step carry
(``neurotop.training.carry``: the window's largest loss and grad norm, and the first step
with a non-finite one, as ``CARRY_SCALARS``): the spike rules judge the window's worst
value and the alerts name the step it came at.

Implemented: E1 massive activation, E2 dying layer, E3 explode/vanish (including non-finite
values, global grad-norm spikes and a GradScaler that keeps skipping steps) and E8 loss
spike; with a head (``watch(head=)``, ``observe(logits=)``), E4 softmax collapse and E12
overconfidence; with ``observe(train_acc=, test_acc=)``, E5 grokking stall and E6 grokking
(``grokking_rules``, also from the parameter statistics); E10 sparsity drift and the
update/weight-ratio band of METRICS.md C (``activity_rules``); with the curvature probe
(``mon.probe_batch``), E7 edge of stability and E11 representation collapse
(``curvature_rules``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

from neurotop.protocol.layerkinds import ACTIVATION_TYPES, activation_flags
from neurotop.service.activity_rules import ACTIVITY_ALERTS, ActivityRules
from neurotop.service.curvature_rules import CURVATURE_ALERTS, CurvatureRules
from neurotop.service.grokking_rules import GROKKING_ALERTS, GrokkingRules

WARN, CRITICAL = "warn", "critical"
INFO = "info"  # good news worth a line in the feed (E6 grokking): below a warning
_RANK = {INFO: 1, WARN: 2, CRITICAL: 3}

#: Every alert name, with its row in METRICS.md E. Names are what ``auto_pause_alerts``
#: and ``AlertRules.off`` take.
ALERTS: dict[str, str] = {
    "nonfinite": "E3", "massive_activation": "E1", "massive_growth": "E1",
    "dying_layer": "E2", "dead_jump": "E2", "explode_vanish": "E3", "grad_spike": "E3",
    "loss_spike": "E8", "amp_skipping": "E3", "softmax_collapse": "E4",
    "overconfidence": "E12",
    **ACTIVITY_ALERTS,  # E10 sparsity_drift, C update_ratio (``activity_rules``)
    **CURVATURE_ALERTS,  # E7 edge_of_stability, E11 representation_collapse (the probe)
    **GROKKING_ALERTS,  # E5 grokking_stall, E6 grokking (``grokking_rules``)
    # a job's rank rules (``neurotop.service.rank_rules``; README, docs/scaling.md)
    "straggler": "ranks", "rank_divergence": "ranks",
}


#: Activation modules whose outputs E2 watches by default (the UI colours the same).
DEAD_TYPES = ACTIVATION_TYPES


class AlertRulesError(ValueError):
    """A rule value that cannot be used; the message names it."""


@dataclass
class AlertRules:
    """Thresholds of the detectors; the defaults are METRICS.md's. Reports, not steps, are
    the unit of ``persist``, ``warmup`` and the windows, except where a name says steps."""

    #: Reports in a row a condition must hold before it fires (E: "require persistence").
    persist: int = 3
    #: Reports in a row a condition must be absent before its incident ends and it may
    #: fire again: a value hovering at a threshold raises one alert, not one per crossing.
    rearm: int = 20
    #: E1: max|a| above this **and** max|a| / median|a| above ``massive_ratio``.
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0
    #: E1: warn when the ratio grew this many times within ``growth_window`` reports ...
    massive_growth: float = 10.0
    growth_window: int = 20
    #: ... to above this (a tenth of ``massive_ratio``): a max/median of 3 growing to 30 is
    #: an ordinary heavy tail (GELU and LayerNorm outputs sit at 10-50), not an outlier
    #: feature on its way.
    massive_growth_min: float = 100.0
    #: E1 judges no layer whose zero fraction is at least this: the median |a| of an output
    #: that is about half zeros (a ReLU's) is the smallest positive values or 0, so its
    #: max/median jumps by orders of magnitude from batch to batch (softmax_collapse demo:
    #: 200 .. 8e5 at a max |a| of 4); a real outlier shows in the layer before it too.
    massive_sparse: float = 0.4
    #: E2: dead-unit fraction (over the window where measured, else in the batch) of the
    #: layers of these types: activation functions, where "never positive" means dead (a
    #: logits layer whose outputs are all negative is healthy). Also of layers whose class
    #: is named like an activation (``layerkinds.ACTIVATION_NAME``: ``NewGELU``) and of
    #: those the autograd graph showed compute one or feed a functional one (the schema's
    #: ``activations``: ``fc1`` in ``F.relu(self.fc1(x))``).
    dead_types: tuple[str, ...] = DEAD_TYPES
    #: Warn past half the units (the layer works at half its width), critical past 90 %.
    dead_warn: float = 0.5
    dead_critical: float = 0.9
    #: E2: a rise of the dead fraction by more than this within ``dead_jump_steps`` steps
    #: (an effect size by itself: 30 % of a layer's units). Neither E2 rule judges a layer
    #: whose window held non-finite values (a NaN unit is never positive: every ReLU would
    #: read dead, and ``nonfinite`` says it already), nor a report with a ``nonfinite`` alert.
    dead_jump: float = 0.3
    dead_jump_steps: int = 100
    #: E3: |median ln ratio| of consecutive layers of the chain (the blocks, or else the most
    #: common layer type) for the activation RMS and the backprop signal RMS(dL/dh) above
    #: this (METRICS.md measures 0.35 at C_W=1, 0.20 at C_W=3, 0.002 at the critical 2) ...
    gain: float = 0.1
    #: ... on chains at least this long (a few ratios say little) ...
    gain_min_layers: int = 4
    #: ... and only when that drift, compounded over the chain (exp(|median| x (n - 1))),
    #: spans more than this: a drift compounds only over depth. The 6-layer demo MLP drifts
    #: 1.12x per layer, 2x over the net; a default-initialised 5-layer MLP 2.5x per layer,
    #: 39x; pre-LN transformers 1.1-1.4x per block (the residual stream's gradient adds up
    #: going back): all train fine. At 100x an update size right for one end of the net is
    #: two orders of magnitude off for the other.
    gain_span: float = 100.0
    #: E3: backprop signal of the chain's first layer over its last outside [1/x, x]
    #: (critical: three orders of magnitude, where one end of the net barely trains).
    signal_span: float = 1e3
    #: E3: global grad norm above this many times its running average ...
    grad_spike: float = 10.0
    #: ... and above this fraction of the largest norm of the ``warmup`` reports: once the
    #: gradient has shrunk a thousandfold (a memorised task), a 10x blip is still tiny.
    grad_spike_min: float = 0.1
    #: E8: loss above its running average + this many running deviations ...
    loss_sigmas: float = 6.0
    #: ... or above this many times the median of the last ``loss_window`` reports ...
    loss_median: float = 2.0
    loss_window: int = 50
    #: ... and above both by more than this fraction of the largest |loss| of the
    #: ``warmup`` reports: a memorised task's loss moving from 0.0098 to 0.020 doubles, but
    #: undoes half a percent of the progress from ln(C); a spike that matters undoes more.
    loss_min_rise: float = 0.05
    #: E3 (AMP): the GradScaler skipped more than this fraction of the steps since the
    #: previous report, ``persist`` reports in a row after ``warmup`` (the scaler finds its
    #: scale by skipping at the start); critical at once when no step was taken since the
    #: previous report (a run stuck skipping reports once 32 skips are in a row, see
    #: ``neurotop.training.amp``).
    skip_frac: float = 0.2
    #: Reports seen before the running-average rules (E3 spikes, E8) may fire; their
    #: largest values are the scale of ``grad_spike_min`` and ``loss_min_rise``. The spike
    #: rules judge each report's worst step since the previous report (``CARRY_SCALARS``),
    #: against the history of those worst values, and name that step.
    warmup: int = 10
    #: E4 (with a head: ``watch(head=)`` or ``observe(logits=)``): critical as soon as a
    #: row's softmax is exactly one-hot in the loss dtype (``head.collapse_frac`` > 0);
    #: warn, ``persist`` reports in a row, when the 90th percentile of the top-1 margin
    #: passes this fraction of the dtype's onset ln(2/eps) (float32 16.6, bfloat16 5.5),
    #: below which no row can collapse.
    margin_warn: float = 1.0
    #: E12: mean output entropy below this fraction of ln(classes) ``persist`` reports in
    #: a row, while the loss is still above the same level ("early in training": a model
    #: sure of answers it has not learnt; once the loss is as low, confidence is earned).
    overconf_entropy: float = 0.05
    #: Weight of the newest report in the running averages.
    ema: float = 0.1
    #: Alert names never to raise.
    off: tuple[str, ...] = field(default_factory=tuple)
    #: E10 (``activity_rules``): a ReLU-type layer's activation ratio (1 - ``zero_frac``),
    #: averaged over the last tenth of a window of ``sparsity_steps`` steps, above its
    #: average over the window's first tenth by more than ``sparsity_rise`` and above
    #: ``sparsity_dense``.
    sparsity_steps: int = 300
    sparsity_rise: float = 0.25
    sparsity_dense: float = 0.8
    #: METRICS.md C update ratio ||dW||/||W|| per parameter (biases aside) after ``warmup``:
    #: too large above ``update_high``; stalled below ``update_low`` while ||g||/||W|| is
    #: at least ``update_grad``; not judged while the lr is under ``update_lr_floor`` of the
    #: largest lr seen (a schedule's tail).
    update_high: float = 0.1
    update_low: float = 1e-6
    update_grad: float = 1e-3
    update_lr_floor: float = 0.01
    #: E7/E11 (``curvature_rules``, from the curvature probe): probes in a row a condition
    #: must hold (probes, not reports: they are sparse).
    probe_persist: int = 2
    #: E7: sharpness (Adam: preconditioned) at this fraction of the optimizer's stability
    #: threshold ``eos_threshold`` (2/lr for GD) or more warns; this multiple is critical.
    eos_frac: float = 0.9
    eos_critical: float = 2.0
    #: E11: the features' effective rank this fraction under its running peak (the first
    #: ``erank_warmup`` probes not counted, a peak of ``erank_min`` at least; with C class
    #: labels only under C: a classifier's features compress as it learns) ...
    erank_drop: float = 0.2
    erank_warmup: int = 2
    erank_min: float = 2.0
    #: ... or, with labels, NC1 above ``nc1_rise`` x its lowest since the train accuracy
    #: (``train_acc``, else the probe batch's) reached ``nc1_acc``, and above ``nc1_min``.
    nc1_acc: float = 0.999
    nc1_rise: float = 2.0
    nc1_min: float = 0.1
    #: E5/E6 (``grokking_rules``, from ``observe(train_acc=, test_acc=)`` and the weight
    #: norm and cos(-g, theta) of the parameter statistics): trends are least-squares fits
    #: over the last ``grok_window`` reports, as changes over the steps the window spans.
    grok_window: int = 20
    #: Memorized: train acc at least this, test acc ``grok_gap`` or more under it.
    grok_train_acc: float = 0.99
    grok_gap: float = 0.1
    #: E5: test acc changed less than this (absolute) over the window: flat ...
    grok_test_flat: float = 0.02
    #: ... while the weight norm rose by more than this fraction of itself and the mean
    #: over the parameters of cos(-g, theta) is above ``grok_cos`` (the NLM direction).
    grok_norm_rise: float = 0.01
    grok_cos: float = 0.8
    #: E6: test acc rose by more than this (absolute) over the window while the weight norm
    #: fell by more than ``grok_norm_fall`` of itself, after a memorization.
    grok_test_rise: float = 0.05
    grok_norm_fall: float = 0.01

    def __post_init__(self) -> None:
        self.off, self.dead_types = tuple(self.off), tuple(self.dead_types)
        check_names("off", self.off)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("off", "dead_types"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise AlertRulesError(f"alert rule {f.name} must be a number > 0, got {v!r}")
            if f.type == "int" and not isinstance(v, int):
                raise AlertRulesError(f"alert rule {f.name} must be an integer, got {v!r}")
        if not self.ema <= 1:
            raise AlertRulesError(f"alert rule ema must be in (0, 1], got {self.ema!r}")
        if not self.dead_warn <= self.dead_critical:
            raise AlertRulesError("alert rule dead_warn must not exceed dead_critical")


def alert_rules(v: AlertRules | dict[str, Any] | None) -> AlertRules:
    """``watch(alerts=...)``: rules, a dict of rule fields, or None for the defaults."""
    if v is None or isinstance(v, AlertRules):
        return v or AlertRules()
    if not isinstance(v, dict):
        raise AlertRulesError(f"alerts must be AlertRules or a dict, got {type(v).__name__}")
    known = [f.name for f in dataclasses.fields(AlertRules)]
    bad = sorted(set(v) - set(known))
    if bad:
        raise AlertRulesError(f"unknown alert rule(s) {bad}; known: {', '.join(known)}")
    return AlertRules(**v)


def check_names(what: str, names: Iterable[str]) -> None:
    """Refuse alert names that do not exist, listing the ones that do."""
    bad = sorted(set(names) - set(ALERTS))
    if bad:
        raise AlertRulesError(f"{what}: unknown alert(s) {bad}; known: {', '.join(ALERTS)}")


@dataclass
class Alert:
    """One fired rule, as published in an ``alert`` event."""

    name: str
    level: str
    message: str  # says what and where (the step is beside it)
    step: int
    layer: str = ""
    value: float = math.nan

    def event(self) -> dict[str, Any]:
        return {"event": "alert", "alert": self.name, "rule": ALERTS[self.name],
                "level": self.level, "message": self.message, "step": self.step,
                "layer": self.layer, "value": self.value}


@dataclass
class _Condition:
    alert: Alert
    persist: int


class Detectors:
    """Holds the running state of every rule; ``check`` once per report, in step order."""

    def __init__(self, rules: AlertRules | None = None) -> None:
        self.rules = rules or AlertRules()
        self._streak: dict[tuple[str, str], int] = {}  # reports in a row the condition held
        self._absent: dict[tuple[str, str], int] = {}  # ... it was absent, in an incident
        self._fired: dict[tuple[str, str], int] = {}  # rank of the level fired per incident
        self._seen_finite: set[str] = set()
        self._reports = 0
        self._loss_ema = self._loss_var = self._gn_ema = math.nan
        self._loss_scale = self._gn_scale = 0.0  # the largest |values| of the warmup reports
        self._nonfinite_at: dict[str, int] = {}  # layer -> last report it was non-finite in
        self._losses: deque[float] = deque(maxlen=self.rules.loss_window)
        self._ratios: dict[str, tuple[deque[int], deque[float]]] = {}  # steps, ratios
        self._dead: dict[str, deque[tuple[int, float]]] = {}
        self._skips: tuple[int, float] | None = None  # (step, skipped_steps) last report
        self._activity = ActivityRules(self.rules)  # E10, update ratio
        self._curvature = CurvatureRules(self.rules)  # E7, E11
        self._grokking = GrokkingRules(self.rules)  # E5, E6

    def check(self, step: int, block: np.ndarray, scalars: np.ndarray,
              schema: dict[str, Any], params: np.ndarray | None = None) -> list[Alert]:
        """The alerts this report fires (most reports: none). ``params``: the same report's
        ``[params x PARAM_STATS]`` block (the params message), where measured."""
        found: dict[tuple[str, str], _Condition] = {}
        stats, layers = list(schema.get("stats", [])), list(schema.get("layers", []))
        values = _scalars(scalars, schema)
        bad = self._nonfinite(step, block, values, stats, layers, found)
        window = int(schema.get("config", {}).get("dead_window", 10))
        for i in np.flatnonzero(bad):
            self._nonfinite_at[layers[i]] = self._reports
        tainted = {n for n, k in self._nonfinite_at.items() if self._reports - k < window}
        quiet = ("nonfinite", "any") in found  # the report's alert says it all already
        if block.ndim == 2 and block.shape == (len(layers), len(stats)):
            col = {s: block[:, j].astype(np.float64) for j, s in enumerate(stats)}
            self._massive(step, col, layers, found)
            self._dying(step, col, layers, list(schema.get("layer_types", [])),
                        list(schema.get("activations", [])), tainted, quiet, found)
            self._gain(step, col, layers, schema, found)
        self._spikes(step, values, found)
        self._skipping(step, values, found)
        self._head(step, values, schema.get("head") or {}, found)
        self._activity.check(step, col if block.ndim == 2 and block.shape == (
            len(layers), len(stats)) else {}, values, schema, params, tainted, Alert,
            lambda a, persist, key: self._add(found, a, persist, key=key))
        self._curvature.check(step, values, schema,
                              lambda a, persist, key: self._add(found, a, persist, key=key), Alert)
        for g in self._grokking.check(step, values, params, schema):  # E5, E6
            self._add(found, Alert(g.name, g.level, g.message, g.step, value=g.value), g.persist)
        self._reports += 1
        return self._settle(found)

    # -- rules -------------------------------------------------------------------------

    def _nonfinite(self, step: int, block: np.ndarray, values: dict[str, float],
                   stats: list[str], layers: list[str],
                   found: dict[tuple[str, str], _Condition]) -> np.ndarray:
        """Any NaN/Inf is critical: one incident, named by the step and the first layer (in
        forward order) that produced one, else by the scalar. A non-finite loss or grad norm
        on a step between reports (the per-step carry) is dated to its step: by the report
        the weights it poisoned make every layer non-finite, so the report's first layer
        says nothing about where it came from. A scalar that was never finite is taken as
        not reported (a loss the loop never observed is NaN in every report), except +-Inf.
        Returns which layers are non-finite in this report."""
        alerts, carried = [], []
        for k, name in enumerate(("loss", "grad_norm")):  # in a step, the loss comes first
            at = values.get(f"{name}_nonfinite_step", math.nan)
            if math.isfinite(at) and at >= 0:  # observed non-finite on a step: real
                carried.append((int(at), k, name))
            if math.isfinite(values.get(f"{name}_max", math.nan)):
                self._seen_finite.add(name)
            v = values.get(name)
            if v is None:
                continue
            # The carry saw every step's value and none was non-finite: a NaN here is a
            # value not measured at the report (an optimizer attached after its step).
            clean = at == -1
            if math.isfinite(v):
                self._seen_finite.add(name)
            elif math.isinf(v) or (name in self._seen_finite and not clean):
                alerts.append(Alert("nonfinite", CRITICAL, f"non-finite {name} ({v})", step,
                                    value=v))
        bad = np.zeros(len(layers), dtype=bool)
        if block.ndim == 2 and block.shape[1] == len(stats) and len(block):
            present = ~np.all(np.isnan(block), axis=1)  # all NaN: the layer did not run
            bad = np.zeros(block.shape[0], dtype=bool)
            for s in ("mean", "max_abs"):
                if s in stats:
                    bad |= present & ~np.isfinite(block[:, stats.index(s)])
            count = np.zeros(block.shape[0])
            if "nonfinite" in stats:
                count = np.nan_to_num(block[:, stats.index("nonfinite")].astype(np.float64))
                bad |= count > 0
            if bad.any():
                first = values.get("first_nonfinite", -1)
                first = int(first) if math.isfinite(first) else -1
                i = first if 0 <= first < len(bad) and bad[first] else int(np.argmax(bad))
                layer = layers[i] if i < len(layers) else str(i)
                n = f"{count[i]:.0f} values" if count[i] > 0 else "in its statistics"
                alerts.insert(0, Alert("nonfinite", CRITICAL, f"non-finite activations in"
                                       f" layer {layer!r}, the first in forward order ({n})",
                                       step, layer, float(count[i])))
        if carried:
            at, _, name = min(carried)
            if at < step or not alerts:
                then = ""
                if alerts and alerts[0].layer:
                    then = (f"; at step {step}, layer {alerts[0].layer!r}, the first in forward"
                            f" order, is non-finite too")
                elif alerts:
                    then = f"; still at step {step}"
                v = values.get(name, math.nan)
                alerts.insert(0, Alert("nonfinite", CRITICAL, f"non-finite {name} at step"
                                       f" {at}{then}", at,
                                       value=math.nan if math.isfinite(v) else v))
        if alerts:
            self._add(found, alerts[0], 1, key="any")
        return bad if len(bad) == len(layers) else np.zeros(len(layers), dtype=bool)

    def _massive(self, step: int, col: dict[str, np.ndarray], layers: list[str],
                 found: dict[tuple[str, str], _Condition]) -> None:
        r = self.rules
        if "max_abs" not in col or "massive_ratio" not in col:
            return
        horizon = r.growth_window
        # As Python floats: indexing a NumPy array per layer cost more than the rule itself.
        tops, massive = col["max_abs"].tolist(), col["massive_ratio"].tolist()
        sparse = col["zero_frac"].tolist() if "zero_frac" in col else None
        for i, layer in enumerate(layers):
            top, ratio = tops[i], massive[i]
            if not (math.isfinite(top) and math.isfinite(ratio)):
                continue
            if sparse is not None and sparse[i] >= r.massive_sparse:
                self._ratios.pop(layer, None)  # no scale to judge by (``massive_sparse``)
                continue
            if top > r.massive_abs and ratio > r.massive_ratio:
                self._add(found, Alert(
                    "massive_activation", WARN,
                    f"layer {layer!r}: max|a| {top:.3g} is {ratio:.3g}x its median |a|"
                    f"", step, layer, float(ratio)), r.persist)
            steps, ratios = self._ratios.setdefault(
                layer, (deque(maxlen=horizon), deque(maxlen=horizon)))
            if len(ratios) == horizon and ratio > 0:
                low = min(ratios)
                if low > 0 and ratio > r.massive_growth * low and ratio > r.massive_growth_min:
                    self._add(found, Alert(
                        "massive_growth", WARN,
                        f"layer {layer!r}: max|a|/median|a| grew {ratio / low:.1f}x to"
                        f" {ratio:.3g} since step {steps[0]}", step, layer, float(ratio)),
                        r.persist)
            steps.append(step)
            ratios.append(float(ratio))

    def _dying(self, step: int, col: dict[str, np.ndarray], layers: list[str],
               types: list[str], acts: list[str], tainted: set[str], quiet: bool,
               found: dict[tuple[str, str], _Condition]) -> None:
        """``tainted``: layers whose dead-unit window held non-finite values (not judged, and
        their jump history starts over once the window is clean); ``quiet``: judge none."""
        r = self.rules
        name = "dead_frac_window" if "dead_frac_window" in col else "dead_frac"
        if name not in col:
            return
        over = "over the window" if name == "dead_frac_window" else "in the batch"
        if len(acts) != len(layers):
            acts = [""] * len(layers)
        judged = activation_flags(tuple(types), tuple(acts), tuple(r.dead_types))
        for i, (layer, dead) in enumerate(zip(layers, col[name].tolist(), strict=True)):
            if not math.isfinite(dead) or i >= len(judged) or not judged[i]:
                continue
            if layer in tainted:
                self._dead.pop(layer, None)
                continue
            before = f" (before {acts[i]})" if acts[i].startswith("F.") else ""
            if dead > r.dead_warn and not quiet:
                level = CRITICAL if dead > r.dead_critical else WARN
                self._add(found, Alert("dying_layer", level,
                                       f"layer {layer!r}{before}: {dead:.0%} of units dead"
                                       f" {over}", step, layer, float(dead)),
                          r.persist)
            hist = self._dead.setdefault(layer, deque())
            while hist and step - hist[0][0] > r.dead_jump_steps:
                hist.popleft()
            if hist and not quiet:
                low_step, low = min(hist, key=itemgetter(1))
                if dead - low > r.dead_jump:
                    self._add(found, Alert(
                        "dead_jump", WARN,
                        f"layer {layer!r}: dead units rose from {low:.0%} at step {low_step}"
                        f" to {dead:.0%}", step, layer, float(dead - low)), 1)
            hist.append((step, float(dead)))

    def _gain(self, step: int, col: dict[str, np.ndarray], layers: list[str],
              schema: dict[str, Any], found: dict[tuple[str, str], _Condition]) -> None:
        """Criticality: the chain's activation RMS and backprop signal should neither grow
        nor shrink layer after layer. The activation rule skips residual blocks, whose
        stream grows by design."""
        for model, (chain, what) in _chains(layers, schema).items():
            if len(chain) >= self.rules.gain_min_layers:
                self._gain_of(step, col, layers, chain, what, model, found)

    def _gain_of(self, step: int, col: dict[str, np.ndarray], layers: list[str],
                 chain: list[int], what: str, model: str,
                 found: dict[tuple[str, str], _Condition]) -> None:
        """``_gain`` on one model's chain (``model``: "" for a single model)."""
        r = self.rules
        checks = [("grad_rms", "backprop signal RMS(dL/dh)")]
        if what != "blocks":
            checks.append(("rms", "activation RMS"))
        for stat, label in checks:
            if stat not in col:
                continue
            v = col[stat][chain]
            if not (np.all(np.isfinite(v)) and np.all(v > 0)):
                continue
            logs = np.log(v)
            # The median, not METRICS.md's mean: the mean telescopes to (last - first) / n,
            # so one change of width (a 10-class head after 1024-wide layers) decides it.
            g = statistics.median(np.diff(logs).tolist())
            span = math.exp(min(abs(g) * (len(chain) - 1), 700.0))
            if abs(g) > r.gain and span > r.gain_span:
                trend = "grows" if g > 0 else "shrinks"
                self._add(found, Alert(
                    "explode_vanish", WARN,
                    f"{label} {trend} {math.exp(abs(g)):.2f}x per layer, {span:.3g}x over"
                    f" {len(chain)} {what} ({layers[chain[0]]} .. {layers[chain[-1]]})",
                    step, "", g), r.persist, key=f"{stat}{model}")
            if stat == "grad_rms":
                span = float(v[0] / v[-1])
                if not 1 / r.signal_span <= span <= r.signal_span:
                    self._add(found, Alert(
                        "explode_vanish", CRITICAL,
                        f"backprop signal at {layers[chain[0]]} is {span:.3g}x the one at"
                        f" {layers[chain[-1]]}", step, "", span),
                        r.persist, key=f"span{model}")

    def _spikes(self, step: int, values: dict[str, float],
                found: dict[tuple[str, str], _Condition]) -> None:
        """E3 grad-norm and E8 loss spikes, on each report's worst step since the previous
        one (the carry; else the report step's own value), against the history of those."""
        r, a = self.rules, self.rules.ema
        warm = self._reports >= r.warmup
        gn, gn_at = _worst(values, "grad_norm", step)
        if math.isfinite(gn):
            if (warm and self._gn_ema > 0 and gn > r.grad_spike * self._gn_ema
                    and gn > r.grad_spike_min * self._gn_scale):
                self._add(found, Alert(
                    "grad_spike", WARN, f"global grad norm {gn:.3g} at step {gn_at} is"
                    f" {gn / self._gn_ema:.1f}x its running average {self._gn_ema:.3g}", gn_at,
                    value=gn), 1)
            if not warm:
                self._gn_scale = max(self._gn_scale, gn)
            self._gn_ema = gn if math.isnan(self._gn_ema) else self._gn_ema + a * (
                gn - self._gn_ema)
        loss, at = _worst(values, "loss", step)
        if not math.isfinite(loss):
            return
        if warm and len(self._losses) >= min(10, r.loss_window):
            # ``statistics`` on these few finite floats: ``np.median`` costs ~20 us a call
            # (its NaN check), and its first call imports ``numpy.ma`` (~13 ms, holding the
            # GIL the training thread needs).
            sd, med = math.sqrt(self._loss_var), statistics.median(self._losses)
            rise = loss - max(self._loss_ema, med)
            if (loss > self._loss_ema + r.loss_sigmas * sd or (
                    med > 0 and loss > r.loss_median * med)) and (
                    rise > r.loss_min_rise * self._loss_scale):
                self._add(found, Alert(
                    "loss_spike", WARN, f"loss {loss:.4g} at step {at} above its running"
                    f" average {self._loss_ema:.4g} ± {sd:.2g}, median of the last"
                    f" {len(self._losses)} reports {med:.4g}", at, value=loss), 1)
        if not warm:
            self._loss_scale = max(self._loss_scale, abs(loss))
        if math.isnan(self._loss_ema):
            self._loss_ema, self._loss_var = loss, 0.0
        else:
            d = loss - self._loss_ema
            self._loss_ema += a * d
            self._loss_var = (1 - a) * (self._loss_var + a * d * d)
        self._losses.append(loss)

    def _skipping(self, step: int, values: dict[str, float],
                  found: dict[tuple[str, str], _Condition]) -> None:
        """AMP: the share of steps the GradScaler skipped (Inf/NaN gradients) since the
        previous report. A healthy run skips a few at the start and one now and then when
        the scale grows past what fp16 holds; one that keeps skipping does not train."""
        r = self.rules
        skipped = values.get("skipped_steps", math.nan)
        if not math.isfinite(skipped):
            return
        last, self._skips = self._skips, (step, skipped)
        if last is None:
            return
        missed, stepped = skipped - last[1], step - last[0]
        if missed <= 0:
            return
        scale = values.get("loss_scale", math.nan)
        if stepped <= 0:
            self._add(found, Alert(
                "amp_skipping", CRITICAL, f"the GradScaler skipped every step since step"
                f" {last[0]}: {skipped:.0f} skipped in all (loss scale {scale:.3g})", step,
                value=missed), 1)
            return
        frac = missed / (missed + stepped)
        if self._reports >= r.warmup and frac > r.skip_frac:
            self._add(found, Alert(
                "amp_skipping", WARN, f"the GradScaler skipped {missed:.0f} of the last"
                f" {missed + stepped:.0f} steps ({frac:.0%}; loss scale {scale:.3g})", step,
                value=frac), r.persist)

    def _head(self, step: int, values: dict[str, float], head: dict[str, Any],
              found: dict[tuple[str, str], _Condition]) -> None:
        """E4 softmax collapse and E12 overconfidence, from the head statistics."""
        r, name = self.rules, str(head.get("name", "logits"))
        dtype, onset = head.get("dtype", "float32"), float(head.get("margin_onset", math.nan))
        sc, m90 = values.get("head.collapse_frac", math.nan), values.get("head.margin_p90",
                                                                          math.nan)
        zero = values.get("head.zero_loss_frac", math.nan)
        zeros = f"; {zero:.1%} of the rows have a loss of exactly 0" if zero > 0 else ""
        if sc > 0:
            self._add(found, Alert(
                "softmax_collapse", CRITICAL,
                f"head {name!r}: {sc:.1%} of the rows have a softmax that is exactly one-hot"
                f" in {dtype}{zeros}: their gradient is 0 and only the logits' scale still"
                f" grows; try: add weight decay (`set weight_decay 0.1`) or a float64 loss",
                step, name, sc), 1)
        elif m90 >= r.margin_warn * onset:
            self._add(found, Alert(
                "softmax_collapse", WARN,
                f"head {name!r}: 10% of the rows have a top-1 margin of {m90:.3g} or more,"
                f" past {onset:.3g} where a {dtype} softmax can round to one-hot; try: add"
                f" weight decay (`set weight_decay 0.1`)", step, name, m90), r.persist)
        classes = float(head.get("classes", 0))
        entropy, loss = values.get("head.entropy", math.nan), values.get("loss", math.nan)
        low = r.overconf_entropy * math.log(classes) if classes > 1 else math.nan
        if entropy < low and loss > low:
            self._add(found, Alert(
                "overconfidence", WARN,
                f"head {name!r}: mean output entropy {entropy:.3g} nats is under"
                f" {r.overconf_entropy:g} x ln {classes:.0f} while the loss is {loss:.3g}:"
                f" the model is sure of answers it has not learnt; try: lower lr, label"
                f" smoothing, or a softmax temperature above 1", step, name, entropy),
                r.persist)

    # -- incidents ---------------------------------------------------------------------

    def _add(self, found: dict[tuple[str, str], _Condition], alert: Alert, persist: int,
             key: str = "") -> None:
        k = (alert.name, key or alert.layer)
        old = found.get(k)
        if old is None or _RANK[alert.level] > _RANK[old.alert.level]:
            found[k] = _Condition(alert, persist)

    def _settle(self, found: dict[tuple[str, str], _Condition]) -> list[Alert]:
        for k in [k for k in self._streak if k not in found]:
            self._streak.pop(k)
        for k in [k for k in self._fired if k not in found]:
            self._absent[k] = self._absent.get(k, 0) + 1
            if self._absent[k] >= self.rules.rearm:  # the incident is over: re-arm
                del self._fired[k], self._absent[k]
        out = []
        for k, c in found.items():
            self._absent.pop(k, None)
            self._streak[k] = self._streak.get(k, 0) + 1
            rank = _RANK[c.alert.level]
            if (self._streak[k] >= c.persist and rank > self._fired.get(k, 0)
                    and c.alert.name not in self.rules.off):
                self._fired[k] = rank
                out.append(c.alert)
        return out


def _worst(values: dict[str, float], name: str, step: int) -> tuple[float, int]:
    """The largest finite ``name`` of the steps up to this report and its step: the
    carry's (``name_max``) where measured, else the report's own."""
    v, top = values.get(name, math.nan), values.get(f"{name}_max", math.nan)
    if math.isfinite(top) and not v > top:
        at = values.get(f"{name}_max_step", math.nan)
        return top, int(at) if math.isfinite(at) else step
    return v, step


def _scalars(scalars: np.ndarray, schema: dict[str, Any]) -> dict[str, float]:
    names = list(schema.get("scalars", []))
    return {n: float(scalars[i]) for i, n in enumerate(names) if i < len(scalars)}


def _chains(layers: list[str], schema: dict[str, Any]) -> dict[str, tuple[list[int], str]]:
    """Each watched model's chain (``_chain``): a GAN's generator and discriminator are two
    networks, each with its own depth profile, not one stack (``models``: the schema's
    model names when there are several; their layers are named ``MODEL.path``)."""
    models = [m for m in schema.get("models") or [] if isinstance(m, str)]
    if len(models) < 2:
        return {"": _chain(layers, schema)}
    out = {}
    for m in models:
        keep = [i for i, n in enumerate(layers) if n.startswith(f"{m}.")]
        sub = {"blocks": [b for b in schema.get("blocks", []) if b.startswith(f"{m}.")],
               "layer_types": [schema.get("layer_types", [""] * len(layers))[i] for i in keep]
               if len(schema.get("layer_types", [])) == len(layers) else []}
        chain, what = _chain([layers[i] for i in keep], sub)
        out[m] = ([keep[i] for i in chain], what)
    return out


def _chain(layers: list[str], schema: dict[str, Any]) -> tuple[list[int], str]:
    """Indices of the layers whose depth profile matters: the blocks if the model has them,
    else the layers of its most common type (a plain stack's Linear layers, say)."""
    index = {n: i for i, n in enumerate(layers)}
    blocks = [index[b] for b in schema.get("blocks", []) if b in index]
    if blocks:
        return blocks, "blocks"
    types = list(schema.get("layer_types", []))
    if len(types) != len(layers) or not types:
        return [], ""
    common = max(dict.fromkeys(types), key=types.count)
    return [i for i, t in enumerate(types) if t == common], f"{common} layers"
