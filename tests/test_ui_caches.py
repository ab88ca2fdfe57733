"""The caches that keep frames cheap must draw what an uncached draw would: the heat
strip's rows (``HeatCache``) and shade scale (``stretch_scale``), the layers table's
trends (``Sparklines``) and the runs of lines a table repaints (``line_runs``)."""

from __future__ import annotations

import numpy as np
import pytest

from neurotop.tui.data.frame import Wants
from neurotop.tui.data.store import RunStore
from neurotop.tui.screens.plotting import (
    Sparklines,
    sparkline,
    stretch_reduce,
    stretch_scale,
    value_scale,
)
from neurotop.tui.screens.widgets import line_runs

STATS = ["mean", "dead_frac"]


def store_with(layers: int = 3, window: int | None = None) -> RunStore:
    store = RunStore(window=window)
    store.ingest_schema({"kind": "schema", "layers": [f"l{i}" for i in range(layers)],
                         "stats": STATS, "scalars": ["loss"]})
    return store


def append(store: RunStore, first: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers = len(store.schema["layers"])
    store.ingest_stats_bulk(np.arange(first, first + n),
                            rng.random((n, layers, len(STATS)), np.float32),
                            np.ones((n, 1), np.float32))


def heat(store: RunStore, stat: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    return store.frame(Wants(heat=stat)).heat


def assert_heat_uncached(store: RunStore, stat: str = "mean") -> None:
    steps, values = heat(store, stat)
    want_steps, want_values = store.stat_series(stat)
    np.testing.assert_array_equal(steps, want_steps)
    np.testing.assert_array_equal(values, want_values)


def test_heat_rows_follow_appends_and_earlier_frames_keep_theirs():
    store = store_with()
    append(store, 1, 10, seed=0)
    steps, values = heat(store)
    kept = values.copy()
    for k in range(5):  # one report per frame, then several between two frames
        append(store, 11 + 3 * k, 1 + 2 * k, seed=k + 1)
        assert_heat_uncached(store)
    assert not values.flags.writeable
    np.testing.assert_array_equal(values, kept)  # a frame's arrays are never rewritten
    assert len(steps) == 10


def test_heat_rows_after_another_statistic_and_a_new_schema():
    store = store_with()
    append(store, 1, 8, seed=0)
    heat(store, "mean")
    assert_heat_uncached(store, "dead_frac")
    store.ingest_schema({"kind": "schema", "layers": ["a", "b", "c", "d", "e"],
                         "stats": STATS, "scalars": ["loss"]})  # more layers: new shape
    append(store, 1, 4, seed=1)
    assert heat(store)[1].shape == (4, 5)
    assert_heat_uncached(store)


def test_heat_rows_after_a_compaction():
    store = store_with(window=16)
    for k in range(10):
        append(store, 1 + 7 * k, 7, seed=k)
        assert_heat_uncached(store)
    assert store.summary.n  # the past was compacted on the way


@pytest.mark.parametrize("again", [3, 12], ids=["short-of-the-cache", "past-the-cache"])
def test_heat_rows_after_a_rewind_and_new_rows(again):
    """Replay rewinds, then rows recorded after the cursor replace the old ones: the strip
    shows the new values, also when they reach past what the last frame had."""
    store = store_with()
    append(store, 1, 10, seed=0)
    assert len(heat(store)[0]) == 10
    store.show_rows(4)
    append(store, 5, again, seed=1)  # the same step numbers, other values
    assert_heat_uncached(store)
    store.show_rows(2)  # a rewind with nothing new: the first rows only
    assert_heat_uncached(store)


def test_sparklines_are_each_rows_sparkline():
    rng = np.random.default_rng(0)
    rows = rng.random((6, 40))
    rows[1] = 2.5  # flat, not zero: mid-height
    rows[2] = 0.0  # flat zero: the bottom
    rows[3, 5:9] = np.nan  # gaps are left out
    rows[4] = np.nan  # nothing to draw
    for width in (10, 40, 60):
        for scale in (None, (0.0, 1.0)):
            lines = Sparklines(rows, width, scale)
            for i, row in enumerate(rows):
                assert lines.line(i) == sparkline(row, width, scale), (width, scale, i)
    assert Sparklines(rows, 10).line(1) == "▄" * 10
    assert Sparklines(rows, 10).line(4) == ""


def test_sparklines_of_a_row_shorter_than_the_width():
    rows = np.array([[0.0, 1.0, 2.0]])
    assert Sparklines(rows, 24).line(0) == sparkline(rows[0], 24) == "▁▅█"


@pytest.mark.parametrize(("rows", "runs"), [
    ([], []),
    ([3], [(3, 4)]),
    ([0, 1, 2, 5, 7, 8], [(0, 3), (5, 6), (7, 9)]),
    ([1, 3, 5], [(1, 2), (3, 4), (5, 6)]),
])
def test_line_runs_cover_exactly_the_changed_lines(rows, runs):
    assert line_runs(rows) == runs
    assert [y for a, b in runs for y in range(a, b)] == rows


@pytest.mark.parametrize("special", ["none", "nan", "inf", "-inf", "all-nan", "nan-column"])
def test_stretch_scale_is_the_scale_of_every_stretchs_min_and_max(special):
    """The heat strip's range from the stretches' maxima and one least value is the one
    of every stretch's minimum and maximum (finite values; all of them past an infinity)."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(1000, 7)).astype(np.float32)
    if special == "nan":
        rows[rng.random(rows.shape) < 0.3] = np.nan
    elif special in ("inf", "-inf"):
        rows[17, 2] = float(special)
    elif special == "all-nan":
        rows[:] = np.nan
    elif special == "nan-column":
        rows[:, 4] = np.nan
    starts = (np.arange(90) * len(rows)) // 90
    highs = stretch_reduce(np.fmax, rows, starts).T
    ends = np.concatenate([stretch_reduce(np.fmin, rows, starts).ravel(), highs.ravel()])
    want = value_scale("mean", rows if np.isinf(ends).any() else ends)
    assert stretch_scale("mean", rows, highs) == want
    assert stretch_scale("dead_frac", rows, highs) == (0.0, 1.0)


def test_histograms_follow_each_new_report_and_layer():
    """The stacked histograms are made again when one arrives (or the oldest leaves), for
    the other layer or kind, and after a reset; a frame between reuses them."""
    from neurotop.protocol import wire

    store = RunStore()
    store.ingest_schema({"kind": "schema", "layers": ["a", "b"], "stats": STATS,
                         "scalars": ["loss"], "hist_layers": ["a", "b"],
                         "hist_edges": [-1.0, 1.0]})

    def hist(step: int) -> None:
        act = np.arange(6, dtype=np.float32).reshape(2, 3) + step
        store.ingest(wire.Message({"kind": "hist", "step": step}, [act, -act]))

    for step in range(1, 300):
        hist(step)
        steps, counts = store.histograms("b")
        assert steps[-1] == step and counts[-1].tolist() == [step + 3.0, step + 4, step + 5]
        assert len(steps) == min(step, 256) and steps[0] == max(step - 255, 1)
    assert store.histograms("b")[1] is counts  # nothing new: the same stack
    assert store.histograms("a")[1][-1].tolist() == [299.0, 300, 301]
    assert store.histograms("a", 1)[1][-1].tolist() == [-299.0, -300, -301]
    assert not counts.flags.writeable
    store.reset()
    assert store.histograms("b")[0].size == 0
