"""Snapshots where the layout is the point (issue 15, items 5, 7, 8): the layers table
sorted and filtered, the alert feed apart from command events, the gradients screen with
more parameters than lines, the detail screen keeping its axes; at 80x24 and 120x40 over
the recorded run of ``tests/helpers/ux_sessions.py``."""

from __future__ import annotations

import pytest

from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.screens.replay_app import ReplayApp
from tests.helpers.pilot import until
from tests.helpers.ux_sessions import write_ux_run

#: Keys pressed once the recording is loaded.
SCREENS = {"overview": ("1",), "layers-sorted-filtered": ("2", "S", "S", "S", "S", "slash",
                                                         *"block*", "enter"),
           "gradients": ("4",), "detail": ("3",)}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("uxsnap") / "ux.ntop"
    write_ux_run(path)
    return path


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
@pytest.mark.parametrize("screen", list(SCREENS))
def test_ux_snapshot(snap_compare, session, utc, screen, size):
    source = ReplaySource(session).start()
    app = ReplayApp(source)

    async def loaded(pilot) -> None:
        await until(pilot, lambda: app.store.status.step == 360, what="the recording")
        for key in SCREENS[screen]:
            await pilot.press(key)
        await pilot.pause(1.2)  # past the table's once-a-second reorder

    try:
        assert snap_compare(app, terminal_size=size, run_before=loaded)
    finally:
        source.close()
