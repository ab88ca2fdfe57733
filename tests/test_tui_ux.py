"""What a first-time user must be able to read, at 80x24 and 120x40 (issue 15, items 5, 7,
8 and 9): the replay's alert count, the event ``[`` / ``]`` land on, the sorted column and
an active filter, the glossary, layer types and the colours that mean trouble, the alert
feed apart from command events, and every screen usable at 80x24 with "+N more" where
rows are left out. Pilot over a recorded run (``tests/helpers/ux_sessions.py``)."""

from __future__ import annotations

import re
import time

import pytest
from rich.style import Style
from textual.widgets import Static

from neurotop.config import LAYER_STATS, PARAM_STATS
from neurotop.service.detectors import ALERTS as DETECTOR_ALERTS
from neurotop.service.finalize import AMP_SCALARS, BUILTIN_SCALARS, HOST_SCALARS
from neurotop.tui.data.glossary import ALERT_HINTS, STATISTICS
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.screens.app import HelpScreen
from neurotop.tui.screens.dashboard import AlertFeed, DetailPane, Plot
from neurotop.tui.screens.replay_app import ReplayApp, TimelineBar
from neurotop.tui.screens.widgets import LayerTable, abbreviate, level_styles
from tests.helpers.pilot import screen_lines, status_text, table_cells, until
from tests.helpers.sessions import write_run
from tests.helpers.ux_sessions import ALERTS, TIED, UX_PARAMS, UX_STATS, write_ux_run

SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
LAST = 360


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("ux") / "ux.ntop"
    write_ux_run(path, LAST)
    return path


@pytest.fixture
def app(session):
    source = ReplaySource(session).start()
    yield ReplayApp(source)
    source.close()


def alerts_shown(app: ReplayApp) -> int:
    m = re.search(r"▲ (\d+) alerts?", status_text(app))
    assert m, f"no alert count in the status bar: {status_text(app)!r}"
    return int(m.group(1))


def timeline(app: ReplayApp) -> str:
    return str(app.query_one(TimelineBar).render())


async def loaded(pilot, app: ReplayApp) -> None:
    await until(pilot, lambda: f"step {LAST} / {LAST}" in timeline(app), what="the end")


@SIZES
async def test_replay_never_counts_an_alert_twice(app, size):
    """Played through, seeked back and forth: never more than the 18 recorded."""
    async with app.run_test(size=size) as pilot:
        await loaded(pilot, app)
        assert alerts_shown(app) == ALERTS
        lines = screen_lines(app)  # the timeline keeps both its lines at 80x24
        assert any(f"step {LAST} / {LAST}" in ln for ln in lines)
        assert any("●" in ln and "━" in ln for ln in lines)
        seen = []
        await pilot.press("home")
        await until(pilot, lambda: "step 1 /" in timeline(app), what="the start")
        assert alerts_shown(app) == 0
        for _ in range(10):
            await pilot.press("plus")  # max speed: the whole recording in about 5 s
        for _ in range(2):  # played through twice: the second pass starts from the start
            await pilot.press("space")
            await until(pilot, lambda: "PLAY" in timeline(app), what="playing")
            while "▶ PLAY" in timeline(app):
                seen.append(alerts_shown(app))
                await pilot.pause(0.05)
            # (the bar may show the end a redraw before the status bar counts the last)
            await until(pilot, lambda: alerts_shown(app) == ALERTS, what="all 18 counted")
        for key in ("left", "left", "shift+left", "right", "shift+left", "home", "end",
                    "shift+left", "shift+right", "end"):
            await pilot.press(key)
            await pilot.pause(0.2)
            seen.append(alerts_shown(app))
        await until(pilot, lambda: alerts_shown(app) == ALERTS, what="all 18 at the end")
        assert max(seen) <= ALERTS, seen
        assert len(set(seen)) > 3  # it did count up while playing


@SIZES
async def test_brackets_say_which_event_they_landed_on(app, size):
    async with app.run_test(size=size) as pilot:
        await loaded(pilot, app)
        await pilot.press("home", "right_square_bracket")
        await until(pilot, lambda: "▲ dying_layer (warn) @ step 20 (1/" in timeline(app),
                    what="the first event named")
        await pilot.press("right_square_bracket")
        await until(pilot, lambda: "◆ pause ✓ @ step 20 (2/" in timeline(app),
                    what="the next one: the pause after it")
        await pilot.press("end", "right_square_bracket")
        await until(pilot, lambda: "no later event" in timeline(app), what="nothing later")
        await pilot.press("left")  # any other move: the name goes
        await until(pilot, lambda: "event" not in timeline(app), what="the name cleared")


def header(app: ReplayApp) -> str:
    return next(ln for ln in screen_lines(app) if ln.startswith("layer"))


def title(app: ReplayApp) -> str:
    return str(app.query_one("#layers-title", Static).render())


