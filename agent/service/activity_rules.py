"""E10 sparsity drift and the update/weight-ratio band, from each report's per-layer
zero fractions and per-parameter update ratios. Torch-free (agent thread).

E10 (METRICS.md B and E10; SPLAW, LAZY): training normally makes a ReLU layer *sparser*,
its activation ratio (the fraction of nonzero outputs, 1 - ``zero_frac``) falling with the
data seen. A ratio that instead climbs far, to most units being on for most inputs, is the
wrong sign: the layer is turning linear (its units rarely switch off, so the ReLU does
nothing), as when a bias drifts positive or the task needs no non-linearity there. The
trend is the mean ratio over the last tenth (``SPARSITY_ENDS``) of a window of
``sparsity_steps`` (300) steps against that over its first tenth, in steps, not reports, so
that ``report_every`` does not change the time scale; the minimum effect size is a rise
of ``sparsity_rise`` (0.25: a quarter of all outputs) to above ``sparsity_dense`` (0.8). A healthy
default-initialised ReLU MLP on a learnable task moves by 0.12 or less in 300 steps (one
of its layers 0.55 -> 0.68). Doubtful at small scale: a small net fitting a task whose
decision boundary is nearly linear (a linear teacher's labels) linearizes its last ReLU in
the first few hundred steps (measured 0.46 -> 0.85 with Adam at lr 1e-3), true but no
defect; SPLAW's trend is over far longer training. Judged only on layers that output
exact zeros (ReLU, ReLU6, ...): SiLU and GELU have none (their ratio reads 1, so SPLAW's
"SiLU rises" cannot be read from ``zero_frac``), nor is a layer before a functional
activation (``F.relu``), whose own output is the pre-activation.

Update ratio (METRICS.md C, "~1e-3 is a rule of thumb"): ||theta_before - theta_after|| /
||theta_before|| per parameter, measured across the optimizer step. Above ``update_high``
(0.1) a step changes a tenth of the weights: the lr is too large for that tensor (biases
are not judged: a zero-initialised bias reads inf, and a small norm makes any step look
large). Below ``update_low`` (1e-6) while the gradient, relative to the weights, is at
least ``update_grad`` (1e-3): the gradient says move, the step does not (an lr far too
small, or weights grown huge); a converged model's tiny gradient is not a stall. A
parameter whose sampled rows did not move at all (an embedding's unused rows) is not
judged, unless no parameter moved at all (every sampled row of every tensor stayed put
while the gradients say move). Neither rule judges the first ``warmup``
reports (Adam's first steps move every weight by lr; a zero-initialised tensor reads
inf), a report whose lr is under ``update_lr_floor`` of the largest seen (a schedule's
tail is deliberate), nor one where the GradScaler skipped steps (no step: ratio 0).
Healthy runs measured: 2e-4 .. 1.5e-2 after warm-up (default MLP with SGD, small GPT
with AdamW). A too-large lr mostly shows in the first steps only (Adam's first step is lr
/ rms(W): 0.7 at lr 0.05), which warm-up hides, and it soon kills units (E2) or grows the
weights; what stays too large is a step that weight decay holds in equilibrium with the
weight norm: scale-invariant weights (before a norm) turn by ~sqrt(2 lr wd / (1 +
momentum)) per step (measured 0.07 .. 0.7 at SGD lr 0.5, wd 0.05: the net learns nothing).
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from neurotop.protocol.layerkinds import activation_flags

#: Alert names and their METRICS.md rows (merged into ``detectors.ALERTS``).
ACTIVITY_ALERTS = {"sparsity_drift": "E10", "update_ratio": "C"}

#: The share of the E10 window (``sparsity_steps``) averaged at each of its ends.
SPARSITY_ENDS = 0.1


class ActivityRules:
    """Running state of E10 and the update-ratio band; ``check`` once per report, in step
    order. ``alert(name, level, message, step, layer, value)`` makes an ``Alert``; ``add``
    is ``Detectors._add`` for the report (alert, persist, key)."""

    def __init__(self, rules: Any) -> None:
        self.rules = rules
        self._ratios: dict[str, deque[tuple[int, float]]] = {}  # layer -> (step, ratio)
        self._reports = 0
        self._lr_top = 0.0
        self._skipped = math.nan

    def check(self, step: int, col: dict[str, np.ndarray], values: dict[str, float],
              schema: dict[str, Any], params: np.ndarray | None, tainted: set[str],
              alert: Callable[..., Any], add: Callable[..., None]) -> None:
        """``col``: the report's per-layer columns by statistic (empty without a block);
        ``tainted``: layers with recent non-finite values (not judged)."""
        self._sparsity(step, col, schema, tainted, alert, add)
        self._updates(step, values, schema, params, alert, add)
        self._reports += 1

    def _sparsity(self, step: int, col: dict[str, np.ndarray], schema: dict[str, Any],
                  tainted: set[str], alert: Callable[..., Any],
                  add: Callable[..., None]) -> None:
        r = self.rules
        if "zero_frac" not in col:
            return
        layers = list(schema.get("layers", []))
        types = list(schema.get("layer_types", []))
        acts = list(schema.get("activations", []))
        if len(acts) != len(layers):
            acts = [""] * len(layers)
        if len(types) != len(layers):
            return
        span = r.sparsity_steps
        judged = activation_flags(tuple(types), tuple(acts), tuple(r.dead_types))
        for i, (layer, zero) in enumerate(zip(layers, col["zero_frac"].tolist(), strict=True)):
            if acts[i].startswith("F.") or not judged[i]:
                continue
            ratio = 1.0 - zero
            if layer in tainted or not math.isfinite(ratio):
                self._ratios.pop(layer, None)  # a NaN window says nothing: start over
                continue
            hist = self._ratios.setdefault(layer, deque())
            hist.append((step, ratio))
            while len(hist) > 2 and step - hist[1][0] >= span:
                hist.popleft()  # the oldest report that still leaves the window ``span`` long
            if step - hist[0][0] < span:
                continue
            end = span * SPARSITY_ENDS
            old, new = _ends(hist, end)
            before, now = sum(old) / len(old), sum(new) / len(new)
            if now - before > r.sparsity_rise and now > r.sparsity_dense:
                add(alert("sparsity_drift", "warn",
                          f"layer {layer!r}: {now:.0%} of its outputs are nonzero, up from"
                          f" {before:.0%} around step {hist[0][0]}: the layer is turning"
                          f" linear (its units rarely switch off), where training normally"
                          f" makes a ReLU sparser; try: check for a bias drifting positive,"
                          f" lower lr, or a sparsity push (`topk`, an L1 penalty)", step,
                          layer, now - before), r.persist, "")

    def _updates(self, step: int, values: dict[str, float], schema: dict[str, Any],
                 params: np.ndarray | None, alert: Callable[..., Any],
                 add: Callable[..., None]) -> None:
        r = self.rules
        lr = values.get("lr", math.nan)
        skipped, self._skipped = self._skipped, values.get("skipped_steps", math.nan)
        if math.isfinite(lr):
            self._lr_top = max(self._lr_top, lr)
        names, cols = list(schema.get("params", [])), list(schema.get("param_stats", []))
        if (params is None or params.ndim != 2 or params.shape != (len(names), len(cols))
                or not {"update_ratio", "grad_norm", "weight_norm"} <= set(cols)):
            return
        if self._reports < r.warmup or self._skipped > skipped:  # NaN > x is False
            return
        if math.isfinite(lr) and lr < r.update_lr_floor * self._lr_top:
            return
        p = params.astype(np.float64)
        ratio = p[:, cols.index("update_ratio")]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel_grad = p[:, cols.index("grad_norm")] / p[:, cols.index("weight_norm")]
        weights = _weights(tuple(names))
        high = np.flatnonzero(np.isfinite(ratio) & (ratio > r.update_high) & weights)
        if len(high):
            i = int(high[np.argmax(ratio[high])])
            add(alert("update_ratio", "warn",
                      f"parameter {names[i]!r}: the step changed {ratio[i]:.3g} of its"
                      f" weights (||dW||/||W||; ~1e-3 is typical, over {r.update_high:g} is"
                      f" too large){_others(len(high))}; try: lower lr (`set lr X`) or clip"
                      f" gradients", step, names[i], float(ratio[i])), r.persist, "high")
        moving = np.isfinite(rel_grad) & (rel_grad >= r.update_grad)
        finite = np.isfinite(ratio)
        stalled = moving & finite & (ratio < r.update_low)
        if np.any(finite & (ratio > 0)):  # (else nothing moved at all: every one stalled)
            stalled &= ratio > 0  # an embedding's unused rows stay put: not a stall
        low = np.flatnonzero(stalled)
        if len(low):
            i = int(low[np.argmin(ratio[low])])
            add(alert("update_ratio", "warn",
                      f"parameter {names[i]!r}: the step changed only {ratio[i]:.3g} of its"
                      f" weights though its gradient is {rel_grad[i]:.3g} of them (under"
                      f" {r.update_low:g}: stalled){_others(len(low))}; try: raise lr (`set"
                      f" lr X`), check the schedule and that weight's scale", step, names[i],
                      float(ratio[i])), r.persist, "low")


def _others(n: int) -> str:
    return f", and {n - 1} more parameter(s)" if n > 1 else ""


def _ends(hist: deque[tuple[int, float]], end: float) -> tuple[list[float], list[float]]:
    """The values of the first and of the last ``end`` steps of a window of ``(step,
    value)`` in step order (reports come in order): a prefix and a suffix, walked alone
    instead of the whole window per layer per report."""
    first, last = hist[0][0], hist[-1][0]
    old, new = [], []
    for t, v in hist:
        if t - first > end:
            break
        old.append(v)
    for t, v in reversed(hist):
        if last - t > end:
            break
        new.append(v)
    new.reverse()  # summed in the window's order
    return old, new


@functools.lru_cache(maxsize=16)
def _weights(names: tuple[str, ...]) -> np.ndarray:
    """Which parameters are weights, not biases (kept per schema; read-only)."""
    out = np.array([not n.rsplit(".", 1)[-1].startswith("bias") for n in names], bool)
    out.flags.writeable = False
    return out
