"""Every statistic of the catalogue recomputed with NumPy from dumped tensors, written from
the definitions in README.md ("Statistics") and independent of the agent's code."""

from __future__ import annotations

import math

import numpy as np


def stride(n: int, limit: int, period: int) -> int:
    s = max(1, math.ceil(n / limit))
    while math.gcd(s, max(period, 1)) != 1:
        s += 1
    return s


def row_sample(a: np.ndarray, limit: int) -> np.ndarray:
    """README: whole rows, every r-th (r coprime with the second-to-last dimension)."""
    flat = a.reshape(-1)
    if flat.size <= limit:
        return flat
    width = a.shape[-1]
    if width > limit:
        return flat[:: stride(flat.size, limit, 1)]
    rows = flat.size // width
    period = a.shape[-2] if a.ndim >= 3 else 1
    return a.reshape(rows, width)[:: stride(rows, max(1, limit // width), period)].reshape(-1)


def layer_stats(a: np.ndarray, grad: np.ndarray | None, *, sample: int, eps: float,
                units_max_window: np.ndarray) -> dict[str, float]:
    """All layer statistics of one output ``a`` (2-D here: units = the last dimension)."""
    s = row_sample(a, sample).astype(np.float64)
    mean, var = s.mean(), s.var()
    mag = np.abs(s)
    small = mag[:: stride(mag.size, 512, 1)]
    med = np.median(small[: small.size - (small.size % 2 == 0)])  # an odd count
    finite = np.isfinite(a)
    max_abs = np.abs(a).max()
    with np.errstate(divide="ignore"):
        massive = max_abs / med  # inf where most values are 0 (ReLU): the agent says so too
    out = {
        "mean": mean, "std": math.sqrt(var), "rms": math.sqrt(np.mean(s * s)),
        "max_abs": max_abs, "massive_ratio": massive,
        "kurtosis": np.mean((s - mean) ** 4) / var ** 2,
        "zero_frac": np.mean(s == 0), "near_zero_frac": np.mean(mag < eps),
        "dead_frac": np.mean(a.max(axis=0) <= 0),
        "dead_frac_window": np.mean(units_max_window <= 0),
        "nonfinite": float((~finite).sum()),
        "grad_rms": math.nan,
    }
    if grad is not None:
        g = row_sample(grad, sample).astype(np.float64)
        out["grad_rms"] = math.sqrt(np.mean(g * g))
    return out


def histogram(values: np.ndarray, exponents: tuple[int, int], limit: int) -> np.ndarray:
    """README: one bin per octave by |a|, mirrored for a < 0, a zero bin, overflow bins."""
    lo, hi = exponents
    k = hi - lo
    centre = k + 1
    mags = 2.0 ** np.arange(lo, hi + 1)
    v = values.reshape(-1)[:: max(1, math.ceil(values.size / limit))].astype(np.float64)
    v = v[~np.isnan(v)]
    counts = np.zeros(2 * k + 3)
    j = np.searchsorted(mags, np.abs(v), side="right") - 1  # -1: below m_0
    bins = np.where(j < 0, centre, np.where(v > 0, centre + 1 + j, centre - 1 - j))
    np.add.at(counts, bins, 1)
    return counts


def param_sample(p: np.ndarray, limit: int) -> np.ndarray:
    """README: the same row rule on a parameter (its rows: the last dimension)."""
    flat = p.reshape(-1)
    if flat.size <= limit:
        return flat
    width = p.shape[-1] if p.ndim else 1
    if width > limit:
        return flat[:: stride(flat.size, limit, 1)]
    rows = flat.size // width
    return p.reshape(rows, width)[:: stride(rows, max(1, limit // width), 1)].reshape(-1)


def leading_sample(p: np.ndarray, limit: int) -> np.ndarray:
    """README: a parameter that is not contiguous: every s-th index of its leading
    dimensions, one dimension after the other, until at most ``limit`` values are left."""
    v = p
    for d in range(p.ndim):
        if v.size <= limit:
            break
        rest = math.prod(v.shape[d + 1:])
        if rest > limit:
            v = v[(slice(None),) * d + (slice(0, 1),)]
        else:
            step = math.ceil(v.shape[d] / (limit // rest))
            v = v[(slice(None),) * d + (slice(None, None, step),)]
    return v.reshape(-1)


def param_stats(before: np.ndarray, after: np.ndarray, grad: np.ndarray,
                sample: int, leading: bool = False) -> dict[str, float]:
    b, a, g = (x.astype(np.float64) for x in (before, after, grad))
    pick = leading_sample if leading else param_sample
    bs, as_, gs = (pick(x, sample) for x in (b, a, g))
    return {"grad_norm": np.linalg.norm(g), "grad_max_abs": np.abs(g).max(),
            "weight_norm": np.linalg.norm(b),
            "update_ratio": np.linalg.norm(bs - as_) / np.linalg.norm(bs),
            "nlm_cos": -np.dot(gs, bs) / (np.linalg.norm(gs) * np.linalg.norm(bs))}