@SIZES
async def test_sort_cycles_only_visible_columns_each_marked(app, size):
    async with app.run_test(size=size) as pilot:
        await loaded(pilot, app)
        await pilot.press("2")
        table = app.query_one(LayerTable)
        await until(pilot, lambda: table.row_count == 9, what="the rows")

        def on_screen() -> list[str]:  # the columns as drawn, once the width has settled
            names = table.column_names()[1:-1]
            shorts = abbreviate(names, LayerTable.NUM_W - 2)
            return names if all(sh in header(app) for sh in shorts) else []
        await until(pilot, on_screen, what="the columns drawn")
        await pilot.pause(0.3)
        visible = on_screen()
        assert "type" in header(app) and "LayerNorm" in " ".join(screen_lines(app))
        cycled = []
        for _ in range(len(visible) + 1):
            await pilot.press("S")
            await pilot.pause(0.2)
            cycled.append(app.view.sort)
            if app.view.sort:
                short = abbreviate(visible, LayerTable.NUM_W - 2)[visible.index(app.view.sort)]
                assert f"{short}▼" in header(app), header(app)  # the mark is never cut
                assert f"sorted by {app.view.sort} ▼" in title(app)
        assert cycled == [*visible, ""], "S goes through the columns on screen, then model order"


async def test_sorted_column_stays_visible_when_the_terminal_narrows(app):
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot, app)
        await pilot.press("2")
        table = app.query_one(LayerTable)
        await until(pilot, lambda: table.row_count == 9, what="the rows")
        while app.view.sort != "grad_rms":  # the overview preset's last column
            await pilot.press("S")
        await pilot.resize_terminal(80, 24)
        await until(pilot, lambda: "+" in title(app) and "columns" in title(app),
                    what="the columns left out, said")
        assert "grad_rms▼" in header(app)
        assert len(header(app)) <= 80
        left_out = int(re.search(r"\+(\d+) columns", title(app)).group(1))
        assert len(table.column_names()) - 2 + left_out == 7  # the overview preset


@SIZES
async def test_an_active_filter_shows_in_the_title(app, size):
    async with app.run_test(size=size) as pilot:
        await loaded(pilot, app)
        await pilot.press("slash", *"block*", "enter")
        table = app.query_one(LayerTable)
        await until(pilot, lambda: table.row_count == 6, what="the filter applied")
        assert not app.query_one("#filter").has_class("shown")  # the box closed on enter
        assert any("layers 6 of 9" in ln and "filter: block*" in ln
                   for ln in screen_lines(app))


async def test_ties_keep_their_order_and_rows_move_at_most_once_a_second(app):
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot, app)
        await pilot.press("2")
        table = app.query_one(LayerTable)
        await until(pilot, lambda: table.row_count == 9, what="the rows")
        while app.view.sort != "dead_frac":
            await pilot.press("S")
        await pilot.press("home", "space")  # 1x: a new report every 50 ms
        await until(pilot, lambda: "▶ PLAY" in timeline(app), what="playing")
        changes, last = [], table.shown_layers
        t_end = time.monotonic() + 4.0
        while time.monotonic() < t_end:
            await pilot.pause(0.05)
            now = table.shown_layers
            assert [n for n in now if n in TIED] == list(TIED), "a tie kept its order"
            if now != last:
                changes.append(time.monotonic())
                last = now
        gaps = [b - a for a, b in zip(changes, changes[1:], strict=False)]
        assert len(changes) >= 2, "the rows do follow the values"
        assert min(gaps) >= 0.9, gaps


async def test_help_glossary_lists_every_statistic_and_alert(app):
    every = [*LAYER_STATS, *PARAM_STATS, *BUILTIN_SCALARS, *HOST_SCALARS, *AMP_SCALARS]
    assert set(every) <= set(STATISTICS), set(every) - set(STATISTICS)
    assert set(DETECTOR_ALERTS) <= set(ALERT_HINTS), set(DETECTOR_ALERTS) - set(ALERT_HINTS)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot, app)
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="the help")
        text = str(app.screen.query_one(Static).render()).splitlines()
        for name in [*every, "lr", *DETECTOR_ALERTS]:
            line = next((ln for ln in text if ln.split()[:1] == [name]), None)
            assert line, f"{name} is not in the glossary"
            assert len(line) <= 76, f"more than one line at 80 columns: {line!r}"
        for name in STATISTICS:
            what, healthy = STATISTICS[name]
            assert f"{what}; {healthy}" in "\n".join(text)  # its healthy range with it
        assert any(ln.split()[:1] == ["acc"] and "your own scalar" in ln for ln in text)


