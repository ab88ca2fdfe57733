"""Widgets of the live screen. Each one draws from the app's ``Frame`` when asked; none
reads the store, parses messages or talks to sockets."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.app import ComposeResult, RenderResult
from textual.binding import Binding
from textual.geometry import Offset, Region, Size
from textual.message import Message
from textual.screen import ModalScreen
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import SelectionList, Static
from textual.widgets.selection_list import Selection

from neurotop.protocol.layerkinds import activation_mask
from neurotop.tui.data.frame import Frame, Wants
from neurotop.tui.data.health import has_band, idle, levels
from neurotop.tui.data.view import View, matches
from neurotop.tui.screens.plotting import BLOCKS, Sparklines, fmt_axis, is_fraction
from neurotop.tui.screens.system_panel import status_part


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.4f}"


def fmt_cell(v: float, width: int) -> str:
    """``fmt`` in at most ``width`` characters, with fewer digits rather than cut: a
    value is never shown truncated mid-number."""
    text = fmt(v)
    if len(text) <= width:
        return text
    for spec in (".3f", ".2f", ".1f", ".0f", ".2e", ".1e", ".0e"):
        text = format(v, spec)
        if len(text) <= width:
            return text
    return "#" * width  # wider than any number (a 3-character cell): say so, do not lie


#: Column headers of statistics too long for a cell, abbreviated on purpose.
ABBREVIATIONS = {"near_zero_frac": "≈0_frac", "dead_frac_window": "dead_win",
                 "massive_ratio": "max/med"}


def abbreviate(names: Sequence[str], width: int) -> list[str]:
    """Headers for ``names`` in at most ``width`` cells, all different: a name that fits
    as it is, else its deliberate abbreviation, else its start with ``…`` (numbered where
    two starts agree)."""
    out = [n if len(n) <= width else ABBREVIATIONS.get(n, n[: width - 1] + "…")
           for n in names]
    out = [o if len(o) <= width else o[: width - 1] + "…" for o in out]
    for o in list(out):
        same = [j for j, p in enumerate(out) if p == o]
        if len(same) > 1:
            for k, j in enumerate(same, 1):
                out[j] = names[j][: width - 1 - len(str(k))] + "…" + str(k)
    return out


def level_styles(widget: Widget) -> tuple[str, str, str]:
    """Healthy / warning / critical colours of the current theme (light or dark)."""
    theme = widget.app.current_theme
    return (theme.success or "green", theme.warning or "yellow", theme.error or "red")


def fit(parts: Sequence[tuple[int, Text]], width: int, sep: str = "  ") -> list[int]:
    """Which parts of one line show, each part with a priority (0 first), in the order
    given: the most important that fit ``width``. Priority 0 always shows; a part that
    does not fit is left out whole (never cut mid-number), and a lower one after it may
    still fit."""
    keep = [i for i, (k, _) in enumerate(parts) if k == 0]
    room = width - sum(parts[i][1].cell_len for i in keep) - len(sep) * max(len(keep) - 1, 0)
    for i in sorted((i for i, (k, _) in enumerate(parts) if k), key=lambda i: parts[i][0]):
        need = parts[i][1].cell_len + len(sep)
        if need <= room:
            keep.append(i)
            room -= need
    return sorted(keep)


def fit_parts(parts: Sequence[tuple[int, Text]], width: int, sep: str = "  ") -> Text:
    """The line ``fit`` chooses, joined by ``sep``."""
    return Text(sep).join(parts[i][1] for i in fit(parts, width, sep))


def update_line(widget: Line, text: Text) -> None:
    """Show ``text`` in a ``Line`` (a status bar, a title) only when it changed, and
    without a layout pass: the line's size never changes, and a layout pass at every
    frame relaid the whole screen."""
    key = (text.plain, tuple(text.spans), str(text.style))
    if widget.line_key != key:
        widget.line_key, widget.line = key, text
        widget.refresh()


class Line(Static):
    """A one-line ``Static`` drawn from its Rich text straight to one strip (the widget's
    style under the text's spans, cut or padded to the width): Textual's content path
    (wrap, format, restyle each span) cost the status bar, redrawn at every report, ~0.6
    ms a frame. ``update_line`` sets ``line``; ``render()`` gives it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.line: Text | None = None
        self.line_key: tuple[object, ...] = ()
        self._drawn: tuple[object, ...] = ()
        self._strip = Strip([])
        #: The widget's style, looked up once per style change: the lookup walks the DOM
        #: (40 us), and Textual forgets it at each refresh, which a status bar has per frame.
        self._base: Style | None = None

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._base = None

    def render(self) -> RenderResult:
        return self.line if self.line is not None else super().render()

    def render_line(self, y: int) -> Strip:
        if self.line is None:
            return super().render_line(y)
        if self._base is None:
            self._base = self.rich_style
        width, base = self.size.width, self._base
        key = (self.line, width, base)
        if key != self._drawn:
            text = self.line
            if text.cell_len > width:  # cut at a word, as a wrapping Static's first line
                text = text.wrap(self.app.console, width)[0]
            segments = Segment.apply_style(text.render(self.app.console), base)
            self._strip = Strip(segments).crop_extend(0, width, base)
            self._drawn = key
        return self._strip if y == 0 else Strip.blank(width, base)


def line_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted line numbers as ``[a, b)`` runs of neighbours (one region to repaint each)."""
    out: list[tuple[int, int]] = []
    for y in rows:
        if out and out[-1][1] == y:
            out[-1] = (out[-1][0], y + 1)
        else:
            out.append((y, y + 1))
    return out


def _cut(text: str, room: int) -> str:
    """Free text (a pause reason, a run name) cut to ``room`` cells with an ellipsis."""
    return text if len(text) <= room else text[: max(room - 1, 0)] + "…"


class StatusBar(Line):
    """Run state, step, alerts and connection always; then the pause reason, the run's
    name, throughput, connection details and GPU (or CPU) use as the width allows
    (``fit_parts``)."""

    DEFAULT_CSS = "StatusBar { height: 1; background: $boost; padding: 0 1; }"
    #: Priorities: 0 always shows; higher numbers leave first when the line is too narrow.
    MUST, TROUBLE, INFO, DECOR = 0, 1, 2, 3

    def draw(self, frame: Frame, pending: str = "", stopping: bool = False) -> None:
        """``stopping``: this viewer's stop was acknowledged (the run's heartbeats and
        events say so too, for a stop from anywhere)."""
        width = self.size.width or self.app.size.width - 2  # inside the padding
        update_line(self, fit_parts(self.parts(frame, pending, width, stopping), width))

    def parts(self, frame: Frame, pending: str, width: int,
              stopping: bool = False) -> list[tuple[int, Text]]:
        s = frame.status
        conn = frame.connection
        if conn == "ended":
            mode = Text(" ENDED ", style="bold white on red")
        elif s.stopping or stopping:
            mode = Text(" STOPPING ", style="bold white on magenta")
        elif s.state == "paused":
            mode = Text(f" PAUSED @ {s.paused_at if s.paused_at is not None else s.step} ",
                        style="bold black on yellow")
        elif conn == "live":
            mode = Text(" LIVE ", style="bold black on green")
        elif conn == "replay":
            mode = Text(" REPLAY ", style="bold black on cyan")
        elif conn == "waiting" and s.starting:
            mode = Text(" STARTING ", style="bold white on dark_orange")
        else:
            mode = Text(f" {conn.upper()} ", style="bold white on dark_orange")
        name = s.run_name or s.run_id or "neurotop"
        rate = "paused" if s.state == "paused" else (
            "-" if conn in ("ended", "waiting") else f"{s.steps_per_s:.1f}")
        crit = s.alerts.get("critical", 0)
        n_alerts = sum(s.alerts.values())
        mode_parts: list[tuple[int, Text]] = [
            (self.MUST, mode), (self.MUST, Text(f"step {s.step}", style="bold")),
            (self.MUST, Text(f"▲ {n_alerts} alert{'s' if n_alerts != 1 else ''}",
                             style="bold red" if crit else ("yellow" if n_alerts else "dim"))),
            (self.MUST, Text(f"conn: {conn}", style="" if conn in ("live", "replay")
                             else "bold")),
        ]
        name = _cut(name, 24)
        rate_text = f"{rate} steps/s"
        # The reason gets what the essentials, the name and the rate leave (24 at least).
        room = width - fit_parts(mode_parts, width).cell_len - len(name) - len(rate_text) - 6
        reason = ""
        if s.state == "paused" and s.pause_reason:
            reason = _cut(s.pause_reason, max(room - len(pending) - 2, 24))
        auto = s.pause_reason.startswith("auto-pause")
        lost = s.missed + s.remote_dropped
        parts = [
            (self.INFO, Text(name, style="bold")),
            # A job: its size and the rank shown (``4 ranks, 1 node · rank 2``, or ``all
            # ranks`` in the all-ranks view); one process: its rank, dim.
            (self.INFO, Text(f"{s.job} · {'all ranks' if s.all_ranks else f'rank {s.rank}'}",
                             style="bold")) if s.job else (self.DECOR, Text(f"rank {s.rank}",
                                                                           style="dim")),
            mode_parts[0], mode_parts[1],
            (self.INFO, Text(rate_text)),
            (self.TROUBLE, Text(s.link, style="bold red")),
            (self.MUST, Text(_cut(s.starting, max(room + len(name), 24))
                             if conn == "waiting" else "", style="italic")),
            (self.TROUBLE, Text(reason, style="bold red" if auto else "yellow")),
            (self.TROUBLE, Text(pending, style="italic")),
            mode_parts[2], mode_parts[3],
            (self.TROUBLE, Text(f"dropped: {lost}" if lost else "", style="yellow")),
            (self.TROUBLE, Text(f"refused cmds: {s.rejected}" if s.rejected else "",
                                style="red")),
            (self.TROUBLE, Text(f"bad msgs: {s.bad_messages}" if s.bad_messages else "",
                                style="red")),
            (self.INFO, Text(f"rec-dropped: {s.rec_dropped}" if s.rec_dropped else "",
                             style="yellow")),
            (self.INFO, Text(s.backfill, style="italic")),
            (self.DECOR, Text("" if s.control else "read-only", style="dim")),
            # The first to leave a narrow line, before the rank and read-only (those say
            # what this view is); the overview's system panel has the same and more.
            (self.DECOR, status_part(s) or Text()),
        ]
        return [p for p in parts if p[1].plain]


class KeyBar(Static):
    """The footer: the keys of the screen, the most needed first when the width is short
    (``? help`` and ``q quit`` always, then play/pause, the screens, the rest), shown in
    the bindings' order. A click on a key presses it."""

    DEFAULT_CSS = """
    KeyBar { dock: bottom; height: 1; background: $footer-background;
             color: $footer-description-foreground; }
    """
    #: Keys by importance (lower first); keys not named here come last.
    PRIORITY = {"question_mark": 0, "q": 0, "space": 1, "1": 2, "2": 2, "3": 2, "4": 2,
                "5": 2, "c": 3}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._spans: list[tuple[int, int, str]] = []  # (from x, to x, key) for clicks

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, lambda _screen: self.draw())
        self.draw()

    def on_resize(self) -> None:
        self.draw()

    def draw(self) -> None:
        seen: set[str] = set()
        keys: list[tuple[str, str, str]] = []  # (key, shown as, description)
        for key, active in self.screen.active_bindings.items():
            b = active.binding
            if b.show and b.description and active.enabled and b.action not in seen:
                seen.add(b.action)
                keys.append((key, b.key_display or self.app.get_key_display(b), b.description))
        key_style = "bold " + (self.app.current_theme.accent or "")
        parts = [(self.PRIORITY.get(k, 4), Text.assemble((f" {shown} ", key_style), d))
                 for k, shown, d in keys]
        kept = fit(parts, self.size.width or self.app.size.width, sep=" ")
        self._spans, x = [], 0
        for i in kept:
            n = parts[i][1].cell_len
            self._spans.append((x, x + n, keys[i][0]))
            x += n + 1
        self.update(Text(" ").join(parts[i][1] for i in kept))

    def on_click(self, event: events.Click) -> None:
        for a, b, key in self._spans:
            if a <= event.x < b:
                self.app.simulate_key(key)
                return


