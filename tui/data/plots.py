"""What ``neurotop plot`` draws: the series of a recorded session, chosen by name.

A statistic is a scalar of the run (``loss``, ``lr``, ``grad_norm``: one line) or a layer
statistic (``dead_frac``, ``mean``: one line per layer whose name matches the layer
filter, as the UI's ``/`` filter matches). Scalars win a name both have. Non-finite values
are left out (and counted: the chart says so); a long series is thinned to the min and the
max of each stretch of points, so the chart's range is the data's and spikes survive.
Plain NumPy: drawing is ``neurotop.tui.charts``'s (plotext), kept off the data side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neurotop.tui.data.store import RunStore
from neurotop.tui.data.view import matches

#: Thinned series keep at most this many stretches (two points each) per line.
MAX_BUCKETS = 400


class PlotError(ValueError):
    """What the user asked for is not in the session; the message says what is."""


@dataclass(frozen=True)
class Line:
    label: str
    steps: np.ndarray  # int64
    values: np.ndarray  # float64, finite


@dataclass(frozen=True)
class Chart:
    title: str
    lines: tuple[Line, ...]
    left_out: int  # non-finite values not drawn


def thin(steps: np.ndarray, values: np.ndarray, buckets: int = MAX_BUCKETS
         ) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * buckets`` of the points, in order: each stretch's lowest and highest."""
    n = len(values)
    if n <= 2 * buckets:
        return steps, values
    bucket = np.arange(n) * buckets // n
    order = np.lexsort((values, bucket))  # by bucket, then by value
    starts = np.flatnonzero(np.r_[True, bucket[order][1:] != bucket[order][:-1]])
    ends = np.r_[starts[1:], n] - 1
    keep = np.unique(np.concatenate([order[starts], order[ends]]))
    return steps[keep], values[keep]


def _line(label: str, steps: np.ndarray, values: np.ndarray) -> tuple[Line | None, int]:
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    left_out = int((~ok).sum())
    if not ok.any():
        return None, left_out
    s, v = thin(np.asarray(steps, np.int64)[ok], v[ok])
    return Line(label, s, v), left_out


def known(store: RunStore) -> str:
    """The names ``chart`` takes, for an error message."""
    schema = store.schema or {"scalars": [], "stats": []}
    return (f"scalars: {', '.join(schema['scalars']) or 'none'};"
            f" layer statistics: {', '.join(schema['stats']) or 'none'}")


def chart(store: RunStore, stat: str, layer_filter: str = "") -> Chart:
    """One chart of ``stat``; a ``PlotError`` if the session has no such series, no layer
    matches, or nothing finite to draw."""
    schema = store.schema
    if schema is None or not len(store.steps()):
        raise PlotError("the session has no reported steps to plot")
    if stat in schema["scalars"]:
        line, left_out = _line(stat, *store.scalar(stat))
        if line is None:
            raise PlotError(f"{stat} has no finite value in this session")
        return Chart(stat, (line,), left_out)
    if stat not in schema["stats"]:
        raise PlotError(f"unknown statistic {stat!r} ({known(store)})")
    chosen = [(i, name) for i, name in enumerate(schema["layers"])
              if matches(name, layer_filter)]
    if not chosen:
        raise PlotError(f"no layer matches {layer_filter!r} (layers:"
                        f" {', '.join(schema['layers'])})")
    steps, series = store.stat_series(stat)  # [rows x layers]
    lines, left_out = [], 0
    for i, name in chosen:
        line, n = _line(name, steps, series[:, i])
        left_out += n
        if line is not None:
            lines.append(line)
    if not lines:
        raise PlotError(f"{stat} has no finite value in the chosen layers")
    where = f" of layers matching {layer_filter!r}" if layer_filter else " by layer"
    return Chart(stat + where, tuple(lines), left_out)


def charts(store: RunStore, stats: Sequence[str], layer_filter: str = "") -> list[Chart]:
    """``chart`` of each statistic, in order (the first error raised)."""
    return [chart(store, s, layer_filter) for s in stats]
