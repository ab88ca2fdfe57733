"""Shades, sparklines, plots and headers that tell the truth, at 80x24 and 120x40: a
fraction has one shade at every width, every shaded view has a legend with numbers, a
constant learning rate is a flat line labelled with its value, headers are unique and
never cut mid-word, and names with brackets are shown as they are, not as markup."""

from __future__ import annotations

import numpy as np
import pytest

from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.screens import plotting
from neurotop.tui.screens.control_panel import KnobEditScreen
from neurotop.tui.screens.dashboard import HeatStrip, Plot
from neurotop.tui.screens.plotting import (
    BLOCKS,
    SHADES,
    Series,
    axis_labels,
    braille_plot,
    smooth,
    sparkline,
)
from neurotop.tui.screens.replay_app import ReplayApp
from neurotop.tui.screens.widgets import LayerTable, abbreviate, fmt_cell
from tests.helpers.pilot import screen_lines, until
from tests.helpers.sessions import SessionBuilder

SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
STEPS = 300
LAYERS = ["enc.[b]0[/b]", "dead44", "head"]  # a name that would be markup
STATS = ["mean", "zero_frac", "near_zero_frac", "dead_frac", "dead_frac_window",
         "massive_ratio"]
ALERT = "layer 'enc.[b]0[/b]': [red]62%[/red] of units dead"
LR = 1e-3


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A recorded run: layer ``dead44`` at 0.44 dead throughout, a constant lr, knob
    values in the heartbeats and an alert whose text has brackets."""
    path = tmp_path_factory.mktemp("scales") / "scales.ntop"
    b = SessionBuilder(path, name="scales")
    rng = np.random.default_rng(3)
    for s in range(1, STEPS + 1):
        t = b.t0 + s / 20
        if s == 1:
            b.put({"kind": "schema", "schema_id": 1, "run_name": "scales", "layers": LAYERS,
                   "layer_types": ["Linear", "ReLU", "Linear"], "blocks": [],
                   "stats": STATS, "scalars": ["loss", "lr"]}, t=t)
        block = rng.uniform(0.0, 0.1, (len(LAYERS), len(STATS))).astype(np.float32)
        block[1, 3] = block[1, 4] = 0.44
        block[2, 1] = 0.0  # an all-zero trend row
        vec = np.array([2.0 * np.exp(-s / 100), LR], np.float32)
        b.put({"kind": "stats", "step": s, "wall": t, "schema_id": 1, "dropped": 0},
              (block, vec), t=t)
        if s % 5 == 0:
            b.put({"kind": "heartbeat", "step": s, "state": "running", "paused_at": None,
                   "steps_per_s": 20.0, "dropped": 0, "rec_dropped": 0, "control": "",
                   "knobs": {"lr": 2e-3, "weight_decay": 1.5e-5}}, t=t)
        if s == 100:
            b.put({"kind": "event", "event": "alert", "alert": "dying_layer", "rule": "E2",
                   "level": "warn", "message": ALERT, "layer": LAYERS[0], "value": 0.62,
                   "step": s}, t=t)
    b.close()
    return path


async def open_replay(session, size, pilot_fn):
    source = ReplaySource(session).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.store.status.step == STEPS, what="the recording")
            await pilot.pause(0.3)
            return await pilot_fn(app, pilot)
    finally:
        source.close()


async def heat_row(app, pilot) -> tuple[str, str]:
    await until(pilot, lambda: "dead44" in app.query_one(HeatStrip).text, what="heat rows")
    lines = app.query_one(HeatStrip).text.splitlines()
    row = next(line for line in lines if line.startswith("dead44"))
    return row[HeatStrip.NAME_W:].strip(), lines[0]


async def test_a_fraction_draws_the_same_shade_at_every_width(session):
    """0.44 dead is ``▒`` (0.25..0.5 on the fixed 0..1 scale) at 80 and at 120 columns;
    the legend says what each shade means, in numbers, and a time axis runs under it."""
    shades = {}
    for size in ((80, 24), (120, 40)):
        row, head = await open_replay(session, size, heat_row)
        shades[size] = set(row)
        assert "dead_frac" in head and "░≤0.25" in head and "▒≤0.5" in head and "█≤1" in head
    assert shades[(80, 24)] == shades[(120, 40)] == {SHADES[2]}


@SIZES
async def test_heat_strip_has_a_time_axis_and_trend_a_scale(session, size):
    async def check(app, pilot):
        lines = app.query_one(HeatStrip).text.splitlines()
        assert "step 1" in lines[-1] and f"{STEPS:,}" in lines[-1]
        await pilot.press("2")
        table = app.query_one(LayerTable)
        await until(pilot, lambda: table.row_count == len(LAYERS), what="rows")
        head = next(line for line in screen_lines(app) if line.startswith("layer"))
        assert f"trend: {table.spark_stat}" in head
        return table
    await open_replay(session, size, check)


@SIZES
async def test_constant_lr_is_a_flat_line_labelled_with_its_value(session, size):
    async def check(app, pilot):
        plot = app.query_one("#ov-plot-1", Plot)
        await until(pilot, lambda: plot.text.startswith("lr"), what="the lr plot")
        rows = plot.text.splitlines()[1:-1]  # between the title and the x axis
        drawn = [r for r in rows if any("\u2800" < c <= "\u28ff" for c in r)]
        assert len(drawn) == 1, "a constant lr is one flat line:\n" + plot.text
        assert drawn[0].split("┤")[0].strip() == "1e-3", "labelled with its value"
        assert all("┤" not in r for r in rows if r is not drawn[0]), "no other tick"
        assert "smoothed" in plot.text.splitlines()[0] or "smooth" in plot.text
        await pilot.press("m", "a", "l")  # every mode shows in the tag
        await until(pilot, lambda: "raw" in plot.text.splitlines()[0], what="raw tag")
        title = plot.text.splitlines()[0]
        assert "log" in title and "last 1,000" in title
    await open_replay(session, size, check)


@SIZES
async def test_headers_unique_uncut_and_brackets_literal(session, size):
    async def check(app, pilot):
        lines = screen_lines(app)
        assert any(ALERT[:30] in line for line in lines) or any(
            "enc.[b]0[/b]" in line for line in lines), "the alert text as it was sent"
        assert any(line.startswith("enc.[b]0[/b]") for line in lines), "heat label literal"
        await pilot.press("2")
        for _ in range(4):  # every preset, "all" among them
            await pilot.press("p")
            await pilot.pause(0.3)
            head = next(line for line in screen_lines(app) if line.startswith("layer"))
            cells = [c for c in head.split()[1:] if c != "type"]  # the layer's class
            cells = cells[: cells.index("trend:")] if "trend:" in cells else cells
            assert len(cells) == len(set(cells)), f"two columns alike: {head}"
            for cell in cells:
                assert cell in STATS or cell in ("≈0_frac", "dead_win", "max/med"), head
        assert any(line.startswith("enc.[b]0[/b]") for line in screen_lines(app))
        await pilot.press("5")
        await pilot.pause(0.5)
        text = "\n".join(screen_lines(app))
        assert "0.0020" in text and "1.50e-05" in text, "knob values never cut"
        spec = {"name": "lr", "type": "float", "min": 0.0, "selector": "group",
                "doc": "learning rate [per group]"}
        app.push_screen(KnobEditScreen(spec, 2e-3))
        await until(pilot, lambda: isinstance(app.screen, KnobEditScreen), what="the editor")
        await pilot.pause(0.3)
        text = str(app.screen.query_one("Static").render())
        assert "add [i] for one param group" in text and "[per group]" in text, text
    await open_replay(session, size, check)


def test_sparklines_plots_and_cells_by_the_numbers():
    """The pieces, directly: all-zero rows at the bottom, fractions on 0..1, smoothing
    that keeps a constant exact, axis labels that differ, log ticks between the ends,
    headers abbreviated uniquely, numbers shortened instead of cut."""
    assert sparkline(np.zeros(6), 8) == BLOCKS[0] * 6
    assert sparkline(np.full(4, 0.44), 8, (0.0, 1.0)) == BLOCKS[3] * 4
    lr = np.full(5000, 3e-3, np.float32)
    assert np.all(smooth(lr, 100) == np.float64(np.float32(3e-3)))
    x = np.arange(100)
    close = braille_plot([Series(x, 3e-3 + np.linspace(0, 2e-6, 100))], 40, 8).plain
    labels = [r.split("┤")[0].strip() for r in close.splitlines() if "┤" in r]
    assert len(labels) == len(set(labels)) >= 2, labels
    decay = braille_plot([Series(x, 10 ** -np.linspace(0, 4, 100))], 40, 12, log_y=True)
    ticks = [r.split("┤")[0].strip() for r in decay.plain.splitlines() if "┤" in r]
    assert {"0.1", "0.01", "1e-3"} <= set(ticks), ticks
    heads = abbreviate(["dead_frac", "dead_frac_window", "near_zero_frac", "massive_ratio",
                        "activation_x", "activation_y"], 9)
    assert len(set(heads)) == len(heads) and all(len(h) <= 9 for h in heads)
    assert heads[:4] == ["dead_frac", "dead_win", "≈0_frac", "max/med"]
    for v in (-9999.12345, 123456.0, -1.5e-7, 0.5):
        cell = fmt_cell(v, 10)
        assert len(cell) <= 10 and abs(float(cell) - v) <= abs(v) * 0.01, cell


def test_plots_sharing_steps_draw_as_alone():
    """Plots drawn one after another from equal steps share their columns: each draws as
    it does alone, at either of two widths, from a copy of the steps, and after the steps
    changed in place; the remembered axis labels still tell 0 from -0."""
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.integers(1, 30, 4000))
    ys = [rng.normal(size=len(x)).astype(np.float32) for _ in range(3)]

    def alone(steps: np.ndarray, y: np.ndarray, width: int) -> list:
        plotting._columns_of[:] = [None, {}]
        return braille_plot([Series(steps, y)], width, 10).lines

    expect = [alone(x, y, w) for y in ys for w in (66, 67)]
    assert [braille_plot([Series(x.copy(), y)], w, 10).lines
            for y in ys for w in (66, 67)] == expect
    moved = x.copy()
    braille_plot([Series(moved, ys[0])], 66, 10)
    moved[1:-1] = np.sort(rng.integers(moved[0], moved[-1], len(moved) - 2))
    assert braille_plot([Series(moved, ys[0])], 66, 10).lines == alone(moved.copy(), ys[0], 66)
    assert axis_labels([0.0, 1.0], 9) == ["0", "1"]
    assert axis_labels([-0.0, 1.0], 9) == ["-0", "1"]
