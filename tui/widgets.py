"""Widgets of the live screen. Each one draws from a ``RunStore`` when asked; none parses
messages or talks to sockets."""

from __future__ import annotations

import math

import numpy as np
from rich.text import Text
from textual.widget import Widget
from textual.widgets import DataTable, Static

from tui.health import has_band, levels
from tui.plotting import sparkline
from tui.store import RunStore
from tui.view import View, matches


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.4f}"


def level_styles(widget: Widget) -> tuple[str, str, str]:
    """Healthy / warning / critical colours of the current theme (light or dark)."""
    theme = widget.app.current_theme
    return (theme.success or "green", theme.warning or "yellow", theme.error or "red")


class StatusBar(Static):
    """Run, step, steps/s, LIVE / PAUSED with the step, connection health, losses."""

    DEFAULT_CSS = "StatusBar { height: 1; background: $boost; padding: 0 1; }"

    def draw(self, store: RunStore, pending: str = "") -> None:
        s = store.status
        conn = store.connection()
        if s.state == "paused":
            mode = Text(f" PAUSED @ {s.paused_at if s.paused_at is not None else s.step} ",
                        style="bold black on yellow")
        elif conn == "ended":
            mode = Text(" ENDED ", style="bold white on red")
        elif conn == "live":
            mode = Text(" LIVE ", style="bold black on green")
        elif conn == "replay":
            mode = Text(" REPLAY ", style="bold black on cyan")
        else:
            mode = Text(f" {conn.upper()} ", style="bold white on dark_orange")
        t = Text.assemble(
            (f"{s.run_name or s.run_id or 'neurotop'}", "bold"), f"  rank {s.rank}  ",
            f"step {s.step}", "  ", f"{s.steps_per_s:6.1f} steps/s", "  ", mode,
        )
        if s.link:
            t.append(f"  {s.link}", style="bold red")
        if s.state == "paused" and s.pause_reason:
            auto = s.pause_reason.startswith("auto-pause")
            t.append(f"  {s.pause_reason}", style="bold red" if auto else "yellow")
        if pending:
            t.append(f"  {pending}", style="italic")
        lost = s.missed + s.remote_dropped
        t.append(f"  conn: {conn}")
        if lost:
            t.append(f"  dropped: {lost}", style="yellow")
        if s.rejected:
            t.append(f"  refused cmds: {s.rejected}", style="red")
        if s.rec_dropped:
            t.append(f"  rec-dropped: {s.rec_dropped}", style="yellow")
        if s.bad_messages:
            t.append(f"  bad msgs: {s.bad_messages}", style="red")
        if s.history:
            t.append(f"  {s.history}", style="italic")
        if not s.control:
            t.append("  read-only", style="dim")
        self.update(t)


class LayerTable(DataTable):
    """One row per layer (filtered, sorted as the ``View`` says): the latest statistics,
    coloured by health where a band is known, and a sparkline of the chosen one.
    Clicking a column header sorts by it; enter opens the layer's detail."""

    DEFAULT_CSS = "LayerTable { height: 1fr; }"
    SPARK_WIDTH = 24

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._columns: tuple | None = None
        self._rows: tuple = ()
        self.spark_stat = ""

    def draw(self, store: RunStore, view: View) -> None:
        schema = store.schema
        block = store.latest_block()
        if schema is None or block is None:
            return
        layers, stats = schema["layers"], schema["stats"]
        self.spark_stat = view.stat if view.stat in stats else stats[-1]
        columns = (tuple(stats), self.spark_stat, view.sort, view.descending)
        if columns != self._columns:
            self.clear(columns=True)
            self.add_column("layer", key="layer")
            for st in stats:
                arrow = (" ▼" if view.descending else " ▲") if st == view.sort else ""
                self.add_column(st + arrow, key=st)
            self.add_column(f"trend: {self.spark_stat}", key="spark")
            self._columns, self._rows = columns, ()
        shown = self._order(layers, stats, block, view)
        hist = store.layer_history(self.spark_stat, self.SPARK_WIDTH)
        styles = level_styles(self)
        cols = []
        for j, st in enumerate(stats):
            text = [fmt(float(v)) for v in block[:, j]]
            if has_band(st):
                big = block[:, stats.index("max_abs")] if "max_abs" in stats else None
                lv = levels(st, block[:, j], big)
                text = [Text(t, style=styles[k]) for t, k in zip(text, lv.tolist(), strict=True)]
            cols.append(text)
        key = self.cursor_row if self._rows else 0
        current = self._rows[key] if self._rows and key < len(self._rows) else None
        rows = [(layers[i], *(c[i] for c in cols),
                 sparkline(hist[i] if len(hist) else np.empty(0), self.SPARK_WIDTH))
                for i in shown]
        if tuple(layers[i] for i in shown) != self._rows:
            self.clear()
            self._rows = tuple(layers[i] for i in shown)
            for row in rows:
                self.add_row(*row, key=row[0])
            if current in self._rows:
                self.move_cursor(row=self._rows.index(current), animate=False)
        else:
            keys = ["layer", *stats, "spark"]
            for row in rows:
                for k, v in zip(keys[1:], row[1:], strict=True):
                    self.update_cell(row[0], k, v)

    @staticmethod
    def _order(layers: list[str], stats: list[str], block: np.ndarray, view: View) -> list[int]:
        shown = [i for i, n in enumerate(layers) if matches(n, view.filter)]
        if view.sort in stats:
            v = block[shown, stats.index(view.sort)].astype(np.float64)
            v = np.where(np.isnan(v), -np.inf if view.descending else np.inf, v)
            idx = np.argsort(-v if view.descending else v, kind="stable")
            shown = [shown[k] for k in idx]
        elif view.sort == "layer" and view.descending:
            shown = shown[::-1]
        return shown

    @property
    def shown_layers(self) -> tuple[str, ...]:
        return self._rows

    def selected_layer(self) -> str:
        return self._rows[self.cursor_row] if 0 <= self.cursor_row < len(self._rows) else ""
