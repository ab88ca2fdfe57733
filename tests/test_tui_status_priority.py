"""The status bar and the footer as a person reads them, against real runs: stop ends the
demo (STOPPING, then ENDED); at an auto-pause, with the control panel open, state, step,
alert count and connection stay on screen at 80 and 120 columns, and so do ``? help`` and
``q quit``."""

from __future__ import annotations

import pytest

from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.data.targets import resolve
from neurotop.tui.screens.app import NeurotopApp
from neurotop.tui.screens.control_panel import ConfirmScreen, ControlPanel
from neurotop.tui.screens.replay_app import ReplayApp
from neurotop.tui.screens.widgets import KeyBar, StatusBar
from tests.helpers.package import ROOT
from tests.helpers.pilot import status_text, until
from tests.helpers.sessions import write_dashboard_run

SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])


def footer_text(app: NeurotopApp) -> str:
    return str(app.query_one(KeyBar).render())


@pytest.mark.slow  # starts a demo training
@SIZES
async def test_stop_ends_the_demo_and_the_bar_says_stopping_then_ended(start_run, size):
    # A paced demo: the step under way when stop lands takes 0.4 s to finish, long
    # enough for the bar to show it (a real loop's last step, its checkpoint, ...).
    run = start_run("--report-every", "1", "--step-sleep", "0.4",
                    script=ROOT / "demos" / "mlp.py")
    client = LiveClient(resolve(run.info.run_id)).start()
    app = NeurotopApp(client)
    seen: list[str] = []  # every line the bar drew, in order

    def bar(word: str) -> bool:
        return any(word in t for t in seen)

    try:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE")
            status = app.query_one(StatusBar)
            draw = status.draw

            def drawn(*args: object) -> None:  # the real draw, and what it drew
                draw(*args)
                seen.append(status_text(app))
            status.draw = drawn
            await until(pilot, lambda: client.store.status.step > 3, what="steps")
            assert "? help" in footer_text(app) and "q quit" in footer_text(app)
            await pilot.press("X")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
            await pilot.press("y")
            await until(pilot, lambda: bar("ENDED"), timeout=60, what="ENDED")
            run.proc.wait(timeout=30)
        assert run.proc.returncode == 0, "the demo leaves its loop and closes cleanly"
        stopping = [i for i, t in enumerate(seen) if "STOPPING" in t]
        assert stopping, f"STOPPING never shown between the ack and the end: {seen[-3:]}"
        assert all("ENDED" not in t for t in seen[: stopping[0]])
        assert all("LIVE" not in t for t in seen[stopping[0]:]), "no LIVE once stopping"
    finally:
        client.close()


@pytest.mark.slow  # starts a training process
@SIZES
async def test_auto_pause_keeps_the_critical_status_visible(start_run, size):
    """Non-finite activations auto-pause the run; the reason is long, the panel is open:
    the essentials never leave the bar, the footer keeps help and quit."""
    run = start_run("--step-sleep", "0.01", "--nan-at", "40")
    client = LiveClient(resolve(run.info.run_id)).start()
    app = NeurotopApp(client)
    try:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: "PAUSED" in status_text(app), timeout=60,
                        what="the auto-pause")
            await pilot.press("c")
            await until(pilot, lambda: app.query_one(ControlPanel).has_class("shown"),
                        what="the panel")
            await until(pilot, lambda: client.store.status.alerts, what="the alert counted")
            await pilot.pause(0.5)
            s = client.store.status
            text = status_text(app)
            n = sum(s.alerts.values())
            for part in (f"PAUSED @ {s.paused_at}", f"step {s.step}",
                         f"▲ {n} alert", "conn: live", "paused steps/s"
                         if size[0] >= 120 else ""):
                assert part in text, f"{part!r} missing from the bar: {text!r}"
            assert len(text) <= size[0] - 2, "the bar fits its line"
            assert s.pause_reason.startswith("auto-pause")
            assert "auto-pause" in text  # the reason, cut to the room left if need be
            bar = app.query_one("#status")
            assert bar.region.width == size[0], "the open panel covers no part of the bar"
            footer = footer_text(app)
            assert "? help" in footer and "q quit" in footer, footer
            assert len(footer) <= size[0]
    finally:
        client.close()


async def test_every_width_from_80_keeps_the_essentials(tmp_path):
    """Narrowing the terminal drops decorations (rank, read-only, the rate, the name)
    before anything a person acts on; nothing is ever cut mid-word."""
    path = tmp_path / "dash.ntop"
    write_dashboard_run(path, 200)
    source = ReplaySource(path).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(200, 40)) as pilot:
            await until(pilot, lambda: app.store.status.step == 200, what="the recording")
            for width in range(80, 201, 15):
                await pilot.resize_terminal(width, 40)
                await until(pilot, lambda w=width: app.query_one(StatusBar).region.width == w,
                            what=f"width {width}")
                await pilot.pause(0.3)
                text, footer = status_text(app), footer_text(app)
                for part in ("REPLAY", "step 200", "▲ 1 alert", "conn: replay"):
                    assert part in text, f"{part!r} missing at {width}: {text!r}"
                assert len(text) <= width - 2 and len(footer) <= width
                assert "? help" in footer and "q quit" in footer, f"at {width}: {footer!r}"
                if width >= 120:
                    assert "dashboard" in text and "20.0 steps/s" in text, text
    finally:
        source.close()
