"""Turning long series into something a terminal can draw quickly.

Everything here is NumPy passes over a series, never Python per point: a plot reduces a
series to its min and max per dot column (``_dots``), so 100k steps draw in a few
milliseconds and spikes survive. Plots are braille dots (2 x 4 per cell) in the
terminal's default foreground or a theme colour passed in, so they read on dark and
light backgrounds alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"
SHADES = " ░▒▓█"
#: Braille dot bits by (row within the cell, column within the cell).
_DOTS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], np.int64)
LABEL_W = 10  # the y labels' column: 9 characters and the axis


def smooth(y: np.ndarray, span: int) -> np.ndarray:
    """Trailing mean over ``span`` points (NaN ignored): the loss's trend without its noise.
    In float64, and a constant stretch is exactly its value: float32 running sums put
    wiggles into a constant learning rate."""
    y = np.asarray(y, dtype=np.float64)
    if span <= 1 or len(y) < 2:
        return y
    ok = np.isfinite(y)
    ref = float(y[ok][0]) if ok.any() else 0.0  # sums of differences from it: no drift
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, y - ref, 0.0))])
    k = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(1, len(y) + 1) - span, 0)
    hi = np.arange(1, len(y) + 1)
    n = k[hi] - k[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (c[hi] - c[lo]) / n + ref, np.nan)


def window(x: np.ndarray, last: int | None, *ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """The points of the last ``last`` steps (all of them for ``None``)."""
    if last is None or not len(x):
        return (x, *ys)
    keep = x > x[-1] - last
    return (x[keep], *(y[keep] for y in ys))


def is_fraction(stat: str) -> bool:
    """Whether a statistic is a fraction of units (``dead_frac``, ``zero_frac``,
    ``dead_frac_window``...): drawn on a fixed 0..1 scale, so a shade or bar means the
    same value in every view and at every width."""
    return stat.endswith("_frac") or "_frac_" in stat


def value_scale(stat: str, values: np.ndarray) -> tuple[float, float]:
    """The (low, high) a shade or sparkline maps to: 0..1 for fractions, else the range
    of the values drawn (0..1 when none is finite)."""
    if is_fraction(stat):
        return 0.0, 1.0
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)


def sparkline(values: np.ndarray, width: int,
              scale: tuple[float, float] | None = None) -> str:
    """Unicode block sparkline of the last values: on ``scale`` (low, high) when given,
    else on their own range. A constant series without a scale draws at the bottom when
    it is zero and mid-height otherwise (flat, not low: a constant loss is not at 0)."""
    v = np.asarray(values, dtype=np.float64)[-width:]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return ""
    lo, hi = scale if scale is not None else (float(v.min()), float(v.max()))
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        flat = 0 if scale is not None or not np.any(v) else len(BLOCKS) // 2 - 1
        return BLOCKS[flat] * len(v)
    idx = np.clip(((v - lo) / (hi - lo) * (len(BLOCKS) - 1)).round().astype(int), 0,
                  len(BLOCKS) - 1)
    return "".join(BLOCKS[i] for i in idx)


def fmt_axis(v: float, digits: int = 3) -> str:
    """A compact axis number with ``digits`` significant digits (``3e-3``, ``0.0312``)."""
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
        mant, exp = f"{v:.{max(digits - 1, 0)}e}".split("e")
        if "." in mant:
            mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return f"{v:.{digits}g}"


def axis_labels(values: list[float], width: int) -> list[str]:
    """Labels for the ``values`` of one axis, with the fewest digits (3 at least) that
    tell them apart, each at most ``width`` characters: two ticks never read alike
    unless ``width`` cannot tell them apart."""
    best = [fmt_axis(v)[:width] for v in values]
    for digits in range(3, 10):
        labels = [fmt_axis(v, digits) for v in values]
        if any(len(t) > width for t in labels):
            break
        best = labels
        if len(set(labels)) == len(set(values)):
            break
    return best


def shade_legend(lo: float, hi: float) -> str:
    """What the heat strip's shades mean, with numbers: ``·0 ░≤.25 ▒≤.5 ▓≤.75 █≤1``."""
    steps = [lo + (hi - lo) * k / (len(SHADES) - 1) for k in range(len(SHADES))]
    labels = axis_labels(steps, 8)
    return " ".join([f"{labels[0]} blank"] + [f"{SHADES[k]}≤{labels[k]}"
                                              for k in range(1, len(SHADES))])


class Lines:
    """Styled lines, cheaper than ``rich.text.Text`` for what is redrawn every frame:
    each line a list of (text, style) runs. ``append`` starts a new line at each newline."""

    def __init__(self, text: str = "", style: str = "") -> None:
        self.lines: list[list[tuple[str, str]]] = [[]]
        if text:
            self.append(text, style)

    def append(self, text: str, style: str = "") -> None:
        first, *rest = text.split("\n")
        if first:
            self.lines[-1].append((first, style))
        for part in rest:
            self.lines.append([(part, style)] if part else [])

    @property
    def plain(self) -> str:
        return "\n".join("".join(t for t, _ in line) for line in self.lines)