#: Named column sets of the layers table, cycled with ``p`` (``None``: every statistic).
COLUMN_PRESETS: dict[str, tuple[str, ...] | None] = {
    "overview": ("mean", "std", "max_abs", "zero_frac", "dead_frac", "nonfinite", "grad_rms"),
    "activations": ("mean", "std", "rms", "max_abs", "massive_ratio", "kurtosis"),
    "sparsity": ("zero_frac", "near_zero_frac", "dead_frac", "dead_frac_window"),
    "gradients": ("grad_rms", "nonfinite", "max_abs", "rms"),
    "all": None,
}


def call_label(name: str, calls: Sequence[int], i: int) -> str:
    """A layer's name as the table shows it: ``"name ×2"`` when one forward calls the
    module at two places (its row pools both call sites)."""
    n = calls[i] if i < len(calls) else 1
    return f"{name} ×{n}" if isinstance(n, int) and n >= 2 else name

class LayerTable(ScrollView, can_focus=True):
    """One row per layer (filtered, sorted as the ``View`` says): the latest statistics,
    coloured by health where a band is known, and a sparkline of the chosen one. A layer
    not called in the latest report is drawn dim with ``idle`` instead of NaNs.

    Only the rows on screen are formatted, so 200 layers cost what 40 do. Keys: up/down,
    page up/down, home/end move the cursor, enter opens the layer's detail; clicking a
    column header sorts by it, clicking a row selects it."""

    DEFAULT_CSS = """
    LayerTable { height: 1fr; }
    LayerTable > .layer-table--header { text-style: bold; background: $boost; }
    LayerTable > .layer-table--cursor { background: $accent 40%; }
    """
    COMPONENT_CLASSES = {"layer-table--header", "layer-table--cursor"}
    BINDINGS = [Binding("up", "move(-1)", show=False), Binding("down", "move(1)", show=False),
                Binding("pageup", "page(-1)", show=False),
                Binding("pagedown", "page(1)", show=False),
                Binding("home", "move(-100000)", show=False),
                Binding("end", "move(100000)", show=False),
                Binding("enter", "choose", show=False)]
    SPARK_WIDTH = 24  # at least, when every column fits
    SPARK_MIN = 10  # at least, when columns are left out for want of room
    SPARK_MAX = 160
    NUM_W = 11  # a value (10 characters at most) and a space
    TYPE_W = 12  # the layer's class, cut with "…" past this
    #: Rows keep their places between reorders for this long: a live table that
    #: reshuffled at every report could not be read.
    REORDER_S = 1.0

    class Chosen(Message):
        """Enter (or a click on the selected row) on a layer."""

        def __init__(self, layer: str) -> None:
            super().__init__()
            self.layer = layer

    class SortBy(Message):
        def __init__(self, column: str) -> None:
            super().__init__()
            self.column = column

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spark_stat = ""
        self.cursor_row = 0
        self._rows: tuple[str, ...] = ()  # layer names in the shown order
        self._labels: tuple[str, ...] = ()  # as shown: "name ×2" for a module called twice
        self._index: list[int] = []  # their indices in the schema
        self._stats: tuple[str, ...] = ()
        self._hist = np.empty((0, 0), np.float32)
        self._levels: dict[int, list[int]] = {}  # health level per row, by column
        self._values: list[list[float]] = []  # the latest block (lists: indexing NumPy per
        # cell cost more)
        self._idle = np.zeros(0, bool)
        self._header = ""
        self._name_w = 12
        self._spark_w = self.SPARK_WIDTH
        self._spark_scale: tuple[float, float] | None = None  # None: each row its range
        self._style_cache: tuple[Style, Style, Style] | None = None
        self._level_styles: list[Style] = []
        self._level_on: dict[Style, list[Style]] = {}  # the level styles on each base
        self._sparks: Sparklines | None = None  # the trend column, scaled once per draw
        self._row_strips: dict[tuple, Strip] = {}  # lines formatted in this draw
        self._on_screen: dict[int, Strip] = {}  # each line as drawn
        #: (scroll offset, width) while a pass paints or compares many lines.
        self._geometry: tuple[Offset, int] | None = None
        self.preset = "overview"
        self.columns_chosen: tuple[str, ...] | None = COLUMN_PRESETS[self.preset]
        self._cols: list[int] = []  # indices of the shown statistics in the schema
        self._types: tuple[str, ...] = ()  # each shown row's layer type, as drawn
        self._type_w = 0
        self._left_out = 0  # chosen columns the width leaves out
        self._order_key: tuple = ()
        self._order_at = 0.0
        self._order_rows: list[int] = []
        self.title = ""  # the line above the table: rows, sort, filter, what is left out
        self._title_lines: list[Line] | None = None  # where the title shows
        self._title_parts: list[str] = []

    def shown(self, stats: Sequence[str], sort: str = "") -> list[str]:
        """The columns to draw: the chosen ones this run has, in the schema's order, and
        the sorted one (``sort``) even if not chosen: what the rows are ordered by shows."""
        chosen = self.columns_chosen
        cols = [s for s in stats if chosen is None or s in chosen or s == sort]
        return cols or list(stats)

    def fitting(self, cols: list[str], sort: str, width: int) -> list[str]:
        """The columns that fit ``width`` beside the names and a short trend; the sorted
        one always among them (in place of the last that fits)."""
        room = width - self._name_w - self._type_w - 2 - self.SPARK_MIN
        n = max(room // self.NUM_W, 1)
        if len(cols) <= n:
            return cols
        keep = cols[:n]
        if sort in cols and sort not in keep:
            keep = [c for c in cols if c in keep[: n - 1] or c == sort]
        return keep

    def use_preset(self, name: str) -> None:
        self.preset, self.columns_chosen = name, COLUMN_PRESETS[name]

    def next_preset(self) -> str:
        names = list(COLUMN_PRESETS)
        i = names.index(self.preset) if self.preset in names else -1
        self.use_preset(names[(i + 1) % len(names)])
        return self.preset

    def choose(self, columns: list[str]) -> None:
        self.preset, self.columns_chosen = "custom", tuple(columns)

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def shown_layers(self) -> tuple[str, ...]:
        return self._rows

    def selected_layer(self) -> str:
        return self._rows[self.cursor_row] if 0 <= self.cursor_row < len(self._rows) else ""

    def on_resize(self) -> None:
        self.app.invalidate()  # the trend's width follows the table's

    def wants(self, view: View) -> Wants:
        """The trend as long as the table could draw it (it draws the last columns)."""
        width = max(self.SPARK_WIDTH, min(self.size.width or 0, self.SPARK_MAX))
        return Wants(trend=(view.stat, width))

    def draw(self, frame: Frame, view: View) -> None:
        schema, block = frame.schema, frame.latest
        if schema is None or block is None:
            return
        layers, stats = schema.layers, schema.stats
        self.spark_stat = view.stat if view.stat in stats else stats[-1]
        current = self.selected_layer()
        self._index = self._order(layers, stats, block, view)
        self._rows = tuple(layers[i] for i in self._index)
        if current in self._rows:
            self.cursor_row = self._rows.index(current)
        self.cursor_row = min(self.cursor_row, max(len(self._rows) - 1, 0))
        self._stats = stats
        self._values = block.tolist()
        self._labels = tuple(call_label(layers[i], schema.calls, i) for i in self._index)
        self._name_w = min(max((len(n) for n in self._labels), default=5) + 1, 40)
        kinds = schema.layer_types if len(schema.layer_types) == len(layers) else ()
        self._types = tuple(_cut(str(kinds[i]), self.TYPE_W - 1) for i in self._index) \
            if kinds else ()
        self._type_w = min(max((len(t) for t in self._types), default=3) + 1,
                           self.TYPE_W) if kinds else 0
        wanted = self.shown(stats, view.sort)
        fits = self.fitting(wanted, view.sort, self.size.width or 200)
        self._left_out = len(wanted) - len(fits)
        self._cols = [stats.index(c) for c in fits]
        # The trend takes the room the columns leave (a wide terminal shows a longer one).
        used = self._name_w + self._type_w + self.NUM_W * len(self._cols) + 2
        spark_min = self.SPARK_MIN if self._left_out else self.SPARK_WIDTH
        self._spark_w = max(spark_min, min((self.size.width or 0) - used - 1, self.SPARK_MAX))
        self._hist = frame.trend
        big = block[:, stats.index("max_abs")] if "max_abs" in stats else None
        acts = np.array(activation_mask(schema.layer_types, len(layers),
                                        activations=schema.activations), bool)
        self._levels = {j: levels(st, block[:, j], big, acts).tolist()
                        for j, st in enumerate(stats) if has_band(st)}
        self._idle = idle(stats, block)
        arrow = "▼" if view.descending else "▲"
        heads = [f"{'layer' + (arrow if view.sort == 'layer' else ''):<{self._name_w}}"
                 f"{'type' if self._type_w else '':<{self._type_w}}"]
        shown = [stats[j] for j in self._cols]
        # Headers keep a cell for the mark: a 9-character name and its arrow both show.
        for st, head in zip(shown, abbreviate(shown, self.NUM_W - 2), strict=True):
            heads.append(f"{head + (arrow if st == view.sort else ''):>{self.NUM_W}}")
        self._header = "".join(heads) + f"  trend: {self.spark_stat}"
        self._spark_scale = (0.0, 1.0) if is_fraction(self.spark_stat) else None
        width = len("".join(heads)) + 2 + self._spark_w
        size = Size(width, len(self._rows) + 1)
        if size != self.virtual_size:
            self.virtual_size = size
        self._sparks = Sparklines(self._hist, self._spark_w, self._spark_scale) \
            if len(self._hist) else None
        self._row_strips = {}
        self._title_parts = self._title(len(layers), view)
        self._show_title()
        self._repaint_changed()

    def _repaint_changed(self) -> None:
        """Repaint only the lines on screen whose text or style changed since they were
        drawn: each is formatted now (``render_line`` then reuses it) and compared with
        what it showed. A report changes most rows, a heartbeat none; the compositor pays
        per line repainted."""
        changed = []
        with self._painting():
            for y in range(self.size.height):
                before = self._on_screen.get(y)
                if self.render_line(y) != before:
                    changed.append(y)
        width = self.size.width
        for a, b in line_runs(changed):
            self.refresh(Region(0, a, width, b - a))

    def _title(self, total: int, view: View) -> list[str]:
        """Sort and filter in words, and what the table leaves out."""
        n = len(self._rows)
        parts = [f"layers {n} of {total}" if n != total else f"layers {total}"]
        if view.sort:
            parts.append(f"sorted by {view.sort} {'▼' if view.descending else '▲'}")
        if view.filter:
            parts.append(f"filter: {view.filter}")
        if self._left_out:
            parts.append(f"+{self._left_out} columns")
        return parts

    def _show_title(self) -> None:
        """The title, with the rows on screen when some are not (``+N more``), into the
        pane's title line where the table has one (the layers screen)."""
        parts = list(self._title_parts)
        n, visible = len(self._rows), self.visible_rows
        if n > visible:
            top = int(self.scroll_offset.y)
            parts.insert(1, f"rows {top + 1}–{min(top + visible, n)}, +{n - visible} more")
        self.title = "  ·  ".join(parts)
        if len(self.title) > (self.size.width or 80) - 2:  # the same words, closer
            self.title = " · ".join(parts)
        if self._title_lines is None:  # looked up once: a query walks the pane
            self._title_lines = list(self.parent.query("#layers-title")) if self.parent else []
        for line in self._title_lines:
            update_line(line, Text(self.title))

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if self._title_parts:
            self._show_title()

    def _order(self, layers: Sequence[str], stats: Sequence[str], block: np.ndarray,
               view: View) -> list[int]:
        """The rows' order: the filter's layers, sorted by the view's column. Ties keep
        their order (a stable sort of the order shown), and the rows move at most once a
        ``REORDER_S`` unless the sort, the filter or the layers change."""
        key = (view.sort, view.descending, view.filter, tuple(layers))
        now = time.monotonic()
        same = key == self._order_key
        if same and now - self._order_at < self.REORDER_S:
            return self._order_rows
        shown = self._order_rows if same else \
            [i for i, n in enumerate(layers) if matches(n, view.filter)]
        if view.sort in stats:
            v = block[shown, stats.index(view.sort)].astype(np.float64)
            v = np.where(np.isnan(v), -np.inf if view.descending else np.inf, v)
            idx = np.argsort(-v if view.descending else v, kind="stable")
            shown = [shown[k] for k in idx]
        elif view.sort == "layer" and view.descending and not same:
            shown = shown[::-1]
        self._order_key, self._order_at, self._order_rows = key, now, list(shown)
        return self._order_rows

    def _row_segments(self, r: int, base: Style) -> tuple[list[Segment], int]:
        """One row as segments, one per cell (no ``Text`` layout per cell: rows are drawn
        every frame), and its width in cells: the name's, then ``NUM_W`` a value (ASCII)
        and a trend of one-cell bars."""
        i = self._index[r]
        name = f"{self._labels[r][-(self._name_w - 1):]:<{self._name_w}}"
        if self._type_w:
            name += f"{self._types[r]:<{self._type_w}}"
        spark = self._sparks.line(i) if self._sparks is not None else ""
        used = cell_len(name) + self.NUM_W * len(self._cols) + 2 + len(spark)
        if self._idle[i]:  # not called in this report: nothing to judge
            dim = base + Style(dim=True)
            cells = "".join(f"{'idle' if k == 0 else '-':>{self.NUM_W}}"
                            for k in range(len(self._cols)))
            return [Segment(name, dim), Segment(cells, dim), Segment("  " + spark, dim)], used
        level_style = self._level_on.get(base)
        if level_style is None:
            level_style = self._level_on[base] = [base + st for st in self._level_styles]
        # Neighbouring cells of one style are one segment: the compositor and Textual's
        # filters pay per segment, and most cells share the base or the healthy style.
        texts, styles = [name], [base]
        width = self.NUM_W
        values, levels_of = self._values[i], self._levels
        for j in self._cols:
            cell = f"{fmt_cell(values[j], width - 1):>{width}}"
            lv = levels_of.get(j)
            k = -1 if lv is None else lv[i]  # -1: no band (not an activation)
            style = level_style[k] if k >= 0 else base
            if style is styles[-1]:
                texts[-1] += cell
            else:
                texts.append(cell)
                styles.append(style)
        if styles[-1] is base:
            texts[-1] += "  " + spark
        else:
            texts.append("  " + spark)
            styles.append(base)
        return [Segment(t, st) for t, st in zip(texts, styles, strict=True)], used

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._style_cache = None

    def _styles(self) -> tuple[Style, Style, Style]:
        """Base, header and cursor styles, looked up once per style change (the lookup
        walks the DOM; doing it per line cost more than drawing the rows, and once per
        draw a tenth of a millisecond)."""
        if self._style_cache is None:
            base = self.rich_style
            self._style_cache = (
                base, base + self.get_component_rich_style("layer-table--header"),
                base + self.get_component_rich_style("layer-table--cursor"))
            self._level_styles = [Style.parse(c) for c in level_styles(self)]
            self._level_on = {}
        return self._style_cache

    @contextmanager
    def _painting(self) -> Iterator[None]:
        """The scroll offset and width looked up once for the lines a pass paints or
        compares, not once per line (each a walk to the screen, more than a formatted line
        costs to look up)."""
        self._geometry = (self.scroll_offset, self.size.width)
        try:
            yield
        finally:
            self._geometry = None

    def render_lines(self, crop: Region) -> list[Strip]:
        with self._painting():
            return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        (sx, sy), width = self._geometry or (self.scroll_offset, self.size.width)
        base, header, cursor = self._styles()
        # A line is formatted once per draw: a repaint (the cursor moving, a scroll)
        # reuses it.
        r = y - 1 + sy
        key = (-1 if y == 0 else r, r == self.cursor_row, sx, width)
        strip = self._row_strips.get(key)
        if strip is None:
            if y == 0:
                segments = [Segment(self._header, header),
                            Segment(self.trend_legend(), header + Style(bold=False))]
                used = sum(cell_len(t) for t, _, _ in segments)
            elif r >= len(self._rows):
                segments, used = [], 0
            else:
                segments, used = self._row_segments(r, cursor if key[1] else base)
            # Padded to the width here: one strip per line, not one more to extend it.
            room = sx + width - used
            if room > 0:
                segments.append(Segment(" " * room, base))
            strip = Strip(segments, sx + width if room >= 0 else None)
            if sx or room < 0:
                strip = strip.crop(sx, sx + width)
            self._row_strips[key] = strip
        self._on_screen[y] = strip
        return strip

    def trend_legend(self) -> str:
        """What the trend's bars mean, with numbers: 0..1 for a fraction; else each row
        has its own range, and the selected row's is given (``row fc1: ▁0.1…█0.3``)."""
        lo_bar, hi_bar = BLOCKS[0], BLOCKS[-1]
        if self._spark_scale is not None:
            return f"  {lo_bar}0…{hi_bar}1"
        if not self._rows or not len(self._hist):
            return ""
        v = np.asarray(self._hist[self._index[self.cursor_row]][-self._spark_w:], np.float64)
        v = v[np.isfinite(v)]
        if not v.size:
            return ""
        return (f"  row {self._labels[self.cursor_row][-16:]}:"
                f" {lo_bar}{fmt_axis(float(v.min()))}…{hi_bar}{fmt_axis(float(v.max()))}")

    @property
    def visible_rows(self) -> int:
        """Rows on screen: the height less the header and the horizontal scrollbar the
        virtual size will need (known now, before the layout that shows it)."""
        height, width = self.size.height or 2, self.size.width or 80
        vbar = self.styles.scrollbar_size_vertical if len(self._rows) + 1 > height else 0
        hbar = self.styles.scrollbar_size_horizontal \
            if self.virtual_size.width > width - vbar else 0
        return max(height - 1 - hbar, 1)

    def _scroll_to_cursor(self) -> None:
        visible = self.visible_rows
        sy = self.scroll_offset.y
        if self.cursor_row < sy:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= sy + visible:
            self.scroll_to(y=self.cursor_row - visible + 1, animate=False)

    def action_move(self, delta: int) -> None:
        self.cursor_row = min(max(self.cursor_row + delta, 0), max(len(self._rows) - 1, 0))
        self._scroll_to_cursor()
        self.refresh()

    def move_cursor(self, row: int) -> None:
        self.action_move(row - self.cursor_row)

    def action_page(self, direction: int) -> None:
        self.action_move(direction * max(self.size.height - 2, 1))

    def action_choose(self) -> None:
        if self._rows:
            self.post_message(self.Chosen(self.selected_layer()))

    def on_click(self, event: events.Click) -> None:
        y = event.y
        if y == 0:
            x = event.x + self.scroll_offset.x - self._name_w - self._type_w
            k = x // self.NUM_W
            col = "layer" if x < 0 else (self._stats[self._cols[k]]
                                         if k < len(self._cols) else "")
            if col:
                self.post_message(self.SortBy(col))
            return
        r = y - 1 + self.scroll_offset.y
        if 0 <= r < len(self._rows):
            if r == self.cursor_row:
                self.action_choose()
            self.cursor_row = r
            self.refresh()

    def sortable(self) -> list[str]:
        """What ``S`` cycles through: the model's order, then each column on screen."""
        return ["", *(self._stats[j] for j in self._cols)]

    def column_cells(self, y: int) -> dict[str, Strip]:
        """Line ``y`` as drawn, cut into its columns (``column_names``' keys): what each
        column shows there, for tests and screen readers."""
        line, sx = self.render_line(y), int(self.scroll_offset.x)
        spans = [self._name_w + self._type_w] + [self.NUM_W] * len(self._cols)
        cuts = [max(c - sx, 0) for c in (0, *itertools.accumulate(spans))]
        names = self.column_names()
        cells = {name: line.crop(a, b)
                 for name, a, b in zip(names[:-1], cuts[:-1], cuts[1:], strict=True)}
        cells[names[-1]] = line.crop(cuts[-1], line.cell_length)
        return cells

    def column_names(self) -> list[str]:
        """Headers as drawn, without the sort mark (for tests and the help)."""
        return ["layer", *(self._stats[j] for j in self._cols), f"trend: {self.spark_stat}"]


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
