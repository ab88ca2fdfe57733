"""E7 edge of stability and E11 representation collapse, from the curvature probe's scalars.

The probe (``neurotop.training.curvature``) runs every ``probe_every`` steps or on a ``probe``
command, so its scalars (``PROBE_SCALARS``) are finite in the reports that follow a probe
and NaN in the others. These rules therefore count *probes*, not reports: a condition must
hold on ``probe_persist`` probes in a row, and once it holds its verdict stands (it is
raised again on every report, which fires nothing new) until the next probe says otherwise,
so a sparse probe schedule neither re-arms an incident between two probes nor fires twice
for one. Torch-free (agent thread).

E7 (METRICS.md, DYNSTAB; Cohen et al. 2021, 2022): gradient descent on a quadratic of
curvature lambda is stable only while lambda < 2/lr; full-batch GD raises its sharpness
(progressive sharpening) until it reaches 2/lr and stays there (the edge of stability),
the loss going down non-monotonically. With heavy-ball momentum beta the threshold is
(2 + 2 beta)/lr; for Adam the sharpness that matters is the preconditioned one,
lambda_max(P^-1 H), against (2 + 2 beta1)/((1 - beta1) lr) = 38/lr at beta1 = 0.9. The probe
sends the threshold that fits its optimizer as ``eos_threshold``.

E11 (METRICS.md, DSE, NC): the effective rank (Roy & Vetterli: exp of the entropy of the
normalized singular values) of a chosen layer's features on the probe batch falling more than
``erank_drop`` from its running peak (with C class labels: and under C; a healthy
classifier's features lose a quarter of their rank as they learn, measured); with labels,
NC1 = tr(Sw Sb^+)/C rising after the train error reached zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

#: The curvature probe's report scalars (finite in the report after a probe, NaN in the
#: others): ``lambda_max`` (top Hessian eigenvalue of the probe loss, power iteration),
#: ``hessian_trace`` (Hutchinson), ``precond_sharpness`` (Adam family: lambda_max(P^-1 H)),
#: ``eos_threshold`` (the stability threshold of the optimizer, 2/lr for plain GD),
#: ``probe_loss`` and ``probe_acc`` (the probe batch's loss and, with class labels, its
#: accuracy), ``feature_erank`` and ``nc1`` (the ``features`` layer, E11), ``probe_step``
#: (the step the probe ran at) and ``probe_ms`` (its wall time).
PROBE_SCALARS = ("lambda_max", "hessian_trace", "precond_sharpness", "eos_threshold",
                 "probe_loss", "probe_acc", "feature_erank", "nc1", "probe_step", "probe_ms")

#: Alert names and their METRICS.md rows (merged into ``detectors.ALERTS``).
CURVATURE_ALERTS = {"edge_of_stability": "E7", "representation_collapse": "E11"}


class CurvatureRules:
    """Running state of E7 and E11; ``check`` once per report, in step order. ``add`` is
    ``Detectors._add`` bound to the report's conditions (alert, persist, key): these rules
    pass ``persist=1``, counting persistence in probes themselves."""

    def __init__(self, rules: Any) -> None:
        self.rules = rules
        self._last_probe = math.nan  # probe_step of the probe judged last
        self._streak: dict[str, int] = {}  # probes in a row a condition held
        self._standing: dict[str, Any] = {}  # verdicts standing until the next probe
        self._erank_peak, self._erank_peak_step = -math.inf, 0
        self._erank_seen = 0
        self._zero_error_at: int | None = None  # the first probe at zero train error
        self._nc1_low, self._nc1_low_step = math.inf, 0

    def check(self, step: int, values: dict[str, float], schema: dict[str, Any],
              add: Callable[..., None], alert: Callable[..., Any]) -> None:
        """``alert(name, level, message, step, layer, value)`` makes an ``Alert``."""
        at = values.get("probe_step", math.nan)
        if math.isfinite(at) and at != self._last_probe:
            self._last_probe = at
            self._judge(int(at), values, schema.get("probe") or {}, alert)
        for k, a in self._standing.items():
            add(a, 1, k)

    def _judge(self, at: int, values: dict[str, float], probe: dict[str, Any],
               alert: Callable[..., Any]) -> None:
        """A new probe's verdicts replace the standing ones."""
        found: dict[str, Any] = {}
        eos = self._eos(at, values, probe, alert)
        if eos is not None:
            found["edge_of_stability"] = eos
        for a in (self._erank(at, values, probe, alert), self._nc1(at, values, probe, alert)):
            if a is not None:
                found[f"representation_collapse.{a.value_kind}"] = a.alert
        for k in list(self._streak):
            if k not in found:
                del self._streak[k]
        self._standing = {}
        for k, a in found.items():
            self._streak[k] = self._streak.get(k, 0) + 1
            if self._streak[k] >= self.rules.probe_persist:
                self._standing[k] = a

    def _eos(self, at: int, values: dict[str, float], probe: dict[str, Any],
             alert: Callable[..., Any]) -> Any:
        """E7: the sharpness at ``eos_frac`` of the optimizer's stability threshold or more."""
        r = self.rules
        thr = values.get("eos_threshold", math.nan)
        pre = values.get("precond_sharpness", math.nan)
        adam = math.isfinite(pre)
        s = pre if adam else values.get("lambda_max", math.nan)
        if not (math.isfinite(s) and math.isfinite(thr) and thr > 0) or s < r.eos_frac * thr:
            return None
        lr = values.get("lr", math.nan)
        what = ("preconditioned sharpness lambda_max(P^-1 H)" if adam
                else "sharpness lambda_max(H)")
        bound = str(probe.get("threshold", "2/lr"))
        critical = s >= r.eos_critical * thr
        meaning = (f"{s / thr:.1f}x past the stable limit: the loss will diverge"
                   if critical else "the step is as large as the curvature allows: the loss"
                   " oscillates along the top direction and any lr increase diverges")
        return alert("edge_of_stability", "critical" if critical else "warn",
                     f"{what} {s:.4g} at step {at} is {s / thr:.2f} x {bound} = {thr:.4g}"
                     f" (lr {lr:.3g}): {meaning}; try: lower lr: `set lr x0.5`", at, "",
                     s / thr)

    def _erank(self, at: int, values: dict[str, float], probe: dict[str, Any],
               alert: Callable[..., Any]) -> _Kind | None:
        """E11: the features' effective rank ``erank_drop`` or more under its running peak
        (the first ``erank_warmup`` probes, of a net that has barely trained, are not
        counted; a peak of ``erank_min`` dimensions at least: a 1-D layer has no rank to
        lose). With class labels, only below one dimension per class: a classifier's
        features compress as it learns (towards a simplex of C directions, neural collapse),
        which is learning, not collapse; fewer than C directions cannot keep C classes apart."""
        r = self.rules
        e = values.get("feature_erank", math.nan)
        if not math.isfinite(e):
            return None
        self._erank_seen += 1
        if self._erank_seen <= r.erank_warmup:  # the features of an untrained net
            return None
        peak, peak_at = self._erank_peak, self._erank_peak_step
        if e > peak:
            self._erank_peak, self._erank_peak_step = e, at
        if peak < r.erank_min:
            return None
        classes = int(probe.get("classes") or 0)
        if e >= (1 - r.erank_drop) * peak or (classes >= 2 and e >= classes):
            return None
        layer = str(probe.get("features", ""))
        return _Kind("erank", alert(
            "representation_collapse", "warn",
            f"layer {layer!r}: the effective rank of its features on the probe batch fell to"
            f" {e:.3g} from {peak:.3g} at step {peak_at} ({1 - e / peak:.0%} down): its"
            f" representations are collapsing onto fewer directions; try: lower lr"
            f" (`set lr x0.5`), less weight decay (`set weight_decay x0.5`), or check the"
            f" loss for a trivial solution", at, layer, e / peak))

    def _nc1(self, at: int, values: dict[str, float], probe: dict[str, Any],
             alert: Callable[..., Any]) -> _Kind | None:
        """E11 with labels: NC1 ``nc1_rise`` times its lowest since the train error reached
        zero (``train_acc``, else the probe batch's accuracy, at ``nc1_acc`` or more)."""
        r = self.rules
        nc1 = values.get("nc1", math.nan)
        acc = values.get("train_acc", math.nan)
        if not math.isfinite(acc):
            acc = values.get("probe_acc", math.nan)
        if not math.isfinite(nc1):
            return None
        if self._zero_error_at is None:
            if not acc >= r.nc1_acc:
                return None
            self._zero_error_at = at
        if nc1 < self._nc1_low:
            self._nc1_low, self._nc1_low_step = nc1, at
            return None
        if not nc1 > r.nc1_rise * self._nc1_low or nc1 < r.nc1_min:
            return None
        layer = str(probe.get("features", ""))
        return _Kind("nc1", alert(
            "representation_collapse", "warn",
            f"layer {layer!r}: NC1 (within- over between-class variability of its features)"
            f" rose to {nc1:.3g} from {self._nc1_low:.3g} at step {self._nc1_low_step}, after"
            f" the train error reached zero at step {self._zero_error_at}: the classes'"
            f" features spread apart again while the fit stays perfect; try: more weight"
            f" decay (`set weight_decay x2`) or a lower lr (`set lr x0.5`)", at, layer,
            nc1 / self._nc1_low))


class _Kind:
    """An alert and which E11 test raised it (each is its own incident)."""

    def __init__(self, value_kind: str, alert: Any) -> None:
        self.value_kind, self.alert = value_kind, alert
