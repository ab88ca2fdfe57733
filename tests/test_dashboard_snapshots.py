"""Snapshots of every screen at 120x40 and 80x24 (and the main ones at 200x60), over a
deterministic recorded run (``tests/helpers/sessions.py``: seeded data, fixed times, in UTC)."""

from __future__ import annotations

import pytest

from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.screens.replay_app import ReplayApp
from tests.helpers.pilot import until
from tests.helpers.sessions import write_dashboard_run

SCREENS = {"overview": "1", "layers": "2", "detail": "3", "gradients": "4", "control": "5",
           "help": "question_mark"}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "dash.ntop"
    write_dashboard_run(path, 400)
    return path


def snapshot(snap_compare, session, screen: str, size: tuple[int, int],
             theme: str | None = None) -> bool:
    source = ReplaySource(session).start()
    app = ReplayApp(source)

    async def loaded(pilot) -> None:
        if theme:
            app.theme = theme
        await until(pilot, lambda: app.store.status.step == 400, what="the recording")
        await pilot.press(SCREENS[screen])  # drawn at once (snap_compare lets it settle)

    try:
        return snap_compare(app, terminal_size=size, run_before=loaded)
    finally:
        source.close()


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen_snapshot(snap_compare, session, utc, screen, size):
    assert snapshot(snap_compare, session, screen, size)


@pytest.mark.parametrize("screen", ["overview", "layers", "detail"])
def test_wide_snapshot(snap_compare, session, utc, screen):
    """At 200x60 the screens use the room (longer plots, every column, more rows)."""
    assert snapshot(snap_compare, session, screen, (200, 60))


@pytest.mark.parametrize("screen", ["overview", "layers"])
def test_light_theme_snapshot(snap_compare, session, utc, screen):
    """Health colours and plots come from the theme: a light one reads as well."""
    assert snapshot(snap_compare, session, screen, (120, 40), theme="textual-light")
