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
