"""The statistics in the UI: the store's new series, the layers table's columns and the
layer-detail screen, driven with Pilot against a real training process."""

from __future__ import annotations

import numpy as np
import pytest

from neurotop.protocol import wire
from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.frame import Wants
from neurotop.tui.data.store import RunStore
from neurotop.tui.data.targets import resolve
from neurotop.tui.screens.app import NeurotopApp
from neurotop.tui.screens.dashboard import Panel, Plot
from neurotop.tui.screens.widgets import COLUMN_PRESETS, ColumnPicker, LayerTable
from tests.helpers.pilot import until
from tests.helpers.training import watch_options

STATS = ["mean", "std", "max_abs", "grad_rms"]


def message(header: dict, arrays: list[np.ndarray]) -> wire.Message:
    """Through the real encoder and decoder, as the client would get it."""
    return wire.decode(wire.encode(header, arrays))


def fed_store() -> RunStore:
    store = RunStore()
    edges = [-4.0, -2.0, -1.0, 1.0, 2.0, 4.0]
    store.ingest(message({"kind": "schema", "layers": ["a", "b"], "stats": STATS,
                          "scalars": ["loss"], "params": ["a.weight"],
                          "param_stats": ["grad_norm", "weight_norm"], "hist_layers": ["b"],
                          "hist_edges": edges, "layer_types": ["Linear", "ReLU"]}, []))
    for step in (1, 2, 3):
        block = np.arange(8, dtype=np.float32).reshape(2, 4) + step
        store.ingest(message({"kind": "stats", "step": step}, [block, np.ones(1, np.float32)]))
        store.ingest(message({"kind": "params", "step": step},
                             [np.full((1, 2), step, np.float32)]))
    store.ingest(message({"kind": "hist", "step": 3},
                         [np.arange(7, dtype=np.float32)[None], np.ones((1, 7), np.float32)]))
    return store


def test_store_keeps_layer_series_params_and_histograms():
    store = fed_store()
    steps, series = store.layer_series("b")
    assert steps.tolist() == [1, 2, 3] and series[:, 0].tolist() == [5.0, 6.0, 7.0]
    assert store.latest_params()[0] == 3
    psteps, hist = store.param_series("weight_norm", 10)
    assert psteps.tolist() == [1, 2, 3] and hist.tolist() == [[1.0, 2.0, 3.0]]
    h = store.latest_histogram("b")
    assert h["step"] == 3 and h["act"].tolist() == list(range(7)) and len(h["edges"]) == 6
    assert store.latest_histogram("a") is None  # not a histogram layer
    bad = store.status.bad_messages
    store.ingest(message({"kind": "params", "step": 4}, [np.zeros((3, 2), np.float32)]))
    store.ingest(message({"kind": "hist", "step": 4}, [np.zeros((1, 5), np.float32)] * 2))
    assert store.status.bad_messages == bad + 2 and "match the schema" in store.status.last_error


def test_a_frame_is_one_copy_of_what_the_screen_draws():
    store = fed_store()
    frame = store.frame(Wants(heat="", trend=("mean", 2), layer="", param_stat="weight_norm",
                              events=5))
    assert frame.schema.layers == ("a", "b") and frame.schema.layer_types == ("Linear", "ReLU")
    assert frame.heat[1].shape == (3, 2)  # "" is the view's default: the last statistic
    assert frame.trend.tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert frame.layer[0].tolist() == [1, 2, 3]  # "" is the first layer
    assert frame.histogram is None and frame.param_series[1].tolist() == [[1.0, 2.0, 3.0]]
    store.ingest(message({"kind": "stats", "step": 4},
                         [np.zeros((2, 4), np.float32), np.ones(1, np.float32)]))
    assert frame.status.step == 3 and frame.latest[0, 0] == 3.0  # untouched by the writer
    assert store.frame().latest[0, 0] == 0.0 and store.frame().heat[1].size == 0


def test_a_bad_field_is_counted_and_a_store_bug_is_not():
    store = fed_store()
    store.ingest(message({"kind": "heartbeat", "state": "running"}, []))  # no step
    assert store.status.bad_messages == 1 and "'step'" in store.status.last_error
    store._scalars.clear()  # a bug of the store's own: its series are gone
    with pytest.raises(KeyError):
        store.ingest(message({"kind": "stats", "step": 4},
                             [np.zeros((2, 4), np.float32), np.ones(1, np.float32)]))
    assert store.status.bad_messages == 1


@pytest.mark.slow
async def test_columns_and_layer_detail(start_run):
    cfg = {"report_every": 1, "hist_every": 1, "signal_layers": ["*"]}
    run = start_run("--step-sleep", "0.02", "--massive", *watch_options(**cfg))
    client = LiveClient(resolve(run.info.run_id)).start()
    app = NeurotopApp(client)
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot.press("2")  # the layers screen (the overview is the first)
            table = app.query_one(LayerTable)
            await until(pilot, lambda: table.row_count == 5, what="layer rows")
            assert table.column_names()[1:-1] == list(COLUMN_PRESETS["overview"])

            await pilot.press("p")  # next preset: the activation statistics
            await until(pilot, lambda: table.column_names()[1:-1]
                        == list(COLUMN_PRESETS["activations"]), what="preset columns")

            await pilot.press("o")  # pick columns: untick the first, mean
            await until(pilot, lambda: isinstance(app.screen, ColumnPicker), what="picker")
            await pilot.press("space", "escape")
            await until(pilot, lambda: table.column_names()[1:-1]
                        == ["std", "rms", "max_abs", "massive_ratio", "kurtosis"],
                        what="picked columns")

            table.focus()
            table.move_cursor(row=2)  # layer "2", with the planted massive activation
            await pilot.press("enter")
            await until(pilot, lambda: app.screen_name == "detail", what="detail")
            assert app.view.layer == "2"
            stats = client.store.schema["stats"]
            plots = [app.query_one(f"#dt-plot-{j}", Plot) for j in range(len(stats))]
            await until(pilot, lambda: [p.text.split()[0] for p in plots] == stats,
                        what="every statistic plotted")
            hist = app.query_one("#hist-now", Panel)
            await until(pilot, lambda: "activations, step" in hist.text, what="histogram")
            assert "gradients dL/dh, step" in app.query_one("#hist-grad", Panel).text
            await pilot.press("escape")
            await until(pilot, lambda: app.screen_name == "layers", what="back to the table")
    finally:
        client.close()


def test_sparkline_scales_to_its_range_and_draws_a_flat_series_mid_height():
    from neurotop.tui.screens.plotting import BLOCKS, sparkline

    rising = sparkline(np.arange(8.0), 8)
    assert rising == BLOCKS  # lowest block to highest
    flat = sparkline(np.full(5, 1.0), 8)  # e.g. a layer stuck at 100 % dead
    assert len(flat) == 5 and len(set(flat)) == 1 and flat[0] not in (BLOCKS[0], BLOCKS[-1])
    assert sparkline(np.array([np.nan, 2.0, np.inf, 2.0]), 8) == flat[:2]  # gaps skipped
    assert sparkline(np.arange(100.0), 10) == sparkline(np.arange(90.0, 100.0), 10)  # last
