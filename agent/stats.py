"""The per-layer statistics: what one module call computes on the device, and the host-side
arithmetic that merges a report's calls into the ``[layers x stats]`` block.

Device side (training thread): each call of a measured module yields one small row
(``ROW_COLS``) and its per-unit maxima. Only what must see every element reads the whole
activation: max |a| (``amin`` + the per-unit max), the non-finite count and the per-unit
maxima behind the dead-unit fractions. The other statistics come from a row sample
(``sample_rows``), which is the whole activation when it has at most ``Config.sample``
elements. Rows are kept per call, so modules called several times per forward and
gradient accumulation need no special case, and nothing branches on a device value.

Host side (agent thread): ``finalize_layers`` merges the calls of each layer in float64
NumPy (Pebay's formulas for the central moments) and derives every statistic.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from agent.config import LAYER_STATS, Config

__all__ = ["LAYER_STATS", "ROW_COLS", "Needs", "first_tensor", "sample_stride", "sample_rows",
           "unit_max", "activation_row", "finalize_layers"]

#: One call's row: the sample's mean and central moment sums M2..M4, its nonzero and
#: |a| < eps counts; the whole activation's non-finite count and max |a|; the median |a|
#: of the small sample.
ROW_COLS = ("mean", "M2", "M3", "M4", "nonzero", "near", "nonfinite", "max_abs", "median")
MEAN, M2, M3, M4, NONZERO, NEAR, NONFINITE, MAX_ABS, MEDIAN = range(len(ROW_COLS))

#: A per-unit max over dim 0 is fastest on CPU with rows at least this wide: fold first.
_FOLD_WIDTH = 8192


class Needs:
    """Which groups of work the chosen statistics require."""

    def __init__(self, stats: tuple[str, ...]) -> None:
        s = set(stats)
        self.moments = bool(s & {"mean", "std", "rms", "kurtosis"})
        self.zeros = bool(s & {"zero_frac", "near_zero_frac"})
        self.nonfinite = "nonfinite" in s
        self.median = "massive_ratio" in s
        self.max = bool(s & {"max_abs", "massive_ratio"})
        self.units = bool(s & {"dead_frac", "dead_frac_window"})
        self.grad = "grad_rms" in s


def first_tensor(out: object) -> torch.Tensor | None:
    """The activation to measure from a module's output (tensor, tuple/list or dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    if isinstance(out, dict):
        for o in out.values():
            if isinstance(o, torch.Tensor):
                return o
    return None


