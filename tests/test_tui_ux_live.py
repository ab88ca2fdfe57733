"""The control panel beside the overview at 80x24 and 120x40, against a live training
loop: the overview stays readable, and pauses and single steps land in the feed's
command section, not among the alerts."""

from __future__ import annotations

import pytest

from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.targets import resolve
from neurotop.tui.screens.app import NeurotopApp
from neurotop.tui.screens.control_panel import ControlPanel
from neurotop.tui.screens.dashboard import AlertFeed, HeatStrip, OverviewPane, Plot
from tests.helpers.pilot import screen_lines, status_text, until

pytestmark = pytest.mark.slow  # starts a training process


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
async def test_panel_beside_a_readable_overview(start_run, size):
    run = start_run("--step-sleep", "0.02")
    client = LiveClient(resolve(run.info.run_id)).start()
    app = NeurotopApp(client)
    try:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE")
            await pilot.press("c")
            panel = app.query_one(ControlPanel)
            await until(pilot, lambda: panel.has_class("shown") and client.store.knobs,
                        what="the panel with its knobs")
            await until(pilot, lambda: any("enter: edit" in ln for ln in screen_lines(app)),
                        what="a viewer that may edit is told how")
            pane = app.query_one(OverviewPane)
            assert pane.size.width >= 48 and pane.size.width + panel.size.width <= size[0]
            plot = app.query_one("#ov-plot-0", Plot)
            await until(pilot, lambda: plot.text.startswith("loss "), what="the loss plot")
            assert plot.size.width >= 22 and "┤" in plot.text  # a title, an axis
            heat = app.query_one(HeatStrip)
            assert heat.text.startswith("heat: dead_frac") and heat.size.width >= 20
            for key in ("space", "n", "n", "n"):
                await pilot.press(key)
                await pilot.pause(0.4)
            feed = app.query_one(AlertFeed)
            await until(pilot, lambda: "\ncommands\n" in feed.text, what="commands apart")
            head, _, commands = feed.text.partition("\ncommands\n")
            assert head.startswith("alerts") and "paused" not in head
            assert "paused:" in commands
            bar = status_text(app)
            assert "PAUSED" in bar and "conn: live" in bar
            await pilot.press("space")
            await until(pilot, lambda: "LIVE" in status_text(app), what="resumed")
    finally:
        client.close()
