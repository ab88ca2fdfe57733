"""The per-layer statistics: what one module call computes on the device, and the host-side
arithmetic that turns a report's calls into the ``[layers x stats]`` block.

Device side (training thread), per call of a measured module: the few statistics that
must see every element read the whole activation (the non-finite count, max |a| from
``amin`` and the per-unit maxima, which also give the dead units); everything else is
taken from a row sample (``sample_rows``: the whole activation when it has at most
``Config.sample`` elements), copied out as it is. Each call costs a handful of kernels,
none of which branches on a value or reads one back.

Host side (agent thread), per report: the samples arrive with the report's one copy and
the shape statistics (mean, std, RMS, kurtosis, zero and near-zero fractions, median |a|,
histograms) are computed from them in float64 NumPy. A layer's calls in one report
(modules called several times per forward, gradient accumulation) are merged by
pooling their samples and adding or maxing their exact parts.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from agent.config import LAYER_STATS, Config

__all__ = ["LAYER_STATS", "ROW_COLS", "Needs", "first_tensor", "sample_stride", "sample_rows",
           "unit_max", "activation_row", "finalize_layers"]

#: One call's exact row: the non-finite count, the largest and the smallest value.
ROW_COLS = ("nonfinite", "max", "min")
NONFINITE, MAX, MIN = range(len(ROW_COLS))

#: The median |a| of ``massive_ratio`` uses every s-th value of the layer's sample, at most
#: this many: the ratio only needs its order of magnitude, and the median (a partition) is
#: the costliest part of a report's host-side work.
MEDIAN_SAMPLE = 2048

#: A per-unit max over dim 0 is fastest on CPU with rows at least this wide: fold first.
_FOLD_WIDTH = 8192


class Needs:
    """Which groups of work the chosen statistics require."""

    def __init__(self, stats: tuple[str, ...]) -> None:
        s = set(stats)
        self.nonfinite = "nonfinite" in s
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
    """At most ``limit`` elements of ``x``, 1-D (a view of ``x`` when it is that small).

    Whole rows (the last dimension) are taken, every r-th one, r coprime with the size of
    the second-to-last dimension (so that, e.g., token positions vary): contiguous rows
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
    return flat.view(rows, width)[:: sample_stride(rows, max(1, limit // width), period)
                                   ].reshape(-1)


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
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One call of a layer, ``x`` float32: ``(row, unit maxima or None, sample)``.

    The sample is owned (never a view of ``x``, which may change in place later).
    ``scratch``, when given, is a float32 buffer of at least ``x.numel()`` elements for
    the non-finite count's one temporary (on CPU a fresh multi-megabyte temporary per
    call costs more than the arithmetic).
    """
    flat = x.reshape(-1)
    cols = [zero] * len(ROW_COLS)
    cpu = x.device.type == "cpu"
    umax = unit_max(x, unit_dim) if need.units else None
    if need.max or (need.nonfinite and cpu):
        if umax is not None:
            hi, lo = umax.max(), flat.amin()
        else:
            lo, hi = torch.aminmax(flat)
        if need.max:
            cols[MAX], cols[MIN] = hi, lo
    # On the CPU, reading a value is free (there is no device to wait for), and the max and
    # min are NaN or infinite exactly when some value is: count only then. On a device,
    # count always (its bandwidth makes the passes cheap; a branch would be a sync).
    if need.nonfinite and not (cpu and math.isfinite(hi.item()) and math.isfinite(lo.item())):
        out = scratch[: flat.numel()] if scratch is not None else None
        # a - a is 0 where a is finite and NaN elsewhere
        cols[NONFINITE] = torch.sub(flat, flat, out=out).nan_to_num_(1.0).sum()
    sample = sample_rows(x, cfg.sample)
    if sample.numel() == flat.numel():
        sample = sample.clone()
    return torch.stack(cols), umax, sample


def finalize_layers(stats: tuple[str, ...], layers: int, rows: np.ndarray,
                    samples: list[np.ndarray], row_layer: list[int], eps: float,
                    dead: np.ndarray, dead_window: np.ndarray, units: list[int],
                    grad_norms: np.ndarray, grad_layer: list[int], grad_elements: list[int]
                    ) -> np.ndarray:
    """The ``[layers x stats]`` float32 block of one report (host, float64 arithmetic).

    ``rows`` (``ROW_COLS``) and ``samples``: one per call, of layer ``row_layer[k]``;
    ``dead``, ``dead_window`` (unit counts) and ``units``: per layer. ``grad_norms``: one
    ||dL/dh|| per gradient hook call. A layer with no call in the report gets NaN.
    """
    out = np.full((layers, len(LAYER_STATS)), np.nan)
    col = {s: j for j, s in enumerate(LAYER_STATS)}
    rows = rows.astype(np.float64)
    by_size: dict[int, list[tuple[int, np.ndarray]]] = {}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, ks in enumerate(calls_by_layer(layers, row_layer)):
            if not ks:
                continue
            o = out[i]
            r = rows[ks]
            o[col["max_abs"]] = np.abs(r[:, [MAX, MIN]]).max()  # NaN stays NaN
            o[col["nonfinite"]] = r[:, NONFINITE].sum()
            if units[i]:
                o[col["dead_frac"]] = dead[i] / units[i]
                o[col["dead_frac_window"]] = dead_window[i] / units[i]
            a = pooled(samples, ks)
            by_size.setdefault(a.size, []).append((i, a))
        for group in by_size.values():  # one batch of NumPy calls per sample size
            idx = [i for i, _ in group]
            for name, v in _sample_stats(np.stack([a for _, a in group]), eps).items():
                out[idx, col[name]] = v
        m = col["massive_ratio"]
        out[:, m] = out[:, col["max_abs"]] / out[:, m]  # held the median until here
        gsq = np.zeros(layers)
        gn = np.zeros(layers)
        for k, i in enumerate(grad_layer):
            gsq[i] += float(grad_norms[k]) ** 2
            gn[i] += grad_elements[k]
        out[:, col["grad_rms"]] = np.sqrt(gsq / np.where(gn > 0, gn, np.nan))
    return out[:, [col[s] for s in stats]].astype(np.float32)


def _sample_stats(a: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """The sample-based statistics of layers whose pooled samples are the rows of ``a``
    (float32; NumPy's pairwise sums keep it accurate to ~1e-6 at these sizes). Under
    ``massive_ratio``: the median |a|, divided into max |a| by the caller."""
    mean = a.mean(axis=1, dtype=np.float64)
    d = a - mean.astype(np.float32)[:, None]
    d2 = d * d
    var = d2.mean(axis=1, dtype=np.float64)
    mag = np.abs(a)
    small = mag[:, :: sample_stride(a.shape[1], MEDIAN_SAMPLE, 1)]
    return {"mean": mean, "std": np.sqrt(var), "rms": np.sqrt(var + mean * mean),
            "kurtosis": np.where(var > 0, (d2 * d2).mean(axis=1, dtype=np.float64) / var ** 2,
                                 np.nan),
            "zero_frac": np.count_nonzero(a == 0, axis=1) / a.shape[1],
            "near_zero_frac": np.count_nonzero(mag < eps, axis=1) / a.shape[1],
            "massive_ratio": np.median(small, axis=1)}


def calls_by_layer(layers: int, row_layer: list[int]) -> list[list[int]]:
    calls: list[list[int]] = [[] for _ in range(layers)]
    for k, i in enumerate(row_layer):
        calls[i].append(k)
    return calls


def pooled(samples: list[np.ndarray], ks: list[int]) -> np.ndarray:
    """The samples of calls ``ks`` as one array."""
    return samples[ks[0]] if len(ks) == 1 else np.concatenate([samples[k] for k in ks])
