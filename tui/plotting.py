"""Turning long series into something a terminal can draw quickly."""

from __future__ import annotations

import numpy as np
import plotext as plt

BLOCKS = "▁▂▃▄▅▆▇█"


def minmax_downsample(x: np.ndarray, y: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * width`` points keeping each column's min and max, so spikes survive."""
    n = len(y)
    if n <= 2 * width or width <= 0:
        return x, y
    edges = np.linspace(0, n, width + 1).astype(np.int64)
    ys = np.where(np.isfinite(y), y, np.nan)
    xs_out, ys_out = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        seg = ys[a:b]
        if b <= a or np.all(np.isnan(seg)):
            continue
        i, j = a + int(np.nanargmin(seg)), a + int(np.nanargmax(seg))
        for k in sorted({i, j}):
            xs_out.append(x[k])
            ys_out.append(y[k])
    return np.asarray(xs_out), np.asarray(ys_out)


def sparkline(values: np.ndarray, width: int) -> str:
    """Unicode block sparkline of the last values, scaled to their own range."""
    v = np.asarray(values, dtype=np.float64)[-width:]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return ""
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return BLOCKS[0] * len(v)
    idx = np.clip(((v - lo) / (hi - lo) * (len(BLOCKS) - 1)).round().astype(int), 0,
                  len(BLOCKS) - 1)
    return "".join(BLOCKS[i] for i in idx)


def line_plot(x: np.ndarray, y: np.ndarray, width: int, height: int, title: str,
              log_y: bool = False) -> str:
    """A plotext line chart as an ANSI string sized to the widget."""
    plt.clf()
    plt.plotsize(max(width, 20), max(height, 5))
    plt.theme("clear")
    plt.title(title)
    ok = np.isfinite(y)
    if log_y:
        ok &= y > 0
    x, y = x[ok], y[ok]
    if len(y):
        x, y = minmax_downsample(x, y, max(width - 10, 10))
        plt.plot(x.tolist(), y.tolist(), marker="braille")
        if log_y:
            plt.yscale("log")
    return plt.build()


def hist_labels(edges: np.ndarray) -> list[str]:
    """A short label per bin of a symmetric log histogram (its lower magnitude edge)."""
    k = (len(edges) - 2) // 2  # bins per side besides overflow
    mags = edges[k + 1:]  # m_0 .. m_K
    neg = [f"-{m:.0e}" for m in mags[::-1]]  # overflow and the negative octaves
    pos = [f"{m:.0e}" for m in mags]
    return [*neg, "0", *pos]


def hist_plot(edges: np.ndarray, counts: np.ndarray, width: int, height: int,
              title: str) -> str:
    """Bars (fractions) of a symmetric log histogram with a handful of bin labels; empty
    outer bins are trimmed so that the populated part gets the width."""
    plt.clf()
    plt.plotsize(max(width, 20), max(height, 5))
    plt.theme("clear")
    plt.title(title)
    used = np.flatnonzero(counts > 0)
    if len(used):
        lo, hi = int(used[0]), int(used[-1]) + 1
        labels = hist_labels(edges)[lo:hi]
        x = list(range(hi - lo))
        plt.bar(x, (counts[lo:hi] / counts.sum()).tolist(), marker="sd", width=0.8)
        step = max(1, len(x) // 6)
        plt.xticks(x[::step], labels[::step])
    return plt.build()