async def test_layer_types_and_only_meaningful_colours(app):
    async with app.run_test(size=(160, 40)) as pilot:
        await loaded(pilot, app)
        await pilot.press("2")
        table = app.query_one(LayerTable)
        await until(pilot, lambda: table.row_count == 9, what="the rows")
        table.choose(list(UX_STATS))
        app.redraw(force=True)
        await until(pilot, lambda: "massive_ratio" in table.column_names(), what="columns")
        _, warn, crit = (Style.parse(c).color for c in level_styles(table))

        relu = table_cells(table, "block0.act")
        assert relu["layer"].text.split() == ["block0.act", "ReLU"]
        assert relu["massive_ratio"].text.strip() == "inf"
        assert relu["massive_ratio"].style.color not in (warn, crit), "inf after a ReLU"
        assert relu["zero_frac"].style.color == relu["layer"].style.color  # no band
        logits = table_cells(table, "logits")
        assert logits["layer"].text.split() == ["logits", "Linear"]
        assert logits["dead_frac"].text.strip() == "1.0000"
        assert logits["dead_frac"].style.color not in (warn, crit), "logits are not dead"


@SIZES
async def test_feed_keeps_alerts_apart_from_commands(app, size):
    """Six pauses and steps after each alert do not push it out of the feed."""
    async with app.run_test(size=size) as pilot:
        await loaded(pilot, app)
        feed = app.query_one(AlertFeed)
        await until(pilot, lambda: "dying_layer" in feed.text, what="the alert in the feed")
        lines = feed.text.splitlines()
        first = next(i for i, ln in enumerate(lines) if "dying_layer" in ln)
        assert f"@{LAST} ▲ dying_layer" in lines[first]  # the newest first
        assert "try: " + ALERT_HINTS["dying_layer"][:10] in feed.text
        assert lines[0].startswith("alerts") and "more" in lines[0]  # the older ones: +N
        cmd = lines.index("commands")
        assert cmd > first and any("paused: step" in ln for ln in lines[cmd:])


async def test_gradients_at_80x24_say_how_many_more(app):
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot, app)
        await pilot.press("4")
        bars = app.query_one("#grad-bars")
        await until(pilot, lambda: ".weight" in bars.text, what="the parameters")
        shown = sum(1 for ln in bars.text.splitlines() if ".weight" in ln)
        more = re.search(r"\+(\d+) more parameters", bars.text)
        assert more, bars.text
        assert shown + int(more.group(1)) == len(UX_PARAMS)
        assert any(ln.startswith(f"+{more.group(1)} more") for ln in screen_lines(app))


@SIZES
async def test_detail_keeps_its_axes(app, size):
    async with app.run_test(size=size) as pilot:
        await loaded(pilot, app)
        await pilot.press("3")
        pane = app.query_one(DetailPane)
        await until(pilot, lambda: app.view.layer == "embed", what="the detail")
        await pilot.pause(0.5)
        plots = [p for p in pane.query(Plot) if p.display]
        assert all(p.size.height >= 5 and "┤" in p.text for p in plots)
        head = str(pane.query_one("#detail-title", Static).render())
        more = re.search(r"\+(\d+) more statistics", head)
        assert len(plots) + (int(more.group(1)) if more else 0) == len(UX_STATS)
        if size == (80, 24):
            assert more, "12 plots do not fit 80x24 with their axes"
            first = plots[0].text.split()[0]
            await pilot.press("s")  # the next statistic leads
            await until(pilot, lambda: plots[0].text.split()[0] != first, what="s pages")


async def test_replay_never_offers_to_edit(app):
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot, app)
        await pilot.press("5")
        await until(pilot, lambda: any("knobs  (read-only)" in ln for ln in screen_lines(app)),
                    what="the control screen")
        assert not any("enter: edit" in ln for ln in screen_lines(app))


async def test_layers_at_80x24_say_which_rows_show(tmp_path):
    path = tmp_path / "wide.ntop"
    write_run(path, 20, layers=40)
    source = ReplaySource(path).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.store.status.step == 20, what="the recording")
            await pilot.press("2")
            table = app.query_one(LayerTable)
            await until(pilot, lambda: table.row_count == 40, what="the rows")
            await until(pilot, lambda: "rows 1–" in title(app), what="the rows shown")
            shown = int(re.search(r"rows 1–(\d+), \+(\d+) more", title(app)).group(1))
            assert f"+{40 - shown} more" in title(app)
            assert any(ln.startswith(f"net.{shown - 1} ") for ln in screen_lines(app))
            await pilot.press("pagedown", "pagedown", "pagedown")  # (end: the recording's)

            def at_the_end() -> bool:  # the last rows, and the count of the others, agree
                m = re.search(r"rows (\d+)–40, \+(\d+) more", title(app))
                return m is not None and int(m.group(1)) - 1 == int(m.group(2))
            await until(pilot, at_the_end, what="the rows after scrolling")
    finally:
        source.close()


async def test_sort_from_another_screen_sorts_at_once(app):
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot, app)
        await pilot.press("S")  # from the overview
        await until(pilot, lambda: app.screen_name == "layers", what="the layers screen")
        assert app.view.sort == "mean" and "mean▼" in header(app)
