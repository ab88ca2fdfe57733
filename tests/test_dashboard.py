"""The dashboard as a person uses it: Pilot walks every screen of a recorded run (a
deterministic stream from ``tests/helpers/sessions.py``), sorts, filters and toggles; the store
keeps a live run's memory bounded without losing its spikes."""

from __future__ import annotations

import numpy as np
import pytest

from neurotop.protocol import wire
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.data.store import RunStore
from neurotop.tui.screens.app import HelpScreen
from neurotop.tui.screens.control_panel import ControlPanel
from neurotop.tui.screens.dashboard import AlertFeed, HeatStrip, Panel, Plot
from neurotop.tui.screens.replay_app import ReplayApp
from neurotop.tui.screens.widgets import LayerTable
from tests.helpers.pilot import until
from tests.helpers.sessions import DASH_STATS, write_dashboard_run

DYING = "net.4"  # write_dashboard_run's layer whose dead fraction climbs to 1


@pytest.fixture
def dash_app(tmp_path):
    path = tmp_path / "dash.ntop"
    write_dashboard_run(path, 400)
    source = ReplaySource(path).start()
    yield ReplayApp(source)
    source.close()


def row_text(table: LayerTable, r: int) -> str:
    return "".join(s.text for s in table.render_line(r + 1 - table.scroll_offset.y))


async def test_every_screen_sort_filter_toggles(dash_app):
    app = dash_app
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.store.status.step == 400, what="the whole recording")
        heat = app.query_one(HeatStrip)
        await until(pilot, lambda: DYING in heat.text, what="the heat strip")
        assert "heat: dead_frac" in heat.text
        dying_line = next(ln for ln in heat.text.splitlines() if ln.startswith(DYING))
        assert "█" in dying_line  # the dying layer reaches the top of the scale
        other = next(ln for ln in heat.text.splitlines() if ln.startswith("net.0"))
        assert "█" not in other and "▓" not in other
        feed = " ".join(app.query_one(AlertFeed).text.split())  # unwrapped
        assert f"@200 ▲ dying_layer: layer {DYING!r}: 94% of units dead over the window" in feed
        assert app.query_one("#ov-plot-0", Plot).text.startswith("loss")

        # Layers: every layer, sortable by any column, filterable by a glob.
        await pilot.press("2")
        table = app.query_one(LayerTable)
        await until(pilot, lambda: table.row_count == 8, what="the layer rows")
        dead = table.column_names().index("dead_frac")  # the overview preset's columns
        while app.view.sort != "dead_frac":
            await pilot.press("S")
        # Descending: the dead layer first.
        await until(pilot, lambda: table.shown_layers[0] == DYING, what="sorted by dead_frac")
        line = table.render_line(1)
        cell = next(s for s in line if s.text.strip() == "1.0000")
        assert cell.style.color.triplet.hex == app.current_theme.error.lower()
        await pilot.press("R")
        await until(pilot, lambda: table.shown_layers[-1] == DYING, what="the order reversed")
        assert float(row_text(table, 0).split()[dead + 1]) < 0.1  # after the name and type
        await pilot.click(LayerTable, offset=(3, 0))  # the "layer" header: model order
        await until(pilot, lambda: app.view.sort == "layer", what="sorted by layer")

        await pilot.press("slash", *"net.[12]", "enter")
        await until(pilot, lambda: table.shown_layers == ("net.1", "net.2"), what="the filter")
        await pilot.press("slash", "escape")
        await until(pilot, lambda: table.row_count == 8, what="the filter cleared")

        # Enter on a layer opens its detail: every statistic, histogram now and over time.
        while table.selected_layer() != DYING:
            await pilot.press("down")
        await pilot.press("enter")
        await until(pilot, lambda: app.screen_name == "detail" and app.view.layer == DYING,
                    what="the dying layer's detail")
        plots = [app.query_one(f"#dt-plot-{j}", Plot) for j in range(len(DASH_STATS))]
        assert [p.text.split()[0] for p in plots] == DASH_STATS
        assert "none for this layer" in app.query_one("#hist-now", Panel).text
        await pilot.press("comma", "comma", "comma", "comma")  # back to net.0
        await until(pilot, lambda: app.view.layer == "net.0", what="net.0's detail")
        assert "activations, step 400" in app.query_one("#hist-now", Panel).text
        assert "gradients dL/dh, step 400" in app.query_one("#hist-grad", Panel).text
        assert "40 reports" in app.query_one("#hist-time", Panel).text

        # Toggles: log scale, smoothing, window.
        mean = app.query_one("#dt-plot-0", Plot)
        linear = mean.text
        await pilot.press("l")
        await until(pilot, lambda: app.view.log_y and mean.text != linear, what="log scale")
        await pilot.press("m", "a")
        await until(pilot, lambda: not app.view.smooth and app.view.last == 1000,
                    what="raw, last 1,000 steps")
        assert "log · raw · last 1,000 steps" in str(app.query_one("#detail-title").render())

        # Gradients: the parameter furthest from the 1e-3 guide stands out.
        await pilot.press("4")
        await until(pilot, lambda: app.screen_name == "gradients", what="the gradients")
        bars = app.query_one("#grad-bars", Panel).text
        assert "net.0.weight" in bars and "0.0500" in bars
        assert "guide 1e-3" in app.query_one("#grad-plot", Plot).text

        # Control: the control panel as a screen; any other screen hides it again.
        panel = app.query_one(ControlPanel)
        await pilot.press("5")
        await until(pilot, lambda: panel.has_class("full"), what="the control screen")
        await pilot.press("1")
        await until(pilot, lambda: not panel.has_class("shown"), what="the panel hidden")

        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="the help")
        help_text = str(app.screen.query_one("Static").render())
        for key in ("1 … 5", "/", "S, R", ", .", "space", "[ ]", "o ", "p "):
            assert key in help_text
        await pilot.press("escape")


