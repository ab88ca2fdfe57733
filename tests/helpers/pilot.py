"""Driving a Textual app with Pilot: waiting on what it shows, reading its status bar."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from rich.style import Style
from textual.app import App
from textual.pilot import Pilot

from neurotop.tui.screens.widgets import LayerTable, StatusBar


async def until(pilot: Pilot, pred: Callable[[], object], timeout: float = 20.0,
                what: str = "condition") -> None:
    """Let the app run until ``pred()`` holds (it keeps rendering meanwhile, as it would for
    a person; a sleep would freeze it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status_text(app: App) -> str:
    """What the status bar shows now, as plain text."""
    return str(app.query_one(StatusBar).render())


def screen_lines(app: App) -> list[str]:
    """The screen as a person sees it now, one string per terminal line (what the
    compositor last drew, every widget and overlay included)."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


class Cell(NamedTuple):
    """A layers-table cell as a person sees it: its text and the style of its text."""

    text: str
    style: Style


def table_cells(table: LayerTable, layer: str) -> dict[str, Cell]:
    """The row of ``layer`` as drawn, by column (``table.column_names()``); each cell's
    style is that of its first visible character."""
    cells = table.column_cells(table.shown_layers.index(layer) + 1)
    return {name: Cell(strip.text, next((seg.style for seg in strip if seg.text.strip()),
                                        Style()))
            for name, strip in cells.items()}
