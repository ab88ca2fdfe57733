"""Turning long series into something a terminal can draw quickly.

Everything here is NumPy passes over a series, never Python per point: a plot reduces a
series to its min and max per dot column (``_dots``), so 100k steps draw in a few
milliseconds and spikes survive. Plots are braille dots (2 x 4 per cell) in the
terminal's default foreground or a theme colour passed in, so they read on dark and
light backgrounds alike.
"""

from __future__ import annotations

import functools
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
    n = len(y)
    ok = np.isfinite(y)
    every = bool(ok.all())
    ref = float(y[0]) if every else (float(y[ok][0]) if ok.any() else 0.0)  # no drift
    c = np.zeros(n + 1)  # running sums of the differences from ``ref``
    np.cumsum(y - ref if every else np.where(ok, y - ref, 0.0), out=c[1:])
    head = min(span, n)
    sums = _trailing(c, span)
    if every:  # the first ``span`` windows count 1, 2, ... points, the rest ``span``
        sums[:head] /= np.arange(1, head + 1)
        sums[head:] /= span
        sums += ref
        return sums
    k = np.zeros(n + 1, np.int64)
    np.cumsum(ok, out=k[1:])
    cnt = _trailing(k, span)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, sums / cnt + ref, np.nan)


def _trailing(c: np.ndarray, span: int) -> np.ndarray:
    """Window sums from running sums ``c`` (``c[0] == 0``): window ``i`` is points
    ``max(i + 1 - span, 0) .. i``, so the first ``span`` windows are ``c`` itself and the
    rest a difference of two slices."""
    n = len(c) - 1
    head = min(span, n)
    out = np.empty(n, c.dtype)
    out[:head] = c[1:head + 1]
    np.subtract(c[head + 1:], c[1:max(n - span + 1, 1)], out=out[head:])
    return out


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


