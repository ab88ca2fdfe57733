"""The UI as a person uses it: Pilot presses keys against a live demo training."""

from __future__ import annotations

import asyncio

import pytest

from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.targets import resolve
from neurotop.tui.screens.app import HelpScreen, NeurotopApp
from neurotop.tui.screens.widgets import LayerTable
from tests.helpers.package import ROOT
from tests.helpers.pilot import status_text, until

pytestmark = pytest.mark.slow  # starts training processes


async def test_live_view_pause_resume_help_quit(start_run):
    run = start_run("--report-every", "5", script=ROOT / "demos" / "mlp.py")
    client = LiveClient(resolve(run.info.run_id)).start()
    app = NeurotopApp(client)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE")
            await pilot.press("2")  # the layers screen (overview is the first)
            table = app.query_one(LayerTable)
            await until(pilot, lambda: table.row_count == len(client.store.schema["layers"]),
                        what="layer rows")
            first = client.store.status.step
            await until(pilot, lambda: client.store.status.step > first + 20, what="steps")
            assert "demo-mlp" in status_text(app)

            await pilot.press("space")
            await until(pilot, lambda: "PAUSED" in status_text(app), what="PAUSED")
            held = client.store.status.step
            assert f"PAUSED @ {held}" in status_text(app)
            await asyncio.sleep(1.2)
            await pilot.pause(0.2)
            assert client.store.status.step == held

            await pilot.press("space")
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE again")
            await until(pilot, lambda: client.store.status.step > held + 10, what="resumed steps")

            stats, before = client.store.schema["stats"], table.spark_stat
            await pilot.press("s")  # the trend column follows the chosen statistic
            await pilot.pause(0.3)
            assert table.spark_stat == stats[(stats.index(before) + 1) % len(stats)]

            await pilot.press("question_mark")
            await pilot.pause(0.2)
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.pause(0.2)
            assert not isinstance(app.screen, HelpScreen)

            await pilot.press("q")
            await pilot.pause(0.2)
        assert app.return_code == 0
        assert run.proc.poll() is None, "quitting the viewer must not stop the run"
    finally:
        client.close()


async def test_read_only_view_cannot_pause(start_run):
    run = start_run("--step-sleep", "0.01")
    client = LiveClient(resolve(run.info.run_id, read_only=True)).start()
    app = NeurotopApp(client, read_only=True)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE")
            assert "read-only" in status_text(app)
            await pilot.press("space")
            await pilot.pause(1.0)
            assert "PAUSED" not in status_text(app)
            assert client.store.status.state == "running"
    finally:
        client.close()
