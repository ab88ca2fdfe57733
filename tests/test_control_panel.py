"""The control panel as an operator uses it, with Pilot against a live training loop."""

from __future__ import annotations

import pytest
from textual.widgets import ContentSwitcher
from textual.widgets.data_table import CellDoesNotExist

from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.targets import resolve
from neurotop.tui.screens.app import NeurotopApp
from neurotop.tui.screens.control_panel import ConfirmScreen, ControlPanel, KnobEditScreen
from tests.helpers.pilot import status_text, until
from tests.helpers.training import steps_logged

pytestmark = pytest.mark.slow  # starts training processes


def panel_text(app: NeurotopApp) -> str:
    log = app.query_one("#command-log")
    return str(log.render())


def knob_cell(app: NeurotopApp, name: str) -> str:
    """What the knob table shows for ``name``; "" before the table has drawn its row (the
    store can hold the listing a frame before the table does)."""
    table = app.query_one("#knob-table")
    try:
        return str(table.get_cell(name, "value"))
    except CellDoesNotExist:
        return ""


async def retype(pilot, text: str) -> None:
    """Replace what the focused input holds, as a person would: select all, type."""
    await pilot.press("home", "shift+end", *list(text))


async def test_panel_steps_edits_with_validation_and_logs_acks(start_run, tmp_path):
    log = tmp_path / "steps.jsonl"
    run = start_run("--step-sleep", "0.01", "--log", str(log), "--model", "dropout")
    client = LiveClient(resolve(run.info.run_id)).start()
    app = NeurotopApp(client)
    try:
        async with app.run_test(size=(160, 45)) as pilot:
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE")
            await pilot.press("c")
            panel = app.query_one(ControlPanel)
            await until(pilot, lambda: panel.has_class("shown") and len(client.store.knobs) >= 7,
                        what="the knob listing")
            await until(pilot, lambda: knob_cell(app, "lr") == "0.0500", what="lr shown")

            await pilot.press("space")
            await until(pilot, lambda: "PAUSED" in status_text(app), what="PAUSED")
            held = client.store.status.paused_at
            assert "paused by" in status_text(app), "the status bar must say why it paused"
            await pilot.press("n")  # one step, then paused again
            await until(pilot, lambda: client.store.status.paused_at == held + 1,
                        what="paused one step later")
            assert max(steps_logged(log)) == held + 1

            await pilot.press("enter")  # the cursor is on the first knob: lr
            await until(pilot, lambda: isinstance(app.screen, KnobEditScreen), what="editor")
            await retype(pilot, "-1")
            await pilot.press("enter")
            await pilot.pause(0.2)
            error = str(app.screen.query_one("#error").render())
            assert "lr must be >= 0.0, got -1" in error
            await retype(pilot, "fast")
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert "'fast' is not a value" in str(app.screen.query_one("#error").render())
            await retype(pilot, "x0.5")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
            await pilot.press("n")  # declined: nothing is sent, the editor stays
            await pilot.pause(0.3)
            assert isinstance(app.screen, KnobEditScreen) and knob_cell(app, "lr") == "0.0500"
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
            await pilot.press("y")
            await until(pilot, lambda: knob_cell(app, "lr") == "0.0250 pinned",
                        what="lr updated, and held against the script")
            assert f"set lr x0.5 @ step {held + 1}: 0.0500 → 0.0250" in panel_text(app)
            assert "@" in panel_text(app).split("set lr x0.5")[0], "the log names the sender"

            await pilot.press("n")
            await until(pilot, lambda: held + 2 in steps_logged(log), what="the next step")
            assert steps_logged(log)[held + 2]["lr"] == [0.025]
            await pilot.press("space")
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE again")

            # On the control screen the panel is the screen: `c` goes back, never to a blank.
            await pilot.press("5")
            await pilot.pause(0.2)
            assert app.screen_name == "control" and panel.has_class("full")
            await pilot.press("c")
            await pilot.pause(0.2)
            switcher = app.query_one(ContentSwitcher)
            assert app.screen_name == "overview" and switcher.current == "overview"
            assert not switcher.has_class("hidden") and not panel.has_class("full")
    finally:
        client.close()