def stretch_reduce(ufunc: np.ufunc, rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``ufunc.reduceat(rows, starts, axis=0)`` for increasing ``starts``, one stretch of
    rows at a time: the same values (max and min are exact), and several times faster on
    ``[5k rows x 200 layers]``, where ``reduceat`` along the first axis walks the rows with
    a stride."""
    ends = [*starts[1:].tolist(), len(rows)]
    with np.errstate(invalid="ignore"):
        return np.stack([ufunc.reduce(rows[a:b], axis=0)
                         for a, b in zip(starts.tolist(), ends, strict=True)])


def stretch_scale(stat: str, rows: np.ndarray, highs: np.ndarray) -> tuple[float, float]:
    """``value_scale(stat, rows)`` from the stretches' maxima ``highs`` (``stretch_reduce``
    of ``np.fmax``) and the least value of ``rows``: a plot's width of values and one
    reduction of ``rows``, where ``value_scale`` copies and filters every value. The
    range of finite values is theirs unless one of them is infinite; then it is taken
    over ``rows``."""
    if is_fraction(stat):
        return 0.0, 1.0
    with np.errstate(invalid="ignore"):
        low = np.fmin.reduce(rows, axis=None) if rows.size else np.nan
    ends = np.append(highs.ravel(), low)
    return value_scale(stat, rows if np.isinf(ends).any() else ends)


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


class Sparklines:
    """``sparkline`` of every row of ``[rows x time]`` at once: the scaling in a few NumPy
    passes over the whole block, each row's text made when asked (a table formats only
    the rows on screen). ``line(i)`` is ``sparkline(rows[i], width, scale)``."""

    def __init__(self, rows: np.ndarray, width: int,
                 scale: tuple[float, float] | None = None) -> None:
        v = np.asarray(rows, dtype=np.float64)
        v = v[:, -width:] if v.ndim == 2 and width > 0 else v[:, :0] if v.ndim == 2 \
            else np.empty((0, 0))
        fin = np.isfinite(v)
        n = len(v)
        top = len(BLOCKS) - 1
        if scale is not None:
            lo, hi = np.full(n, float(scale[0])), np.full(n, float(scale[1]))
        else:
            lo = np.where(fin, v, np.inf).min(axis=1, initial=np.inf)
            hi = np.where(fin, v, -np.inf).max(axis=1, initial=-np.inf)
        flat = hi - lo <= 1e-12 * np.maximum(1.0, np.abs(hi))
        with np.errstate(invalid="ignore", divide="ignore"):
            idx = np.clip(((v - lo[:, None]) / (hi - lo)[:, None] * top).round()
                          .astype(int), 0, top)
        # A constant row draws at the bottom when it is zero or has a scale, else
        # mid-height (flat, not low: a constant loss is not at 0).
        nonzero = (fin & (v != 0)).any(axis=1)
        level = np.where((scale is not None) | ~nonzero, 0, len(BLOCKS) // 2 - 1)
        idx = np.where(flat[:, None], level[:, None], idx)
        self._codes = np.array([ord(c) for c in BLOCKS], np.uint32)[idx]
        self._fin = fin
        self._every = fin.all(axis=1)

    def line(self, i: int) -> str:
        codes = self._codes[i] if self._every[i] else self._codes[i][self._fin[i]]
        return codes.astype("<u4").tobytes().decode("utf-32-le")


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
    key = tuple(values)
    # Not remembered with a zero: 0.0 and -0.0 are one key but read "0" and "-0".
    return list(_axis_labels(key, width) if 0 not in key else
                _axis_labels.__wrapped__(key, width))


@functools.lru_cache(maxsize=256)
def _axis_labels(values: tuple[float, ...], width: int) -> tuple[str, ...]:
    """``axis_labels``, remembered: a plot's range, so its ticks, rarely changes from one
    frame to the next, and finding the digits formats each tick several times."""
    best = [fmt_axis(v)[:width] for v in values]
    for digits in range(3, 10):
        labels = [fmt_axis(v, digits) for v in values]
        if any(len(t) > width for t in labels):
            break
        best = labels
        if len(set(labels)) == len(set(values)):
            break
    return tuple(best)


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


def _finite(s: Series, log_y: bool) -> tuple[np.ndarray, np.ndarray]:
    """A series' finite points (log10 of the positive ones on a log axis, in float64)."""
    x, y = np.asarray(s.x), np.asarray(s.y)
    if log_y:
        with np.errstate(divide="ignore", invalid="ignore"):
            y = y.astype(np.float64)
            y = np.where(y > 0, np.log10(np.abs(y)), np.nan)
    ok = np.isfinite(y)
    if ok.all():
        return x, y
    return x[ok], y[ok]


#: The steps ``_columns`` last saw (a copy), and their columns by ``(x0, x1, w)``.
_columns_of: list = [None, {}]