@dataclass
class Series:
    x: np.ndarray
    y: np.ndarray
    style: str = ""


def _dots(s: Series, x0: float, x1: float, y0: float, y1: float, w: int, h: int) -> np.ndarray:
    """``[4h x 2w]`` dots of one series: the min/max reduction to the plot's width. Each
    dot column covers the points that fall in it (steps ascending) and lights from their
    min to their max, joined to the previous column's last point; so 100k points cost a
    few NumPy passes, and a one-step spike still lights its column."""
    grid = np.zeros((4 * h, 2 * w), bool)
    ok = np.isfinite(s.y)
    x, y = s.x[ok].astype(np.float64), s.y[ok].astype(np.float64)
    if not len(x):
        return grid
    cx = np.clip(((x - x0) / max(x1 - x0, 1e-300) * (2 * w - 1)).round().astype(np.int64),
                 0, 2 * w - 1)
    cy = np.clip(((y1 - y) / max(y1 - y0, 1e-300) * (4 * h - 1)).round().astype(np.int64),
                 0, 4 * h - 1)
    starts = np.flatnonzero(np.r_[True, cx[1:] != cx[:-1]])
    cols = cx[starts]
    lo, hi = np.minimum.reduceat(cy, starts), np.maximum.reduceat(cy, starts)
    last = cy[np.r_[starts[1:] - 1, len(cy) - 1]]
    lo[1:], hi[1:] = np.minimum(lo[1:], last[:-1]), np.maximum(hi[1:], last[:-1])
    rows = np.arange(4 * h)[:, None]
    grid[:, cols] = (rows >= lo) & (rows <= hi)
    return grid


