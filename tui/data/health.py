"""Healthy bands of the statistics, from ``shared/METRICS.md`` section E (detectors).

``levels`` says for each value: -1 no band for this statistic, 0 healthy, 1 warning,
2 critical. Any non-finite value is critical (E3: any NaN/Inf). Vectorized, so a
200-layer table costs one NumPy call per column.

Only the dead fraction has a band (E2), and only on activation layers: a logits layer or
a LayerNorm whose outputs are mostly negative is healthy. ``massive_ratio`` is critical
only with ``max_abs`` > 100 (E1 needs both); its ``inf`` (median 0: most of a ReLU's
outputs are) is not trouble by itself, nor is it coloured without ``max_abs``. The zero
fractions have no band: a healthy ReLU layer has about half its outputs at 0, and large
models' MLPs run with only a few percent of units active (METRICS.md, "lazy neurons").
A layer with no call in a report (``idle``) has no values at all; the table shows it as
idle, not as NaN.
"""

from __future__ import annotations

import numpy as np

#: (warn above, critical above) for fractions of dead units (E2), of activation layers.
FRACTION_BANDS = {"dead_frac": (0.5, 0.9), "dead_frac_window": (0.5, 0.9)}
#: E1: max/median ratio above this is a massive activation when max_abs > MASSIVE_ABS.
MASSIVE_RATIO, MASSIVE_ABS = 1000.0, 100.0
#: Update/weight ratio: healthy around 1e-3; one decade off warns, two is critical.
UPDATE_RATIO_GUIDE = 1e-3
#: Counts a layer that ran always has, even with NaN activations: NaN says it did not run.
NEVER_NAN = frozenset({"dead_frac", "dead_frac_window", "zero_frac", "near_zero_frac",
                       "nonfinite"})


def levels(stat: str, values: np.ndarray, max_abs: np.ndarray | None = None,
           activations: np.ndarray | None = None) -> np.ndarray:
    """Health level of each value of one statistic (``max_abs``: the same rows' max |a|,
    which the massive-activation rule needs; ``activations``: per row, whether the layer
    is an activation, broadcast against ``values``; only those get a dead-fraction band)."""
    v = np.asarray(values, np.float64)
    out = np.full(v.shape, -1, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if stat in FRACTION_BANDS:
            warn, crit = FRACTION_BANDS[stat]
            out = np.where(v > crit, 2, np.where(v > warn, 1, 0))
            out = np.where(np.isfinite(v), out, 2)
            if activations is not None:
                out = np.where(np.asarray(activations, bool), out, -1)
            return out
        if stat == "nonfinite":
            out = np.where(v > 0, 2, 0)
        elif stat == "massive_ratio":
            # E1 needs both: a ratio > 1000 and |a| > 100. The ratio alone says little: it
            # is inf wherever the median is 0 (most of a ReLU's outputs), NaN when all are.
            if max_abs is None:
                return out
            big = np.asarray(max_abs, np.float64) > MASSIVE_ABS
            big = np.broadcast_to(big, v.shape)
            return np.where(np.isnan(v), -1, np.where((v > MASSIVE_RATIO) & big, 2, 0))
        elif stat == "update_ratio":
            off = np.abs(np.log10(np.abs(v) / UPDATE_RATIO_GUIDE))
            out = np.where(v == 0, 1, np.where(off > 2, 2, np.where(off > 1, 1, 0)))
    return np.where(np.isfinite(v), out, 2)


def has_band(stat: str) -> bool:
    return stat in FRACTION_BANDS or stat in ("nonfinite", "massive_ratio", "update_ratio")


def idle(stats: tuple[str, ...] | list[str], block: np.ndarray) -> np.ndarray:
    """Per layer of a ``[layers x stats]`` report: True where the layer was not called in
    its window. Its ``nonfinite`` count, which every call sets, is NaN; without that
    column, every value is."""
    b = np.asarray(block)
    if b.ndim != 2 or not b.shape[1]:
        return np.zeros(len(b), bool)
    if "nonfinite" in stats:
        return np.isnan(b[:, list(stats).index("nonfinite")])
    return np.isnan(b).all(axis=1)