def _columns(x: np.ndarray, x0: float, x1: float, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each dot column's points start in ``x`` (steps ascending), and the columns
    (read-only). Plots drawn one after another from the same steps (a layer's dozen
    statistics, in a grid of two widths) share them: comparing the steps costs a fifth of
    computing the columns."""
    seen, done = _columns_of
    if seen is None or seen.dtype != x.dtype or not np.array_equal(seen, x):
        done = {}
        _columns_of[:] = [x.copy(), done]
    elif (x0, x1, w) in done:
        return done[x0, x1, w]
    cx = ((x.astype(np.float64) - x0) / max(x1 - x0, 1e-300) * (2 * w - 1)).round()
    cx = np.minimum(np.maximum(cx, 0), 2 * w - 1, out=cx).astype(np.int64)
    new = np.empty(len(cx), bool)
    new[0] = True
    np.not_equal(cx[1:], cx[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    cols = cx[starts]
    starts.flags.writeable = cols.flags.writeable = False
    done[x0, x1, w] = starts, cols
    return starts, cols


def _extremes(y: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each dot column's (``_columns``) largest and smallest point and the point before it
    (the first column's own first point, which lies within it): the min/max reduction
    to the plot's width, so 100k points cost a few NumPy passes and a one-step spike
    still lights its column."""
    return (np.maximum.reduceat(y, starts), np.minimum.reduceat(y, starts),
            y[np.maximum(starts - 1, 0)])


def _spans(extremes: list[tuple[np.ndarray, ...]], y0: float, y1: float, h: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The dot rows each dot column of each series lights, ``lo..hi`` (0 at the top), all
    series' columns end to end: from the row of its largest to that of its smallest point
    (a dot row only decreases as the value grows), joined to the previous column's last
    point. All series map to rows in one pass: the arrays are the plot's width, so the
    cost is per NumPy call, not per value."""
    v = np.concatenate([e[k] for k in range(3) for e in extremes], dtype=np.float64)
    r = ((y1 - v) / max(y1 - y0, 1e-300) * (4 * h - 1)).round()
    r = np.minimum(np.maximum(r, 0), 4 * h - 1, out=r).astype(np.int64).reshape(3, -1)
    return np.minimum(r[0], r[2]), np.maximum(r[1], r[2])


def _run_bits(side: int, a: int, b: int) -> int:
    """Braille bits of dots ``a..b`` (top first) of a cell's left (0) or right (1) column."""
    bits = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))[side]
    return sum(bits[a:b + 1])


#: A cell's character by its braille bits: a space where no dot is lit.
_GLYPHS = np.array([ord(" "), *range(0x2801, 0x2900)], "<u4")
#: ``_run_bits`` as a table at ``25 * side + 5 * a + b + 1``, for a first lit dot ``a``
#: in 0..4 and a last ``b`` in -1..3 (4 and -1: none in the cell).
_RUNS = np.array([_run_bits(side, a, b) for side in (0, 1) for a in range(5)
                  for b in range(-1, 4)], np.int64)