def test_help_covers_every_binding():
    """Every key the app binds has a line in the help."""
    from neurotop.tui.screens.app import NeurotopApp
    helped = {a for _, a, _ in (*NeurotopApp.VIEW_HELP, *NeurotopApp.HELP)}
    bound = {b.action.split("(")[0] for b in NeurotopApp.BINDINGS}
    assert bound - {"next_layer", "reverse_sort"} <= helped | {"help"}
    assert {"pick_columns", "next_preset", "back"} <= helped
    assert {"next_layer", "sort"} <= helped


def stats_message(step: int, layers: int, loss: float) -> wire.Message:
    block = np.full((layers, 2), step, np.float32)
    return wire.Message({"kind": "stats", "step": step},
                        [block, np.array([loss], np.float32)])


def test_live_store_memory_is_bounded_and_keeps_spikes():
    store = RunStore(window=256)
    store.ingest_schema({"layers": ["a", "b"], "stats": ["mean", "dead_frac"],
                         "scalars": ["loss"]})
    sizes = []
    for s in range(1, 40_001):
        store.ingest(stats_message(s, 2, 1e6 if s == 1234 else 1.0))
        if s in (10_000, 40_000):
            sizes.append(store.memory_bytes())
    assert sizes[0] == sizes[1], "memory grew with the run's length"
    x, y = store.scalar("loss", envelope=True)
    assert y.max() == 1e6, "the spike was lost in compaction"
    assert x[-1] == 40_000 and len(x) < 2_000
    steps = store.steps()
    assert np.all(np.diff(steps) > 0) and steps[-1] == 40_000
    assert store.recent_series("mean", 3).tolist() == [[39_998, 39_999, 40_000]] * 2
    xs, rows = store.layer_stats(0)  # the "mean" statistic is the step: bucket means
    assert np.all(np.diff(rows[:, 0]) > 0) and np.all(rows[:, 0] <= xs)
    assert xs[0] == store.summary.res  # the oldest bucket covers steps 1 … res: the start

    replay = RunStore(window=None)  # replay keeps every row: it seeks to any of them
    replay.ingest_schema({"layers": ["a"], "stats": ["mean", "dead_frac"], "scalars": ["loss"]})
    for s in range(1, 3001):
        replay.ingest(stats_message(s, 1, 1.0))
    assert len(replay.steps()) == 3000


def test_histogram_history_for_the_heatmap_is_bounded():
    store = RunStore()
    store.ingest_schema({"layers": ["a", "b"], "stats": ["mean"], "scalars": ["loss"],
                         "hist_layers": ["b"], "hist_edges": [-1.0, 1.0]})
    for step in range(1, 301):
        counts = np.full((1, 3), step, np.float32)
        store.ingest(wire.Message({"kind": "hist", "step": step}, [counts, counts]))
    steps, hists = store.histograms("b")
    assert steps.tolist() == list(range(45, 301))  # the last 256 reports, oldest first
    assert hists.shape == (256, 3) and hists[-1].tolist() == [300.0] * 3
    assert store.histograms("a")[0].size == 0  # not a histogram layer
