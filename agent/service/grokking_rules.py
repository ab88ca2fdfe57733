"""E5 grokking stall and E6 grokking in progress (METRICS.md E5, E6): the agent thread's
rules on a memorized task. Torch-free; ``Detectors.check`` calls ``GrokkingRules.check``
once per report and turns what it finds into alerts (persistence, re-arm, ``off``).

Inputs: the user scalars ``train_acc`` and ``test_acc`` (``mon.observe(train_acc=...,
test_acc=...)``, fractions in [0, 1]) and the report's ``[params x PARAM_STATS]`` block
(``weight_norm``, ``nlm_cos``). Without either accuracy or the block, neither rule judges;
nor on accuracies outside [0, 1] (percentages: 99.5 would read as memorized, always).

Over the last ``grok_window`` reports (a report with no finite value of a series is left
out of that series), each series is fitted by least squares against the step, and its
**change over the window** is the slope times the steps the window spans:

- the total weight norm ||theta|| = sqrt(sum of the parameters' weight_norm^2) is judged
  by its relative change: **rising** past ``+grok_norm_rise``, **falling** past
  ``-grok_norm_fall`` (a fit of ln ||theta||);
- test accuracy is **flat** when its change is under ``grok_test_flat`` (absolute), and
  **rising** past ``grok_test_rise``.

A fit, not the window's end points, so that one noisy evaluation neither makes nor breaks
a trend.

E5 ``grokking_stall`` (warn): train acc >= ``grok_train_acc`` on every report of the window
(so the rise of ||theta|| while the training set was being fitted does not count), test
acc at least ``grok_gap`` under it (there is something left to generalize), test flat,
||theta|| rising,
and the mean over the parameters of cos(-g, theta) above ``grok_cos``: the gradient points
along the weights, the naive-loss-minimization (NLM) direction of GROK-NS, which scales
the logits without changing a prediction. Weight decay holds the norm (and pulls it down),
so under weight decay the cosine can be as high without E5.

E6 ``grokking`` (info: good news): after a memorization (a report with train acc >=
``grok_train_acc`` and test acc at least ``grok_gap`` under it, at or before the window's
first report), test acc rising while ||theta|| falls: the circuit that generalizes is
replacing the one that memorized. With label noise xi a train acc falling to 100(1 - xi) %
meanwhile is expected (GROK-NOISE: the noisy labels are being unlearnt), so E6 does not ask
for train acc to stay high.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The alerts of this module, with their METRICS.md E rows (``detectors.ALERTS`` has them).
GROKKING_ALERTS = {"grokking_stall": "E5", "grokking": "E6"}
#: The user scalars the rules read, by name.
TRAIN_ACC, TEST_ACC = "train_acc", "test_acc"


@dataclass
class Finding:
    """One condition that holds on this report; ``Detectors`` makes it an ``Alert``."""

    name: str
    level: str
    message: str
    step: int
    value: float
    persist: int


class GrokkingRules:
    """The series of the last ``grok_window`` reports, and whether a memorization was seen.
    ``rules``: the ``AlertRules`` (its ``grok_*`` fields and ``persist``)."""

    def __init__(self, rules: Any) -> None:
        self.rules = rules
        n = int(rules.grok_window)
        if n < 3:  # a trend needs three points (``_change``)
            raise ValueError(f"alert rule grok_window must be at least 3, got {n}")
        #: (step, ||theta||, test acc, train acc) of the last n reports that had any
        self._hist: deque[tuple[int, float, float, float]] = deque(maxlen=n)
        self._memorized: int | None = None  # the first report step with a memorization

    def check(self, step: int, values: dict[str, float], params: np.ndarray | None,
              schema: dict[str, Any]) -> list[Finding]:
        """What holds on this report (most reports: nothing)."""
        train = values.get(TRAIN_ACC, math.nan)
        test = values.get(TEST_ACC, math.nan)
        norm, cos = _weights(params, schema)
        if not (0 <= train <= 1 and 0 <= test <= 1):  # NaN too; percentages are not judged
            return []
        r = self.rules
        self._hist.append((step, norm, test, train))
        gap = train - test
        if self._memorized is None and train >= r.grok_train_acc and gap >= r.grok_gap:
            self._memorized = step
        if len(self._hist) < self._hist.maxlen:
            return []
        steps = np.array([h[0] for h in self._hist], np.float64)
        fitted = min(h[3] for h in self._hist) >= r.grok_train_acc  # the whole window
        norms = np.array([h[1] for h in self._hist], np.float64)
        tests = np.array([h[2] for h in self._hist], np.float64)
        d_test = _change(steps, tests)
        d_norm = _change(steps, np.log(np.where(norms > 0, norms, np.nan)))
        if not (math.isfinite(d_test) and math.isfinite(d_norm)):
            return []
        norm_rel = math.expm1(d_norm)  # relative change of ||theta|| over the window
        span = int(steps[-1] - steps[0])
        out = []
        if (fitted and gap >= r.grok_gap and abs(d_test) < r.grok_test_flat
                and norm_rel > r.grok_norm_rise and cos > r.grok_cos):
            out.append(Finding(
                "grokking_stall", "warn",
                f"train acc {train:.1%} but test acc {test:.1%} and flat ({d_test:+.1%} over"
                f" the last {span} steps), while the weight norm rose {norm_rel:+.1%} to"
                f" {norm:.3g} along the weights' own direction (mean cos(-g, theta)"
                f" {cos:.2f}): naive loss minimization, scaling the logits without learning"
                f" anything new; try: raise weight_decay: `set weight_decay 1`, or"
                f" `set orthograd true`", step, cos, r.persist))
        if (self._memorized is not None and self._memorized <= steps[0]
                and d_test > r.grok_test_rise and norm_rel < -r.grok_norm_fall):
            out.append(Finding(
                "grokking", "info",
                f"test acc rose {d_test:+.1%} to {test:.1%} over the last {span}"
                f" steps while the weight norm fell {norm_rel:+.1%} to {norm:.3g} (train acc"
                f" {train:.1%}, memorized by step {self._memorized}): the model is"
                f" generalizing; keep the weight decay. With label noise xi, train acc"
                f" falling to 100(1-xi)% is expected", step, d_test, r.persist))
        return out


def _weights(params: np.ndarray | None, schema: dict[str, Any]) -> tuple[float, float]:
    """(||theta|| over every parameter, the mean over the parameters of cos(-g, theta)),
    NaN where the block or its columns are missing. Parameters that did not step this
    window (NaN rows: another optimizer) are left out."""
    names = list(schema.get("param_stats") or [])
    if (params is None or params.ndim != 2 or "weight_norm" not in names
            or params.shape[1] != len(names) or not len(params)):
        return math.nan, math.nan
    wn = params[:, names.index("weight_norm")].astype(np.float64)
    wn = wn[np.isfinite(wn)]
    norm = float(np.sqrt(np.sum(wn * wn))) if len(wn) else math.nan
    cos = math.nan
    if "nlm_cos" in names:
        c = params[:, names.index("nlm_cos")].astype(np.float64)
        c = c[np.isfinite(c)]
        cos = float(np.mean(c)) if len(c) else math.nan
    return norm, cos


def _change(x: np.ndarray, y: np.ndarray) -> float:
    """The least-squares slope of y on x (finite points only) times the x span: how much y
    changed over the window by its trend. NaN with fewer than 3 points or no span."""
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or x[-1] <= x[0]:
        return math.nan
    xc = x - x.mean()
    slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
    return slope * float(x[-1] - x[0])
