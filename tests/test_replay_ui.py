"""`neurotop replay` as a person uses it: Pilot drives the timeline over a recording."""

from __future__ import annotations

import pytest

from neurotop.tui.data.client import CommandError
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.screens.replay_app import GotoStep, ReplayApp, TimelineBar
from neurotop.tui.screens.widgets import LayerTable
from tests.helpers.pilot import status_text, until
from tests.helpers.sessions import write_run


def timeline_text(app: ReplayApp) -> str:
    return str(app.query_one(TimelineBar).render())


async def test_timeline_play_seek_scrub_jump_and_no_control(tmp_path):
    path = tmp_path / "s.ntop"
    write_run(path, 400, events_every=100)
    source = ReplaySource(path).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: "step 400 / 400" in timeline_text(app), what="the end")
            assert "REPLAY" in status_text(app) and "read-only" in status_text(app)
            assert "◆ 8 commands" in timeline_text(app) and "▲ 4 alerts" in timeline_text(app)
            assert "rec-dropped: 8" in status_text(app)  # from the recorded heartbeats
            await pilot.press("2")  # the layers screen (overview is the first)
            await until(pilot, lambda: app.query_one(LayerTable).row_count == 3, what="rows")

            def at(step: int) -> bool:
                return (f"step {step:,} / 400" in timeline_text(app)
                        and f"step {step} " in status_text(app)
                        and len(app.store.steps()) == step)

            await pilot.press("home")
            await until(pilot, lambda: at(1), what="step 1")
            await pilot.press("right_square_bracket")  # the first command: a pause ack
            await until(pilot, lambda: at(100), what="the first command")
            assert "PAUSED @ 100" in status_text(app)  # the run, as it was then
            await pilot.press("left")  # 1% of the recording back: before the pause
            await until(pilot, lambda: at(96), what="scrubbed back")
            assert "PAUSED" not in status_text(app)
            await pilot.press("g")
            assert isinstance(app.screen, GotoStep)
            await pilot.press(*"250", "enter")
            await until(pilot, lambda: at(250), what="go to step 250")
            await pilot.press("left")  # 1% of the recording back
            await until(pilot, lambda: at(246), what="scrubbed back again")
            await pilot.press("left_square_bracket")
            await until(pilot, lambda: at(200), what="the previous event")

            width = app.query_one(TimelineBar).size.width - 2
            await pilot.click(TimelineBar, offset=(1 + round(0.75 * (width - 1)), 1))
            await until(pilot, lambda: abs(len(app.store.steps()) - 300) <= 3,
                        what="a click at three quarters of the bar")

            for _ in range(10):
                await pilot.press("plus")
            await until(pilot, lambda: "max" in timeline_text(app), what="max speed")
            await pilot.press("space")
            await until(pilot, lambda: "▶ PLAY" in timeline_text(app), what="playing")
            await until(pilot, lambda: at(400) and "⏸ PAUSE" in timeline_text(app),
                        what="played to the end")
            await pilot.press("minus")
            await until(pilot, lambda: "1000x" in timeline_text(app), what="slower")

            with pytest.raises(CommandError, match="a recording cannot be controlled"):
                app.client.command("pause").result(1)
            await pilot.press("q")
        assert app.return_code == 0
    finally:
        source.close()