def sample_stride(n: int, limit: int, period: int) -> int:
    """The smallest stride s >= n / limit that is coprime with ``period``.

    Taking every s-th of n items then keeps at most ``limit`` of them, spread over all,
    and never locks onto a fixed phase of a pattern that repeats every ``period`` items
    (the same token position, or the same column).
    """
    s = max(1, -(-n // max(limit, 1)))
    while math.gcd(s, max(period, 1)) != 1:
        s += 1
    return s


def sample_rows(x: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` elements of ``x`` as a contiguous 1-D tensor (``x`` itself if small).

    Whole rows (the last dimension) are taken, every r-th one, r coprime with the size of
    the second-to-last dimension (so that e.g. token positions vary); contiguous rows
    cost far less memory traffic than scattered elements. A row longer than ``limit``
    falls back to every s-th element.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if n <= limit:
        return flat
    width = x.shape[-1] if x.dim() else 1
    if width > limit:
        return flat[:: sample_stride(n, limit, 1)].contiguous()
    rows = n // width
    period = x.shape[-2] if x.dim() >= 3 else 1
    r = sample_stride(rows, max(1, limit // width), period)
    return flat.view(rows, width)[::r].reshape(-1)


def unit_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The maximum of each unit (index along ``dim``) over every other dimension."""
    if x.dim() == 0:
        return x.reshape(1)
    if dim != x.dim() - 1:
        return x.amax(dim=[d for d in range(x.dim()) if d != dim])
    c = max(x.shape[-1], 1)
    rows = x.numel() // c
    fold = math.gcd(rows, max(1, _FOLD_WIDTH // c))
    if fold > 1 and x.is_contiguous():
        return x.reshape(rows // fold, fold * c).amax(0).reshape(fold, c).amax(0)
    return x.reshape(rows, c).amax(0)


def activation_row(x: torch.Tensor, need: Needs, cfg: Config, zero: torch.Tensor,
                   unit_dim: int, scratch: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """One call of a layer, ``x`` float32: ``(row, unit maxima or None, small sample, ns)``.

    ``scratch``, when given, is a float32 buffer of at least ``x.numel()`` elements for
    the non-finite count's one temporary (on CPU a fresh multi-megabyte temporary per
    call costs more than the arithmetic).
    """
    xs = sample_rows(x, cfg.sample)
    width = x.shape[-1] if x.dim() else 1
    small = xs[:: sample_stride(xs.numel(), cfg.median_sample, width)]
    cols = [zero] * len(ROW_COLS)
    if need.moments:
        m = xs.mean()
        d = xs - m
        d2 = d * d
        cols[MEAN], cols[M2], cols[M3], cols[M4] = m, d2.sum(), torch.dot(d2, d), torch.dot(d2, d2)
    if need.zeros:
        cols[NONZERO] = torch.count_nonzero(xs)
        cols[NEAR] = (xs.abs() < cfg.eps).sum()
    if need.nonfinite:  # a - a is 0 where a is finite and NaN elsewhere
        out = scratch[: x.numel()].view(x.shape) if scratch is not None else None
        cols[NONFINITE] = torch.sub(x, x, out=out).nan_to_num_(1.0).sum()
    if need.median:
        cols[MEDIAN] = small.abs().median()
    umax = unit_max(x, unit_dim) if need.units else None
    if need.max:
        if umax is not None:
            cols[MAX_ABS] = torch.maximum(umax.max(), x.amin().neg())
        else:
            lo, hi = torch.aminmax(x)
            cols[MAX_ABS] = torch.maximum(hi, lo.neg())
    return torch.stack(cols), umax, small, xs.numel()


def merge_moments(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pebay's pairwise merge of ``[n, mean, M2, M3, M4]`` (float64 vectors)."""
    na, ma, a2, a3, a4 = a
    nb, mb, b2, b3, b4 = b
    n = na + nb
    if na == 0 or nb == 0:
        return a if nb == 0 else b
    d = mb - ma
    m2 = a2 + b2 + d * d * na * nb / n
    m3 = a3 + b3 + d ** 3 * na * nb * (na - nb) / n ** 2 + 3 * d * (na * b2 - nb * a2) / n
    m4 = (a4 + b4 + d ** 4 * na * nb * (na * na - na * nb + nb * nb) / n ** 3
          + 6 * d * d * (na * na * b2 + nb * nb * a2) / n ** 2 + 4 * d * (na * b3 - nb * a3) / n)
    return np.array([n, ma + d * nb / n, m2, m3, m4])


def finalize_layers(stats: tuple[str, ...], layers: int, rows: np.ndarray,
                    row_layer: list[int], row_ns: list[int], dead: np.ndarray,
                    dead_window: np.ndarray, units: list[int], grad_norms: np.ndarray,
                    grad_layer: list[int], grad_elements: list[int]) -> np.ndarray:
    """The ``[layers x stats]`` float32 block of one report (host, float64 arithmetic).

    ``rows``: one ``ROW_COLS`` row per call, of layer ``row_layer[k]``, with sample
    size ``row_ns[k]``; ``dead``, ``dead_window`` (counts) and ``units``: per layer.
    ``grad_norms``: one ||dL/dh|| per gradient hook call. A layer with no call in the
    report gets a row of NaN.
    """
    out = np.full((layers, len(LAYER_STATS)), np.nan)
    col = {s: j for j, s in enumerate(LAYER_STATS)}
    rows = rows.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(layers):
            ks = [k for k, layer in enumerate(row_layer) if layer == i]
            if not ks:
                continue
            mom = np.zeros(5)
            for k in ks:
                mom = merge_moments(mom, np.array([row_ns[k], *rows[k, MEAN:M4 + 1]]))
            ns, mean, m2, _, m4 = mom
            r = rows[ks]
            median = r[:, MEDIAN].mean()
            o = out[i]
            o[col["mean"]] = mean
            o[col["std"]] = math.sqrt(max(m2 / ns, 0.0))
            o[col["rms"]] = math.sqrt(max(m2 / ns, 0.0) + mean * mean)
            o[col["kurtosis"]] = ns * m4 / (m2 * m2) if m2 > 0 else np.nan
            o[col["max_abs"]] = r[:, MAX_ABS].max()
            o[col["massive_ratio"]] = o[col["max_abs"]] / median
            o[col["zero_frac"]] = 1.0 - r[:, NONZERO].sum() / ns
            o[col["near_zero_frac"]] = r[:, NEAR].sum() / ns
            o[col["nonfinite"]] = r[:, NONFINITE].sum()
            if units[i]:
                o[col["dead_frac"]] = dead[i] / units[i]
                o[col["dead_frac_window"]] = dead_window[i] / units[i]
        gsq = np.zeros(layers)
        gn = np.zeros(layers)
        for k, i in enumerate(grad_layer):
            gsq[i] += float(grad_norms[k]) ** 2
            gn[i] += grad_elements[k]
        out[:, col["grad_rms"]] = np.sqrt(gsq / np.where(gn > 0, gn, np.nan))
    return out[:, [col[s] for s in stats]].astype(np.float32)
