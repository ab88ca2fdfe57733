"""Snapshots of every screen at 120x40 and 80x24, over a deterministic recorded run
(``tests/sessions.py``: seeded data, fixed times, shown in UTC)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import until
from tests.sessions import write_dashboard_run
from tui.replay import ReplaySource
from tui.replay_app import ReplayApp

SCREENS = {"overview": "1", "layers": "2", "detail": "3", "gradients": "4", "control": "5",
           "help": "question_mark"}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "dash.ntop"
    write_dashboard_run(path, 400)
    return path


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen_snapshot(snap_compare, session, utc, screen, size):
    source = ReplaySource(session).start()
    app = ReplayApp(source)

    async def loaded(pilot) -> None:
        await until(pilot, lambda: app.store.status.step == 400, what="the recording")
        await pilot.press(SCREENS[screen])
        await pilot.pause(0.5)

    try:
        assert snap_compare(app, terminal_size=size, run_before=loaded)
    finally:
        source.close()


@pytest.mark.parametrize("screen", ["overview", "layers"])
def test_light_theme_snapshot(snap_compare, session, utc, screen):
    """Health colours and plots come from the theme: a light one reads as well."""
    source = ReplaySource(session).start()
    app = ReplayApp(source)

    async def loaded(pilot) -> None:
        app.theme = "textual-light"
        await until(pilot, lambda: app.store.status.step == 400, what="the recording")
        await pilot.press(SCREENS[screen])
        await pilot.pause(0.5)

    try:
        assert snap_compare(app, terminal_size=(120, 40), run_before=loaded)
    finally:
        source.close()
