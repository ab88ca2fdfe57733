"""Widgets of the live screen. Each one draws from a ``RunStore`` when asked; none parses
messages or talks to sockets."""

from __future__ import annotations

import math

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import DataTable, SelectionList, Static
from textual.widgets.selection_list import Selection

from tui.plotting import line_plot, sparkline
from tui.store import RunStore


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.4f}"


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
        else:
            mode = Text(f" {conn.upper()} ", style="bold white on dark_orange")
        t = Text.assemble(
            (f"{s.run_name or s.run_id or 'neurotop'}", "bold"), "  ",
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


class LossPlot(Static):
    """The loss over steps, drawn with plotext and downsampled to the widget's width."""

    DEFAULT_CSS = "LossPlot { height: 1fr; min-height: 8; }"

    def draw(self, store: RunStore, log_y: bool = False) -> None:
        x, y = store.scalar("loss")
        w, h = self.size.width or 80, self.size.height or 12
        last = f"{y[-1]:.4g}" if len(y) else "-"
        self.update(Text.from_ansi(line_plot(x, y, w, h, f"loss (last {last})", log_y)))


#: Named column sets of the layers table, cycled with ``p`` (``None``: every statistic).
COLUMN_PRESETS: dict[str, tuple[str, ...] | None] = {
    "overview": ("mean", "std", "max_abs", "zero_frac", "dead_frac", "nonfinite", "grad_rms"),
    "activations": ("mean", "std", "rms", "max_abs", "massive_ratio", "kurtosis"),
    "sparsity": ("zero_frac", "near_zero_frac", "dead_frac", "dead_frac_window"),
    "gradients": ("grad_rms", "nonfinite", "max_abs", "rms"),
    "all": None,
}


class LayerTable(DataTable):
    """One row per layer: the chosen statistics (``columns``) and a sparkline of one."""

    DEFAULT_CSS = "LayerTable { height: 2fr; }"
    SPARK_WIDTH = 24

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._layout: tuple | None = None
        self.spark_stat = ""
        self.preset = "overview"
        self.columns_chosen: tuple[str, ...] | None = COLUMN_PRESETS[self.preset]

    def shown(self, stats: list[str]) -> list[str]:
        """The columns to draw: the chosen ones this run has, in the schema's order."""
        chosen = self.columns_chosen
        cols = [s for s in stats if chosen is None or s in chosen]
        return cols or list(stats)

    def use_preset(self, name: str) -> None:
        self.preset, self.columns_chosen = name, COLUMN_PRESETS[name]

    def next_preset(self) -> str:
        names = list(COLUMN_PRESETS)
        i = names.index(self.preset) if self.preset in names else -1
        self.use_preset(names[(i + 1) % len(names)])
        return self.preset

    def choose(self, columns: list[str]) -> None:
        self.preset, self.columns_chosen = "custom", tuple(columns)

    def draw(self, store: RunStore) -> None:
        schema = store.schema
        block = store.latest_block()
        if schema is None or block is None:
            return
        layers, stats = schema["layers"], schema["stats"]
        cols = self.shown(stats)
        self.spark_stat = self.spark_stat if self.spark_stat in stats else stats[-1]
        layout = (tuple(layers), tuple(cols), self.spark_stat)
        if layout != self._layout:
            self.clear(columns=True)
            self.add_column("layer", key="layer")
            for st in cols:
                self.add_column(st, key=st)
            self.add_column(f"trend: {self.spark_stat}", key="spark")
            for name in layers:
                self.add_row(name, *([""] * (len(cols) + 1)), key=name)
            self._layout = layout
        hist = store.layer_history(self.spark_stat, self.SPARK_WIDTH)
        index = {st: j for j, st in enumerate(stats)}
        for i, name in enumerate(layers):
            for st in cols:
                self.update_cell(name, st, fmt(float(block[i, index[st]])))
            self.update_cell(name, "spark", sparkline(hist[i] if len(hist) else np.empty(0),
                                                      self.SPARK_WIDTH))

    def column_names(self) -> list[str]:
        """Headers as drawn (for tests and the help)."""
        return [str(c.label) for c in self.columns.values()]


class ColumnPicker(ModalScreen[list[str]]):
    """Tick the statistics the layers table shows; ``esc`` or ``enter`` on Done applies."""

    BINDINGS = [Binding("escape", "done", "apply")]
    DEFAULT_CSS = """
    ColumnPicker { align: center middle; }
    ColumnPicker > SelectionList { width: 48; height: auto; max-height: 80%;
                                   border: round $accent; background: $panel; }
    """

    def __init__(self, stats: list[str], shown: list[str]) -> None:
        super().__init__()
        self._stats, self._shown = stats, set(shown)

    def compose(self) -> ComposeResult:
        picker = SelectionList[str](*(Selection(s, s, s in self._shown) for s in self._stats))
        picker.border_title = "columns (space: toggle, esc: apply)"
        yield picker

    def action_done(self) -> None:
        chosen = list(self.query_one(SelectionList).selected)
        self.dismiss([s for s in self._stats if s in chosen])