def _cells(grid: np.ndarray) -> np.ndarray:
    """Braille code points ``[h x w]`` of a dot grid (0 where a cell has no dot)."""
    h4, w2 = grid.shape
    g = grid.reshape(h4 // 4, 4, w2 // 2, 2)
    return (g * _DOTS[None, :, None, :]).sum(axis=(1, 3))


def _ticks(y0: float, y1: float, h: int, log_y: bool,
           flat: float | None) -> dict[int, float]:
    """The y axis's labelled rows and their values (log10 of them on a log axis): a flat
    series only its value, on its row; otherwise the top and bottom and, between them,
    every decade on a log axis (the middle when none falls inside) or the middle on a
    linear one."""
    def row(v: float) -> int:
        return int(round((y1 - v) / (y1 - y0) * (4 * h - 1))) // 4

    def at(r: int) -> float:  # the value at the middle of a row's dots
        return y1 - (4 * r + 1.5) / (4 * h - 1) * (y1 - y0)

    if flat is not None:
        return {row(flat): flat}
    ticks = {0: y1, h - 1: y0}
    inner: dict[int, float] = {}
    if log_y:
        for k in range(math.ceil(y0), math.floor(y1) + 1):
            if 1 < row(k) < h - 2 and all(abs(row(k) - r) > 1 for r in inner):
                inner[row(k)] = float(k)
    if not inner and h >= 5:
        inner[h // 2] = at(h // 2)
    return {**ticks, **inner}


def braille_plot(series: list[Series], width: int, height: int, title: str = "",
                 log_y: bool = False, guide: float | None = None,
                 guide_style: str = "dim") -> Lines:
    """A line chart as styled text: title line, then ``height - 1`` rows of braille with the
    y range on the left and the x range underneath. ``guide`` draws a dotted horizontal
    line (e.g. the 1e-3 update/weight ratio); later series draw over earlier ones."""
    w, h = max(width - LABEL_W, 4), max(height - 2, 2)
    out = Lines(title[: max(width, 1)], style="bold")
    xs = [s.x for s in series if len(s.x)]
    x0, x1 = (min(float(x[0]) for x in xs), max(float(x[-1]) for x in xs)) if xs else (0, 1)
    ser = []
    for s in series:
        y = s.y.astype(np.float64)
        if log_y:
            with np.errstate(divide="ignore", invalid="ignore"):
                y = np.where(y > 0, np.log10(np.abs(y)), np.nan)
        ser.append(Series(s.x, y, s.style))
    ys = [s.y[np.isfinite(s.y)] for s in ser]
    ys = [v for v in ys if len(v)]
    if not ys:
        out.append("\n" + "\n".join(" " * LABEL_W + "·" for _ in range(h)) + "\n(no data)")
        return out
    gy = None
    if guide is not None and (guide > 0 or not log_y):
        gy = math.log10(guide) if log_y else guide
    y0 = min(float(v.min()) for v in ys)
    y1 = max(float(v.max()) for v in ys)
    if gy is not None:
        y0, y1 = min(y0, gy), max(y1, gy)
    # Flat within float32's precision: a line at mid-height, labelled with its value.
    flat = y0 if y1 - y0 <= 1e-6 * max(abs(y0), abs(y1)) else None
    if flat is not None:
        pad = 0.5 if log_y else (abs(flat) * 0.5 or 1.0)
        y0, y1 = flat - pad, flat + pad
    cells = np.zeros((h, w), np.int64)
    owner = np.full((h, w), -1)
    for i, s in enumerate(ser):
        c = _cells(_dots(s, x0, x1, y0, y1, w, h))
        cells |= c
        owner[c > 0] = i
    guide_row = -1
    if gy is not None:
        guide_row = int(round((y1 - gy) / (y1 - y0) * (4 * h - 1))) // 4
    ticks = _ticks(y0, y1, h, log_y, flat)
    if 0 <= guide_row < h and gy is not None:
        ticks[guide_row] = gy
    rows = sorted(ticks)
    texts = axis_labels([10 ** ticks[r] if log_y else ticks[r] for r in rows], LABEL_W - 1)
    labels = {r: t.rjust(LABEL_W - 1) + "┤" for r, t in zip(rows, texts, strict=True)}

    codes = np.where(cells > 0, 0x2800 + cells, ord(" "))
    if 0 <= guide_row < h:
        codes[guide_row] = np.where(cells[guide_row] > 0, codes[guide_row], ord("┈"))
        owner[guide_row] = np.where(cells[guide_row] > 0, owner[guide_row], -2)
    styles = {-1: "", -2: guide_style, **{i: s.style for i, s in enumerate(ser)}}
    for r in range(h):
        out.append("\n")
        out.append(labels.get(r, " " * (LABEL_W - 1) + "│"),
                   style=guide_style if r == guide_row else "dim")
        line = codes[r].astype("<u4").tobytes().decode("utf-32-le")
        cuts = [0, *(np.flatnonzero(np.diff(owner[r])) + 1).tolist(), w]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            out.append(line[a:b], style=styles[int(owner[r, a])])
    left, right = f"{int(x0):,}", f"{int(x1):,}"
    out.append("\n" + " " * LABEL_W + left + right.rjust(max(w - len(left), 1)), style="dim")
    return out


def heat_strip(rows: np.ndarray, width: int, levels: np.ndarray | None = None,
               styles: tuple[str, str, str] = ("", "yellow", "red"),
               nan_is_idle: bool = False,
               scale: tuple[float, float] | None = None) -> list[Text]:
    """``[series x time]`` as one text line per series: the shade says the value on
    ``scale`` (low, high; default the whole strip's range), the colour its health level
    (0 ok, 1 warn, 2 critical). Shades are bins (``shade_legend``): blank is the low end,
    ``█`` the top quarter. Time is cut into ``width`` columns, each showing the max of its
    stretch. Non-finite values are a critical ``×``; with ``nan_is_idle`` (a statistic
    that is never NaN for a layer that ran) NaN is a plain ``·``: the layer was not
    called."""
    n, t = rows.shape if rows.ndim == 2 else (0, 0)
    if not n or not t or width <= 0:
        return [Text("") for _ in range(n)]
    cols = min(width, t)
    starts = (np.arange(cols) * t) // cols
    with np.errstate(invalid="ignore"):
        v = np.fmax.reduceat(rows, starts, axis=1)
        lv = None if levels is None else np.maximum.reduceat(levels, starts, axis=1)
    lo, hi = scale if scale is not None else value_scale("", v)
    span = hi - lo if hi > lo else 1.0
    top = len(SHADES) - 1
    with np.errstate(invalid="ignore"):
        idx = np.where(np.isfinite(v), np.clip(np.ceil((v - lo) / span * top - 1e-9), 0, top),
                       0).astype(int)
    if scale is None and hi == lo:
        idx[np.isfinite(v)] = 1  # one value throughout: shown, not blank
    idle = nan_is_idle & np.isnan(v)  # not called: drawn plainly, not as an alarm
    ok = 0 if lv is None else np.maximum(lv, 0)
    lvl = np.where(np.isfinite(v), ok, np.where(idle, 0, 2)).astype(int)
    chars = np.array(list(SHADES + "×·"))[np.where(
        np.isfinite(v), idx, np.where(idle, len(SHADES) + 1, len(SHADES)))]
    lines = []
    for i in range(n):
        line = Text(no_wrap=True, overflow="crop")
        cuts = [0, *(np.flatnonzero(np.diff(lvl[i])) + 1).tolist(), cols]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            line.append("".join(chars[i, a:b]), style=styles[lvl[i, a]])
        lines.append(line)
    return lines


def hist_labels(edges: np.ndarray) -> list[str]:
    """A short label per bin of a symmetric log histogram (its lower magnitude edge)."""
    k = (len(edges) - 2) // 2  # bins per side besides overflow
    mags = edges[k + 1:]  # m_0 .. m_K
    neg = [f"-{m:.0e}" for m in mags[::-1]]  # overflow and the negative octaves
    pos = [f"{m:.0e}" for m in mags]
    return [*neg, "0", *pos]