def _cells(cols: list[np.ndarray], lo: np.ndarray, hi: np.ndarray, w: int, h: int
           ) -> np.ndarray:
    """Braille code points ``[series x h x w]`` (0 where a cell has no dot) of each
    series' dot columns ``cols`` lit from dot row ``lo`` to ``hi`` (``_spans``): per cell
    row, the first and last lit dot in each column, a table to braille bits, and the
    left and right columns' bits together; all series in one pass, each in its own
    ``2 * w`` dot columns."""
    top = 4 * np.arange(h)[:, None]
    a = np.minimum(np.maximum(lo[None, :] - top, 0), 4)  # the first and last lit dot
    b = np.minimum(np.maximum(hi[None, :] - top, -1), 3)  # within the cell row
    n = len(cols)
    at = np.concatenate([c + 2 * w * i for i, c in enumerate(cols)]) if n > 1 else cols[0]
    a *= 5
    a += b
    a += 1 + 25 * (at & 1)
    bits = np.zeros((h, n * 2 * w), np.int64)
    bits[:, at] = _RUNS[a]
    cells = bits[:, 0::2] | bits[:, 1::2]
    return cells.reshape(h, n, w).transpose(1, 0, 2)


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
    line (e.g. the 1e-3 update/weight ratio); later series draw over earlier ones. Each
    row is as few runs as it has styles (neighbouring cells of one style are one run)."""
    w, h = max(width - LABEL_W, 4), max(height - 2, 2)
    out = Lines(title[: max(width, 1)], style="bold")
    xs = [s.x for s in series if len(s.x)]
    x0, x1 = (min(float(x[0]) for x in xs), max(float(x[-1]) for x in xs)) if xs else (0, 1)
    pts = [_finite(s, log_y) for s in series]
    ys = [y for _, y in pts if len(y)]
    if not ys:
        out.append("\n" + "\n".join(" " * LABEL_W + "·" for _ in range(h)) + "\n(no data)")
        return out
    gy = None
    if guide is not None and (guide > 0 or not log_y):
        gy = math.log10(guide) if log_y else guide
    drawn, dots, extremes = [], [], []
    for i, (x, y) in enumerate(pts):
        if len(x):
            cols = _columns(x, x0, x1, w)  # shared by series (and plots) of equal steps
            drawn.append(i)
            dots.append(cols[1])
            extremes.append(_extremes(y, cols[0]))
    # The range from the columns' extremes, a plot's width of values; from every point at
    # zero, where -0.0 or 0.0 may be the extreme and the two label apart.
    y0 = min(float(low.min()) for _, low, _ in extremes)
    if y0 == 0:
        y0 = min(float(v.min()) for v in ys)
    y1 = max(float(top.max()) for top, _, _ in extremes)
    if y1 == 0:
        y1 = max(float(v.max()) for v in ys)
    if gy is not None:
        y0, y1 = min(y0, gy), max(y1, gy)
    # Flat within float32's precision: a line at mid-height, labelled with its value.
    flat = y0 if y1 - y0 <= 1e-6 * max(abs(y0), abs(y1)) else None
    if flat is not None:
        pad = 0.5 if log_y else (abs(flat) * 0.5 or 1.0)
        y0, y1 = flat - pad, flat + pad
    # Each cell's style, as an index into ``styles`` (0: plain, 1: the guide, 2 + i:
    # series i); the last series with a dot in a cell owns it.
    styles = ["", guide_style, *(s.style for s in series)]
    each = _cells(dots, *_spans(extremes, y0, y1, h), w, h)
    cells = np.bitwise_or.reduce(each, axis=0)
    # Cells of the same style string are one run, whichever series owns them: each
    # cell's style as the first index of its string.
    first = {st: k for k, st in reversed(list(enumerate(styles)))}
    style_id = [first[st] for st in styles]
    sid = np.zeros((h, w), np.int64)
    for i, c in zip(drawn, each, strict=True):
        sid = np.where(c > 0, style_id[2 + i], sid)
    guide_row = -1
    if gy is not None:
        guide_row = int(round((y1 - gy) / (y1 - y0) * (4 * h - 1))) // 4
    ticks = _ticks(y0, y1, h, log_y, flat)
    if 0 <= guide_row < h and gy is not None:
        ticks[guide_row] = gy
    rows = sorted(ticks)
    texts = axis_labels([10 ** ticks[r] if log_y else ticks[r] for r in rows], LABEL_W - 1)
    labels = {r: t.rjust(LABEL_W - 1) + "┤" for r, t in zip(rows, texts, strict=True)}

    codes = _GLYPHS[cells]
    if 0 <= guide_row < h:
        codes[guide_row] = np.where(cells[guide_row] > 0, codes[guide_row], ord("┈"))
        sid[guide_row] = np.where(cells[guide_row] > 0, sid[guide_row], style_id[1])
    text = codes.tobytes().decode("utf-32-le")
    # Where runs start, in the rows read end to end: every row's first cell starts one, so
    # a run ends where the next starts, and a row's runs are those from its first cell.
    new = np.empty((h, w), bool)
    new[:, 0] = True
    np.not_equal(sid[:, 1:], sid[:, :-1], out=new[:, 1:])
    at = np.flatnonzero(new)
    ends = [*at[1:].tolist(), h * w]
    runs = [(text[a:b], styles[k]) for a, b, k in
            zip(at.tolist(), ends, sid.ravel()[at].tolist(), strict=True)]
    rows_at = np.searchsorted(at, np.arange(0, h * w + 1, w)).tolist()
    blank_label = " " * (LABEL_W - 1) + "│"
    lines = out.lines
    for r in range(h):
        lines.append([(labels.get(r, blank_label), guide_style if r == guide_row else "dim"),
                      *runs[rows_at[r]:rows_at[r + 1]]])
    left, right = f"{int(x0):,}", f"{int(x1):,}"
    out.append("\n" + " " * LABEL_W + left + right.rjust(max(w - len(left), 1)), style="dim")
    return out


def heat_runs(rows: np.ndarray, width: int, levels: np.ndarray | None = None,
              styles: tuple[str, str, str] = ("", "yellow", "red"),
              nan_is_idle: bool = False,
              scale: tuple[float, float] | None = None) -> list[list[tuple[str, str]]]:
    """``[series x time]`` as one line of (text, style) runs per series: the shade says the
    value on ``scale`` (low, high; default the whole strip's range), the colour its health
    level (0 ok, 1 warn, 2 critical). Shades are bins (``shade_legend``): blank is the low
    end, ``█`` the top quarter. Time is cut into ``width`` columns, each showing the max of
    its stretch. Non-finite values are a critical ``×``; with ``nan_is_idle`` (a statistic
    that is never NaN for a layer that ran) NaN is a plain ``·``: the layer was not
    called."""
    n, t = rows.shape if rows.ndim == 2 else (0, 0)
    if not n or not t or width <= 0:
        return [[] for _ in range(n)]
    cols = min(width, t)
    if cols == t:
        v = rows
        lv = levels
    else:
        starts = (np.arange(cols) * t) // cols
        with np.errstate(invalid="ignore"):
            v = np.fmax.reduceat(rows, starts, axis=1)
            lv = None if levels is None else np.maximum.reduceat(levels, starts, axis=1)
    lo, hi = scale if scale is not None else value_scale("", v)
    span = hi - lo if hi > lo else 1.0
    top = len(SHADES) - 1
    fin = np.isfinite(v)
    with np.errstate(invalid="ignore"):
        idx = np.where(fin, np.clip(np.ceil((v - lo) / span * top - 1e-9), 0, top),
                       0).astype(int)
    if scale is None and hi == lo:
        idx[fin] = 1  # one value throughout: shown, not blank
    idle = nan_is_idle & np.isnan(v)  # not called: drawn plainly, not as an alarm
    ok = 0 if lv is None else np.maximum(lv, 0)
    lvl = np.where(fin, ok, np.where(idle, 0, 2)).astype(int)
    glyphs = np.array([ord(c) for c in SHADES + "×·"], np.uint32)
    codes = glyphs[np.where(fin, idx, np.where(idle, len(SHADES) + 1, len(SHADES)))]
    text = codes.astype("<u4").tobytes().decode("utf-32-le")
    rr, cc = np.nonzero(lvl[:, 1:] != lvl[:, :-1])
    cuts: list[list[int]] = [[0] for _ in range(n)]
    for r, c in zip(rr.tolist(), (cc + 1).tolist(), strict=True):
        cuts[r].append(c)
    out = []
    for i in range(n):
        line = text[i * cols:(i + 1) * cols]
        cut = [*cuts[i], cols]
        row = lvl[i]
        out.append([(line[a:b], styles[row[a]]) for a, b in zip(cut[:-1], cut[1:], strict=True)])
    return out


def heat_strip(rows: np.ndarray, width: int, levels: np.ndarray | None = None,
               styles: tuple[str, str, str] = ("", "yellow", "red"),
               nan_is_idle: bool = False,
               scale: tuple[float, float] | None = None) -> list[Text]:
    """``heat_runs`` as one ``Text`` per series."""
    lines = []
    for runs in heat_runs(rows, width, levels, styles, nan_is_idle, scale):
        line = Text(no_wrap=True, overflow="crop")
        for text, style in runs:
            line.append(text, style=style)
        lines.append(line)
    return lines


def hist_labels(edges: np.ndarray) -> list[str]:
    """A short label per bin of a symmetric log histogram (its lower magnitude edge)."""
    k = (len(edges) - 2) // 2  # bins per side besides overflow
    mags = edges[k + 1:]  # m_0 .. m_K
    neg = [f"-{m:.0e}" for m in mags[::-1]]  # overflow and the negative octaves
    pos = [f"{m:.0e}" for m in mags]
    return [*neg, "0", *pos]
