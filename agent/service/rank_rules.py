"""A job's rank rules: stragglers and rank divergence, judged at every control check.

Every rank of a job carries four numbers in the check's one all-reduce
(``neurotop.training.distributed``: ``VITALS``), so after it every rank holds the same
``[world_size x 4]`` table and runs these same rules on it: the same verdicts, at the same
step, in every rank's recording (a viewer of any one rank sees the job's alerts, and a
recording of rank 3 alone still says that rank 2 straggled). Torch-free.

Columns (``NaN``: not measured on that rank since the last check):

- ``ready_s``: the mean host time, over the steps since the last check, from the end of a
  step boundary to the start of the next forward of the model: data loading and whatever
  the loop does between steps. No collective of DDP's lies in that span, so it is the
  rank's own time; the step's wall time is not (every rank waits for the slowest in the
  gradient all-reduce, so all ranks' step times are equal).
- ``step_s``: the mean wall time of a step on that rank (boundary to boundary, holds
  excluded): the scale of a straggler's cost.
- ``loss``: the last loss the rank observed.
- ``params``: the sum of squared weights of the rank's DDP-wrapped models (``-1``: no DDP
  model, the check is skipped: pipeline stages and FSDP shards differ by design).

Rules (thresholds in ``RankRules``; the unit of persistence is a check):

- ``straggler`` (warn): rank r's ``ready_s`` over the median of the other ranks' above
  ``straggler_ratio``, and its excess above ``straggler_cost`` of the median step time
  (what every rank loses waiting for it), ``straggler_persist`` checks in a row.
- ``rank_divergence`` (critical): a rank's ``params`` differs from the reference (rank 0's
  with 2 ranks, the lower median over ranks with more) by more than ``param_rtol``
  relatively: DDP keeps replicas identical, so this fires at once.
- ``rank_divergence`` (warn): with 3 ranks or more, a rank's loss has a robust z-score
  (distance from the median over 1.4826 x the MAD) above ``loss_z`` and is more than
  ``loss_rel`` x |median| away from it, ``loss_persist`` checks in a row.

Each fires once per incident and rank, and re-arms once absent ``rearm`` checks in a row; a
check without the information (a hold: no step since the last check; a fingerprint not
measured at this check) neither counts nor re-arms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurotop.service.detectors import CRITICAL, WARN, Alert

#: The columns of the table every check carries, in order (``distributed.VITALS``).
COLUMNS = ("ready_s", "step_s", "loss", "params")
READY, STEP, LOSS, PARAMS = range(4)
#: ``params`` of a rank that has no DDP model to fingerprint.
UNMEASURED = -1.0
#: The MAD of a normal sample is 0.6745 sigma.
MAD_SIGMA = 1.4826


class RankRulesError(ValueError):
    """A rank rule value that cannot be used; the message names it."""


@dataclass
class RankRules:
    """Thresholds of the rank rules (``watch(rank_alerts=RankRules(...))`` or a dict)."""

    #: straggler: ready time over the others' median above this ...
    straggler_ratio: float = 1.5
    #: ... and its excess over that median above this fraction of the median step time ...
    straggler_cost: float = 0.1
    #: ... this many checks in a row.
    straggler_persist: int = 5
    #: rank_divergence (critical): relative difference of the parameter fingerprint.
    param_rtol: float = 1e-6
    #: rank_divergence (warn): robust z-score of a rank's loss over the ranks ...
    loss_z: float = 6.0
    #: ... and its distance from the median above this fraction of |median| ...
    loss_rel: float = 0.5
    #: ... this many checks in a row.
    loss_persist: int = 5
    #: Checks in a row a condition must be absent before it may fire again.
    rearm: int = 20
    #: Alert names never to raise (``straggler``, ``rank_divergence``).
    off: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.off = tuple(self.off)
        bad = sorted(set(self.off) - {"straggler", "rank_divergence"})
        if bad:
            raise RankRulesError(f"rank_alerts off: unknown alert(s) {bad}; known:"
                                 " straggler, rank_divergence")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "off":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                    or not math.isfinite(v):
                raise RankRulesError(f"rank rule {f.name} must be a number > 0, got {v!r}")
            if f.type == "int" and not isinstance(v, int):
                raise RankRulesError(f"rank rule {f.name} must be an integer, got {v!r}")
        if not self.straggler_ratio > 1:
            raise RankRulesError("rank rule straggler_ratio must be > 1,"
                                 f" got {self.straggler_ratio!r}")


def rank_rules(v: RankRules | dict[str, Any] | None) -> RankRules:
    """``watch(rank_alerts=...)``: rules, a dict of rule fields, or None for the defaults."""
    if v is None or isinstance(v, RankRules):
        return v or RankRules()
    if not isinstance(v, dict):
        raise RankRulesError(f"rank_alerts must be RankRules or a dict,"
                             f" got {type(v).__name__}")
    known = [f.name for f in dataclasses.fields(RankRules)]
    bad = sorted(set(v) - set(known))
    if bad:
        raise RankRulesError(f"unknown rank rule(s) {bad}; known: {', '.join(known)}")
    return RankRules(**v)


@dataclass
class RankAlert(Alert):
    """An alert about other ranks: ``ranks`` names them (the event carries it too)."""

    ranks: list[int] = field(default_factory=list)

    def event(self) -> dict[str, Any]:
        return {**super().event(), "ranks": list(self.ranks)}


def others_median(x: np.ndarray) -> np.ndarray:
    """For each element, the median of all the other elements (O(n log n))."""
    n = len(x)
    if n < 2:
        return np.full(n, np.nan)
    order = np.argsort(x, kind="stable")
    s = x[order]
    i = np.arange(n)
    m = n - 1  # the others' count

    def at(j: int) -> np.ndarray:  # element j of the sorted others of each position
        return np.where(j < i, s[j], s[min(j + 1, n - 1)])
    med = (at((m - 1) // 2) + at(m // 2)) / 2
    out = np.empty(n)
    out[order] = med
    return out


def _names(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


class RankJudge:
    """The running state of the rank rules; ``check`` once per control check."""

    def __init__(self, rules: RankRules | None = None, off: tuple[str, ...] = ()) -> None:
        self.rules = rules or RankRules()
        self.off = set(self.rules.off) | set(off)
        self._run: dict[tuple[str, int], int] = {}  # (rule, rank): checks in a row
        self._absent: dict[tuple[str, int], int] = {}  # incidents open: checks absent
        self._fired: set[tuple[str, int]] = set()
        self._open: dict[str, bool] = {}  # rule: any rank running or fired

    def check(self, step: int, table: np.ndarray) -> list[Alert]:
        """The alerts this check's ``[world_size x 4]`` table fires (most checks: none)."""
        t = np.asarray(table, dtype=np.float64)
        if t.ndim != 2 or t.shape[1] != len(COLUMNS) or len(t) < 2:
            return []
        # per rule: the ranks it holds for now, with why; None: no information this check
        # (not measured, or no step since the last one): it neither counts nor re-arms
        now: dict[str, dict[int, str] | None] = {"straggler": None, "params": None,
                                                 "loss": None}
        values: dict[str, float] = {}
        if "straggler" not in self.off:
            now["straggler"], values["straggler"] = self._stragglers(t)
        if "rank_divergence" not in self.off:
            now["params"], values["params"] = self._params(t)
            now["loss"], values["loss"] = self._losses(t)
        persist = {"straggler": self.rules.straggler_persist, "params": 1,
                   "loss": self.rules.loss_persist}
        alerts: list[Alert] = []
        for rule, hits in now.items():
            if hits is None or (not hits and not self._open.get(rule)):
                continue  # no information, or nothing now, running or fired: the common case
            due = []
            for r in hits:
                key = (rule, r)
                self._run[key] = self._run.get(key, 0) + 1
                self._absent[key] = 0
                if self._run[key] >= persist[rule] and key not in self._fired:
                    due.append(r)
            for key in [k for k in self._run if k[0] == rule and k[1] not in hits]:
                self._run.pop(key)
            for key in [k for k in self._fired if k[0] == rule and k[1] not in hits]:
                self._absent[key] = self._absent.get(key, 0) + 1
                if self._absent[key] >= self.rules.rearm:
                    self._fired.discard(key)
                    self._absent.pop(key)
            self._open[rule] = any(k[0] == rule for k in (*self._fired, *self._run))
            if due:
                self._fired.update((rule, r) for r in due)
                self._open[rule] = True
                alerts.append(self._alert(rule, step, due, hits, values[rule]))
        return alerts

    def _alert(self, rule: str, step: int, ranks: list[int], why: dict[int, str],
               value: float) -> RankAlert:
        detail = "; ".join(why[r] for r in ranks)
        if rule == "straggler":
            return RankAlert("straggler", WARN, (
                f"{_names(ranks)} straggling: {detail}, {self.rules.straggler_persist} checks"
                " in a row; every rank waits for it in the gradient all-reduce"), step,
                value=value, ranks=ranks)
        if rule == "params":
            return RankAlert("rank_divergence", CRITICAL, (
                f"{_names(ranks)} hold other parameters than the job: {detail}; DDP keeps"
                " replicas identical, so something changed weights outside it on that rank"),
                step, value=value, ranks=ranks)
        return RankAlert("rank_divergence", WARN, (
            f"{_names(ranks)} far from the other ranks' loss: {detail},"
            f" {self.rules.loss_persist} checks in a row"), step, value=value, ranks=ranks)

    def _stragglers(self, t: np.ndarray) -> tuple[dict[int, str] | None, float]:
        ready, steps = t[:, READY], t[:, STEP]
        ok = np.isfinite(ready) & (ready >= 0)
        finite_steps = steps[np.isfinite(steps)]
        if ok.sum() < 2 or not len(finite_steps):
            return None, math.nan  # no steps since the last check (a hold): no information
        step = float(np.median(finite_steps))
        idx = np.flatnonzero(ok)
        med = others_median(ready[idx])
        excess = ready[idx] - med
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(med > 0, ready[idx] / med, np.inf)
        hit = (ratio > self.rules.straggler_ratio) & (excess > self.rules.straggler_cost * step)
        if step <= 0 or not hit.any():
            return {}, math.nan
        hits = {}
        for i in np.flatnonzero(hit).tolist():
            r, q = int(idx[i]), float(ratio[i])
            hits[r] = (f"rank {r} takes {ready[r] * 1e3:.1f} ms per step before its"
                       f" forward, the others' median {med[i] * 1e3:.1f} ms"
                       f" ({'inf' if math.isinf(q) else f'{q:.1f}'}x;"
                       f" {excess[i] / step:.0%} of the {step * 1e3:.1f} ms step)")
        return hits, float(ratio[hit].max())

    def _params(self, t: np.ndarray) -> tuple[dict[int, str] | None, float]:
        fp = t[:, PARAMS]
        measured = fp != UNMEASURED
        if measured.sum() < 2 or np.isnan(fp[measured]).all():
            return None, math.nan
        if len(fp) <= 2:
            ref = float(fp[0])
        else:
            finite = np.sort(fp[measured & np.isfinite(fp)])
            ref = float(finite[(len(finite) - 1) // 2]) if len(finite) else math.nan
        if not math.isfinite(ref):
            return None, math.nan
        with np.errstate(invalid="ignore"):
            rel = np.abs(fp - ref) / max(abs(ref), 1e-300)
            hit = measured & ~(rel <= self.rules.param_rtol)  # NaN and inf count as different
        if not hit.any():
            return {}, math.nan
        hits = {}
        for r in np.flatnonzero(hit).tolist():
            hits[r] = (f"rank {r}'s sum of squared weights {fp[r]:.9g} vs {ref:.9g}"
                       f" (relative difference {rel[r]:.2g} > {self.rules.param_rtol:g})")
        return hits, float(np.where(np.isnan(rel[hit]), np.inf, rel[hit]).max())

    def _losses(self, t: np.ndarray) -> tuple[dict[int, str] | None, float]:
        loss = t[:, LOSS]
        ok = np.isfinite(loss)
        if ok.sum() < 3:  # two values have no robust spread: each is the other's outlier
            return None, math.nan
        med = float(np.median(loss[ok]))
        mad = float(np.median(np.abs(loss[ok] - med))) * MAD_SIGMA
        gap = np.where(ok, np.abs(loss - med), 0.0)
        z = gap / mad if mad > 0 else np.where(gap > 0, np.inf, 0.0)
        hit = ok & (z > self.rules.loss_z) & (gap > self.rules.loss_rel * abs(med))
        if not hit.any():
            return {}, math.nan
        hits = {}
        for r in np.flatnonzero(hit).tolist():
            zr = float(z[r])
            hits[r] = (f"rank {r}'s loss {loss[r]:.4g} vs the median {med:.4g}"
                       f" (robust z {'inf' if math.isinf(zr) else f'{zr:.1f}'})")
        return hits, float(z[hit].max())
