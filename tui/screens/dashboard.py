"""The dashboard's screens (panes of one ``ContentSwitcher``): Overview, Layers, Layer
detail, Gradients. Each pane says what series it draws (``wants``), and draws from the
``Frame`` the app's single timer builds, only while it is the visible one; none reads the
store or parses messages.

View options (log scale, smoothing, window, the chosen statistic, sort, filter, the
detail layer) live in one ``View`` the app owns, so every pane reads the same choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Input

from neurotop.protocol.layerkinds import activation_mask
from neurotop.tui.data.compare import DELTA
from neurotop.tui.data.frame import Frame, Schema, Wants
from neurotop.tui.data.glossary import hint
from neurotop.tui.data.health import NEVER_NAN, UPDATE_RATIO_GUIDE, has_band, levels
from neurotop.tui.data.view import View
from neurotop.tui.screens.plotting import (
    LABEL_W,
    Lines,
    Series,
    braille_plot,
    heat_runs,
    heat_strip,
    hist_labels,
    shade_legend,
    smooth,
    stretch_reduce,
    stretch_scale,
    value_scale,
    window,
)
from neurotop.tui.screens.system_panel import SystemPanel
from neurotop.tui.screens.widgets import (
    LayerTable,
    Line,
    fmt,
    level_styles,
    line_runs,
    update_line,
)


class Panel(Widget):
    """A drawn part of a screen: text rendered to strips once per draw and served line by
    line (much cheaper than a ``Static`` re-laying out styled text every frame). Only the
    lines whose runs changed since the last draw are rebuilt and repainted: one more
    point often moves a plot's title and axis and no dot, and Textual's compositor then
    redraws two lines instead of the whole plot. A new size means the next tick redraws:
    every plot fits its text to its size."""

    DEFAULT_CSS = "Panel { height: 1fr; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._strips: list[Strip] = []
        self._base = Style()
        self._keys: list[tuple] | None = None  # each line's runs as drawn (None: redraw all)
        self._style_now: Style | None = None
        #: What a caller last drew from, when it can tell (``Plot.draw_series``); any
        #: other ``show`` forgets it.
        self._drawn_key: tuple | None = None
        self._plain: Text | Lines | None = None  # where ``text`` comes from, made on demand
        self._text = ""
        self._paint_width: int | None = None  # the width while ``render_lines`` paints

    @property
    def text(self) -> str:
        """What it shows, as plain text (for tests and screen readers)."""
        if self._plain is not None:
            self._text, self._plain = self._plain.plain, None
        return self._text

    def show(self, text: Text | Lines | str) -> None:
        self._drawn_key = None
        text = Text(text) if isinstance(text, str) else text
        if isinstance(text, Lines):
            keys = [tuple(line) for line in text.lines]
        else:
            keys = [tuple(line) for line in Segment.split_lines(
                text.render(self.app.console))]
        base = self._rich()
        old = self._keys
        if old is not None and base == self._base and keys == old:
            return  # one more point often changes no dot: nothing to repaint
        self._plain = text
        if old is None or base != self._base:
            self._strips = [self._strip(k, text) for k in keys]
            self._base, self._keys = base, keys
            self.refresh()
            return
        strips = self._strips
        changed = [y for y in range(max(len(keys), len(old)))
                   if y >= len(keys) or y >= len(old) or keys[y] != old[y]]
        self._strips = [strips[y] if y < len(old) and keys[y] == old[y]
                        else self._strip(keys[y], text) for y in range(len(keys))]
        self._keys = keys
        width = self.size.width
        for a, b in line_runs(changed):  # neighbouring lines in one region
            self.refresh(Region(0, a, width, b - a))

    def show_keyed(self, key: tuple, make: Callable[[], Text | Lines | str]) -> None:
        """``show(make())`` unless what it is made from, ``key``, is what the panel shows
        already (with its size and style): a redraw for something else makes nothing."""
        key = (key, self.size, self._rich())
        if key == self._drawn_key and self._keys is not None:
            return
        self.show(make())
        self._drawn_key = key

    #: Each (text, style) run's segment: a plot's rows repeat the same few runs (a dot
    #: or two in one style), and a segment costs three times the lookup. Cleared when big.
    _segments: dict[tuple[str, str], Segment] = {}

    @classmethod
    def _strip(cls, key: tuple, text: Text | Lines) -> Strip:
        if isinstance(text, Lines):
            made = cls._segments
            if len(made) > 8192:
                made.clear()
            segments = []
            for run in key:
                segment = made.get(run)
                if segment is None:
                    segment = made[run] = Segment(run[0], Style.parse(run[1]))
                segments.append(segment)
            return Strip(segments)
        return Strip(key)

    def _rich(self) -> Style:
        """The widget's base style, looked up once per style change (the lookup walks the
        DOM: once per draw of 20 panels cost a millisecond)."""
        if self._style_now is None:
            self._style_now = self.rich_style
        return self._style_now

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._style_now = None

    def render_lines(self, crop: Region) -> list[Strip]:
        # The width once for the lines painted, not once per line (a walk to the screen).
        self._paint_width = self.size.width
        try:
            return super().render_lines(crop)
        finally:
            self._paint_width = None

    def render_line(self, y: int) -> Strip:
        strip = self._strips[y] if y < len(self._strips) else Strip.blank(0)
        width = self.size.width if self._paint_width is None else self._paint_width
        return strip.crop_extend(0, width, self._base)

    def on_resize(self) -> None:
        self._keys = None
        self.app.invalidate()


class Plot(Panel):
    """One scalar over steps, with the view's log scale, smoothing and window."""

    DEFAULT_CSS = "Plot { height: 1fr; min-height: 5; }"

    def draw_series(self, x: np.ndarray, y: np.ndarray, title: str, view: View,
                    guide: float | None = None) -> None:
        accent = self.app.current_theme.primary
        # What the plot shows depends on these alone: a redraw for something else (the
        # status bar, another pane) draws nothing here. The values are compared by a
        # digest of their bytes (a few microseconds; another layer can end alike).
        key = (title, view.log_y, view.smooth, view.last, guide, accent, len(x),
               int(x[0]) if len(x) else None, int(x[-1]) if len(x) else None,
               hash(y.tobytes()))
        self.show_keyed(key, lambda: self._series(x, y, title, view, guide, accent))

    def _series(self, x: np.ndarray, y: np.ndarray, title: str, view: View,
                guide: float | None, accent: str | None) -> Lines:
        w, h = self.size.width or 40, self.size.height or 8
        x, y = window(x, view.last, y)
        series = [Series(x, y, "" if not view.smooth else "dim")]
        if view.smooth and len(y) > 8:
            series.append(Series(x, smooth(y, max(len(y) // 50, 4)), f"bold {accent}"))
        last = fmt(float(y[-1])) if len(y) else "-"
        return braille_plot(series, w, h, mode_title(title, last, view, w - 1), view.log_y,
                            guide)

    def draw_several(self, named: list[tuple[str, np.ndarray, np.ndarray]], title: str,
                     view: View, marks: Sequence[tuple[int, int]] = (),
                     whole_names: bool = False) -> None:
        """Several series of one quantity (each optimizer's learning rate, or each run of a
        comparison), each its own colour, named with its latest value in the title
        (``lr  G 2e-4 · D 1e-4``); the view's window and scale, and no smoothing (each line
        is a schedule). ``marks``: ``(step, series)`` ticks ``▲`` on the x axis in that
        series' colour (a run's knob changes)."""
        w, h = self.size.width or 40, self.size.height or 8
        t = self.app.current_theme
        colours = [c for c in (t.primary, t.warning, t.success, t.secondary, t.error) if c]
        series, legend = [], []
        for k, (name, x, y) in enumerate(named):
            x, y = window(x, view.last, y)
            series.append(Series(x, y, f"bold {colours[k % len(colours)]}"))
            short = name.split(".", 1)[1] if "." in name and not whole_names else name
            legend.append(f"{short} {fmt(float(y[-1])) if len(y) else '-'}")
        head = mode_title(title, " · ".join(legend), view, w - 1)
        out = braille_plot(series, w, h, head, view.log_y)
        if marks:
            out.lines[-1] = axis_marks(out.lines[-1], series, marks, w)
        runs, rest = [], head[: max(w, 1)]  # each legend entry in its line's colour
        for entry, s in zip(legend, series, strict=True):
            before, found, rest = rest.partition(entry)
            if not found:
                rest = before
                break
            runs += [(before, "bold"), (entry, s.style)]
        out.lines[0] = [r for r in runs + [(rest, "bold")] if r[0]]
        self.show(out)


def axis_marks(axis: list[tuple[str, str]], series: list[Series],
               marks: Sequence[tuple[int, int]], width: int) -> list[tuple[str, str]]:
    """The x axis line of ``braille_plot`` with a ``▲`` at each ``(step, series)`` mark
    within the plotted steps, in that series' style."""
    xs = [s.x for s in series if len(s.x)]
    if not xs:
        return axis
    x0, x1 = min(float(x[0]) for x in xs), max(float(x[-1]) for x in xs)
    plot_w = max(width - LABEL_W, 4)
    cells = list("".join(text for text, _ in axis).ljust(LABEL_W + plot_w))
    styles = ["dim"] * len(cells)
    for step, k in marks:
        if x0 <= step <= x1:
            i = LABEL_W + round((step - x0) / max(x1 - x0, 1) * (plot_w - 1))
            cells[i], styles[i] = "▲", series[k].style
    out: list[tuple[str, str]] = []
    for c, st in zip(cells, styles, strict=True):
        if out and out[-1][1] == st:
            out[-1] = (out[-1][0] + c, st)
        else:
            out.append((c, st))
    return out


def mode_title(name: str, value: str, view: View, width: int) -> str:
    """A plot's title: its name (cut with ``…`` if need be, the value never), the latest
    value, and the view's modes (``l``, ``m``, ``a``) tagged on the right, in full when
    there is room (``log · smoothed · last 1,000 steps``), else short."""
    if len(name) + 2 + len(value) > width:
        name = name[: max(width - len(value) - 3, 0)] + "…"
    title = f"{name}  {value}"
    short = (f"{'log' if view.log_y else 'lin'} {'smooth' if view.smooth else 'raw'}"
             f" {'last ' + format(view.last, ',') if view.last else 'all'}")
    for tag in (view.describe(), short):
        if len(title) + 2 + len(tag) <= width:
            return title + tag.rjust(width - len(title))
    return title


class AlertFeed(Panel):
    """Alerts, newest first, each with what to try; below them, apart, the commands that
    stopped or refused the run (pauses, single steps, refusals, auto-pauses): those never
    push an alert out."""

    DEFAULT_CSS = "AlertFeed { width: 1fr; height: 1fr; border-top: solid $accent; }"
    COMMANDS = frozenset({"paused", "refused"})
    EVENTS = 500  # the last events it looks through

    @classmethod
    def is_command(cls, e: dict) -> bool:
        return e.get("event") in cls.COMMANDS or (
            e.get("event") == "ack" and e.get("sender") == "auto-pause")

    def draw(self, frame: Frame) -> None:
        evs = frame.status.events[-self.EVENTS:]
        alerts = [e for e in evs if e.get("event") == "alert"]
        commands = [e for e in evs if self.is_command(e)]
        if frame.runs:  # a comparison: every run's knob changes, by step
            knobs = [{"event": "set", "step": step, "cmd": f"{r.name} {what}"}
                     for r in frame.runs for step, what in r.knobs]
            commands = sorted(commands + knobs, key=lambda e: e.get("step") or 0)
        styles = level_styles(self)
        width, height = max(self.size.width or 40, 10), max(self.size.height or 6, 2)
        console = self.app.console
        # The commands keep at most a third of the lines (one at least, when there are any
        # and the feed has 5 lines); the alerts keep the rest.
        cmd_lines = min(len(commands), max(height // 3 - 1, 1)) \
            if commands and height >= 5 else 0
        room = height - 1 - (cmd_lines + 1 if cmd_lines else 0)
        out: list[Text] = []
        shown = 0
        for e in reversed(alerts):  # wrapped: an alert's message says what and where
            bad = e.get("level") == "critical"
            what = list(Text.assemble((f"@{e.get('step', '?')} ", "dim"), (
                f"▲ {e.get('alert', '?')}: {e.get('message') or e.get('layer', '')}",
                styles[2] if bad else styles[1])).wrap(console, width))
            tip = list(Text(f"  try: {hint(str(e.get('alert', '')))}", "dim")
                       .wrap(console, width))
            if shown and len(out) + len(what) + len(tip) > room:
                break
            if len(what) + len(tip) > room:  # the newest shows: its message cut, not its tip
                what = what[: max(room - len(tip), 1)]
                what[-1].truncate(width - 1)
                what[-1].append("…")
            out += [*what, *tip]
            shown += 1
        head = Text("alerts", style="bold")
        if len(alerts) > shown:
            head.append(f"  +{len(alerts) - shown} more", style="dim")
        if not alerts:
            out.append(Text("  none", style=styles[0]))
        lines = [head, *out[:room]]
        if cmd_lines:
            lines.append(Text("commands", style="bold"))
            for e in reversed(commands[-cmd_lines:]):
                kind = e.get("event")
                what = e.get("reason") or e.get("error") or e.get("cmd") or ""
                lines.append(Text.assemble((f"@{e.get('step', '?')} ", "dim"), (
                    f"{kind}: {what}", styles[2] if kind == "refused" else styles[1]),
                    no_wrap=True, overflow="ellipsis"))
                lines[-1].truncate(width, overflow="ellipsis")
        self.show(Text("\n").join(lines[:height]))


class HeatStrip(Panel):
    """Layers x time of the chosen statistic: one line per layer, or per group of layers
    (their worst value) when there are more layers than lines, so one dying layer among
    hundreds still shows."""

    DEFAULT_CSS = "HeatStrip { width: 2fr; height: 1fr; border-top: solid $accent; }"
    NAME_W = 14

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._acts: tuple[object, np.ndarray] = (None, np.zeros(0, bool))  # (schema, mask)

    def activations(self, schema: Schema) -> np.ndarray:
        """Which layers are activations: per schema, not per frame."""
        if self._acts[0] is not schema:
            self._acts = (schema, np.array(activation_mask(
                schema.layer_types, len(schema.layers), activations=schema.activations), bool))
        return self._acts[1]

    def draw(self, frame: Frame, view: View) -> None:
        x, rows = window(frame.heat[0], view.last, frame.heat[1])
        stat = view.stat or "-"
        head = Lines("heat: ", "bold")
        head.append(stat, "bold")
        if not rows.size or frame.schema is None:
            self.show(head)
            return
        layers = frame.schema.layers
        lines = max((self.size.height or 8) - 2, 1)  # the title and the time axis
        # Names take at most a third of a narrow strip (the control panel beside it).
        name_w = min(self.NAME_W, max((self.size.width or 60) // 3, 6))
        width = max((self.size.width or 60) - name_w - 1, 4)
        # Time into columns first (each its stretch's worst), on the rows as stored.
        if rows.shape[0] > width:
            starts = (np.arange(width) * rows.shape[0]) // width
            data = stretch_reduce(np.fmax, rows, starts).T
            # Fractions on 0..1, anything else on its range over the window: the same
            # value is the same shade at every width.
            scale = stretch_scale(view.stat, rows, data)
        else:
            data = rows.T
            scale = value_scale(view.stat, data)
        used = len("heat: ") + len(stat)
        for part in (f"  {shade_legend(*scale)}", "  × non-finite"):
            if used + len(part) <= (self.size.width or 60):
                head.append(part)
                used += len(part)
        names = layers
        # Levels per layer, before grouping: a logits layer has no dead-fraction band.
        acts = self.activations(frame.schema)
        lvl = levels(view.stat, data, activations=acts[:, None]) if has_band(view.stat) \
            else None
        if len(layers) > lines:  # groups of layers, each showing its worst member
            starts = (np.arange(lines) * len(layers)) // lines
            if lvl is not None:  # NaN is ignored, as by fmax (an all-NaN group shows ×)
                lvl = np.maximum.reduceat(np.where(np.isnan(data), -1, lvl), starts, axis=0)
            with np.errstate(invalid="ignore"):
                data = np.fmax.reduceat(data, starts, axis=0)
            ends = [*starts[1:], len(layers)]
            names = [layers[a] if b - a == 1 else f"{layers[a]}+{b - a - 1}"
                     for a, b in zip(starts, ends, strict=True)]
        strip = heat_runs(data, width, lvl, ("", *level_styles(self)[1:]),
                          nan_is_idle=view.stat in NEVER_NAN, scale=scale)
        out = head
        for name, runs in zip(names, strip, strict=True):
            out.lines.append([(name[-(name_w - 1):].ljust(name_w), "dim"), *runs])
        cols = min(width, data.shape[1])
        left, right = f"step {int(x[0]):,}", f"{int(x[-1]):,}"
        out.lines.append([(" " * name_w + left + right.rjust(max(cols - len(left), 1)), "dim")])
        self.show(out)


class OverviewPane(Vertical):
    """Loss, learning rate, global grad norm and throughput; alerts; the heat strip."""

    DEFAULT_CSS = """
    OverviewPane > Grid { grid-size: 2 2; height: 3fr; }
    OverviewPane > Horizontal { height: 2fr; }
    """
    PLOTS = (("loss", ("loss",)), ("lr", ("lr",)), ("grad norm", ("grad_norm",)),
             ("throughput", ("steps_per_s", "samples_per_s")))
    #: The curvature probe's sharpness (Adam: preconditioned) and the optimizer's stability
    #: limit (2/lr for GD, 38/lr for Adam): drawn in the lr plot's place once the run has
    #: probe results (the limit is the lr, read as a curvature). E7 in the README.
    EOS = ("precond_sharpness", "lambda_max", "eos_threshold")

    def compose(self) -> ComposeResult:
        with Grid():
            for i in range(len(self.PLOTS)):
                yield Plot(id=f"ov-plot-{i}")
        with Horizontal():
            yield HeatStrip(id="heat")
            yield AlertFeed(id="alerts")
        yield SystemPanel(id="system")  # GPUs and host, where the screen has room

    def wants(self, view: View) -> Wants:
        return Wants(scalars=(*(names for _, names in self.PLOTS), *((n,) for n in self.EOS)),
                     envelope=not view.smooth,
                     heat=view.stat, events=AlertFeed.EVENTS)

    def draw(self, frame: Frame, view: View) -> None:
        none = (np.empty(0), np.empty(0))
        marks = [(step, k) for k, run in enumerate(frame.runs) for step, _ in run.knobs]
        for i, (title, names) in enumerate(self.PLOTS):
            shown = frame.schema.scalars_named(*names) if frame.schema else ()
            plot = self.query_one(f"#ov-plot-{i}", Plot)
            if title == "lr" and not frame.runs and self._draw_eos(plot, frame, view):
                continue
            if frame.runs:  # a comparison: each run's line (its first of these scalars)
                plot.draw_several([(run.name, *next(
                    (v for n, v in run.scalars.items() if n.split(".")[0] in names), none))
                    for run in frame.runs], title, view, marks, whole_names=True)
            elif len(shown) > 1:  # one learning rate per optimizer
                plot.draw_several([(n, *(frame.scalars.get(n) or none)) for n in shown],
                                  title, view)
            else:
                name = shown[0] if shown else ""
                plot.draw_series(*(frame.scalars.get(name) or none), name or title, view)
        self.query_one(HeatStrip).draw(frame, view)
        self.query_one(AlertFeed).draw(frame)
        self.query_one(SystemPanel).draw(frame)

    def _draw_eos(self, plot: Plot, frame: Frame, view: View) -> bool:
        """Sharpness against its stability limit, from the probes (finite points only: the
        reports between two probes have none); False when the run has no probe results."""
        def finite(name: str) -> tuple[np.ndarray, np.ndarray]:
            x, y = frame.scalars.get(name) or (np.empty(0), np.empty(0))
            ok = np.isfinite(y)
            return np.asarray(x)[ok], np.asarray(y)[ok]
        adam = finite("precond_sharpness")
        sharp, label = (adam, "P⁻¹H") if len(adam[1]) else (finite("lambda_max"), "λmax")
        if not len(sharp[1]):
            return False
        limit = "38/lr" if label == "P⁻¹H" else "2/lr"
        plot.draw_several([(label, *sharp), (limit, *finite("eos_threshold"))],
                          f"sharpness vs {limit}", view, whole_names=True)
        return True


class RunsTable(LayerTable):
    """The layers table, which in a comparison also shows the selected run's difference
    from the reference (the ``Δ`` column, next to its statistic) and names both runs."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._versus = ""

    def shown(self, stats: Sequence[str], sort: str = "") -> list[str]:
        deltas = [s for s in stats if s.startswith(DELTA)]
        cols = super().shown([s for s in stats if s not in deltas], sort)
        for d in deltas:
            base = d.removeprefix(DELTA)
            cols.insert(cols.index(base) + 1 if base in cols else 0, d)
        return cols

    def fitting(self, cols: list[str], sort: str, width: int) -> list[str]:
        """As many columns, but never without the difference and its statistic."""
        keep = super().fitting(cols, sort, width)
        pair = [c for c in cols if c.startswith(DELTA) or DELTA + c in cols]
        if all(c in keep for c in pair):
            return keep
        rest = [c for c in keep if c not in pair][: max(len(keep) - len(pair), 0)]
        return [c for c in cols if c in rest or c in pair]

    def draw(self, frame: Frame, view: View) -> None:
        sel = [r.name for r in frame.runs if r.selected]
        ref = [r.name for r in frame.runs if r.reference]
        # A live comparison (attach --compare) keeps the live run selected: no ``r`` there.
        key = " (r: next run)" if hasattr(self.app, "action_next_run") else ""
        self._versus = f"run {sel[0]}, Δ from {ref[0]}{key}" if sel and ref else ""
        super().draw(frame, view)

    def _title(self, total: int, view: View) -> list[str]:
        parts = super()._title(total, view)
        return [*parts, self._versus] if self._versus else parts


class LayersPane(Vertical):
    """The layers table with its filter line (``/``)."""

    DEFAULT_CSS = """
    LayersPane > #filter { display: none; height: 3; }
    LayersPane > #filter.shown { display: block; }
    LayersPane > #layers-title { height: 1; padding: 0 1; text-style: bold; }
    LayersPane > LayerTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter layers by name glob (enter: apply, esc: clear)",
                    id="filter")
        # Rows, sort and an active filter, always in sight (the filter box closes on enter).
        yield Line(id="layers-title")
        yield RunsTable(id="layers")

    def wants(self, view: View) -> Wants:
        return self.query_one(LayerTable).wants(view)

    def draw(self, frame: Frame, view: View) -> None:
        self.query_one(LayerTable).draw(frame, view)


class DetailPane(Vertical):
    """Every statistic of one layer over time; its histograms now (activations and
    gradients) and the activations' over time."""

    DEFAULT_CSS = """
    DetailPane > #detail-title { height: 1; background: $boost; padding: 0 1; }
    DetailPane > #detail-plots { grid-size: 3; height: 3fr; }
    DetailPane > Horizontal { height: 2fr; }
    DetailPane > Horizontal > Panel { width: 1fr; height: 1fr; border-top: solid $accent; }
    """
    MAX_PLOTS = 12

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._plots: list[Plot] = []  # looked up once: a query per plot per frame adds up

    def compose(self) -> ComposeResult:
        yield Line(id="detail-title")
        with Grid(id="detail-plots"):
            for i in range(self.MAX_PLOTS):
                yield Plot(id=f"dt-plot-{i}")
        with Horizontal():
            yield Panel(id="hist-now")
            yield Panel(id="hist-grad")
            yield Panel(id="hist-time")

    def wants(self, view: View) -> Wants:
        return Wants(layer=view.layer)

    def draw(self, frame: Frame, view: View) -> None:
        schema = frame.schema
        if schema is None:
            return
        layers, stats = schema.layers, schema.stats
        view.layer = schema.layer_or_first(view.layer)  # as the store chose for the frame
        if not view.layer:
            return
        i = layers.index(view.layer)
        kinds = schema.layer_types
        kind = f"  ({kinds[i]})" if i < len(kinds) else ""
        x, rows = frame.layer
        grid = self.query_one("#detail-plots", Grid)
        cols = 3 if len(stats) > 4 else 2
        if grid.styles.grid_size_columns != cols:
            grid.styles.grid_size_columns = cols
        # As many plots as keep their axes (a plot's min-height); the rest are named as
        # "+N more", starting from the chosen statistic (``s``) so each can be reached.
        fit = max(grid.size.height // 5, 1) * cols if grid.size.height else len(stats)
        order = list(range(len(stats)))
        more = ""
        if len(stats) > fit:
            first = stats.index(view.stat) if view.stat in stats else 0
            order = [(first + k) % len(stats) for k in range(fit)]
            more = f"  ·  +{len(stats) - fit} more statistics (s: next)"
        update_line(self.query_one("#detail-title", Line), Text.assemble(
            ("layer ", "bold"), (view.layer, "bold"), kind,
            f"  {i + 1}/{len(layers)}", more,
            f"  ·  {view.describe()}  ·  , . previous / next layer"))
        marks = [(step, r) for r, run in enumerate(frame.runs) for step, _ in run.knobs]
        # Each statistic's column contiguous, in one pass: a plot reads its column a dozen
        # times (digest, finite, smoothing, reductions), and strided it cost several times.
        columns = np.ascontiguousarray(rows.T)
        plots = self._plots or [self.query_one(f"#dt-plot-{j}", Plot)
                                for j in range(self.MAX_PLOTS)]
        self._plots = plots
        for j, plot in enumerate(plots):
            if plot.display != (j < len(order)):
                plot.display = j < len(order)
            if j < len(order) and frame.runs:  # a comparison: the layer of each run
                st = stats[order[j]]
                plot.draw_several([(run.name, run.layer[0], run.layer[1][:, run.stats.index(st)])
                                   if st in run.stats else (run.name, np.empty(0), np.empty(0))
                                   for run in frame.runs], st, view, marks, whole_names=True)
            elif j < len(order):
                k = order[j]
                plot.draw_series(x, columns[k] if rows.size else np.empty(0), stats[k], view)
        self._draw_histograms(frame, view.layer)

    def _draw_histograms(self, frame: Frame, layer: str) -> None:
        now, over = self.query_one("#hist-now", Panel), self.query_one("#hist-time", Panel)
        grad = self.query_one("#hist-grad", Panel)
        latest = frame.histogram
        if latest is None:
            now.show_keyed(("none",), lambda: Text(
                "histogram: none for this layer (see the run's hist_layers)", "dim"))
            grad.show_keyed(("none",), lambda: "")
            over.show_keyed(("none",), lambda: "")
            return
        labels = hist_labels(latest["edges"])
        for panel, key, name in ((now, "act", "activations"), (grad, "grad", "gradients dL/dh")):
            # Histograms come every ``hist_every`` reports: most frames draw none anew.
            def bars(panel: Panel = panel, key: str = key, name: str = name) -> Text:
                return hist_bars(latest[key], labels, panel.size.width or 40,
                                 panel.size.height or 8, f"{name}, step {latest['step']}")
            panel.show_keyed((layer, latest["step"], key, latest[key].tobytes(),
                              tuple(labels)), bars)
        steps, hists = frame.hist_series
        over.show_keyed((layer, steps.tobytes(), hash(hists.tobytes()), tuple(labels)),
                        lambda: hist_heatmap(steps, hists, labels, over.size.width or 40,
                                             over.size.height or 8))


def _coarsen(counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``[..., bins]`` into at most ``n`` groups of neighbouring bins."""
    bins = counts.shape[-1]
    k = min(n, bins)
    starts = (np.arange(k) * bins) // k
    return np.add.reduceat(counts, starts, axis=-1), starts


def hist_bars(counts: np.ndarray, labels: list[str], width: int, height: int,
              title: str) -> Text:
    """The histogram now: one row per group of bins (large values on top, as in the
    heatmap beside it), a bar as long as its count."""
    groups, starts = _coarsen(counts[None, :], max(height - 1, 1))
    g = groups[0]
    top = float(g.max()) or 1.0
    bar_w = max(width - 12, 4)
    out = Text(f"{title}  (full bar: {int(top):,} values)", style="bold", no_wrap=True,
               overflow="crop")
    for c, b in zip(g[::-1], starts[::-1], strict=True):  # large values on top
        out.append(f"\n{labels[int(b)]:>10} ", style="dim")
        out.append("█" * int(round(c / top * bar_w)))
    return out


def hist_heatmap(steps: np.ndarray, hists: np.ndarray, labels: list[str], width: int,
                 height: int) -> Text:
    """Bins (rows, large values on top) x reports (columns): where the mass moves."""
    groups, starts = _coarsen(hists, max(height - 2, 1))
    share = groups / np.maximum(groups.sum(axis=1, keepdims=True), 1)
    scale = value_scale("", share)
    lines = heat_strip(share.T[::-1], max(width - 11, 4), scale=scale)
    out = Text(f"histogram over time ({len(steps)} reports, steps {int(steps[0])}…"
               f"{int(steps[-1])})  share of values: {shade_legend(*scale)}",
               style="bold", no_wrap=True, overflow="crop")
    for b, line in zip(starts[::-1], lines, strict=True):
        out.append(f"\n{labels[int(b)]:>10} ", style="dim")
        out.append_text(line)
    return out


class GradientsPane(Vertical):
    """Per-parameter gradient norms and update/weight ratios, against the 1e-3 guide."""

    DEFAULT_CSS = """
    GradientsPane > #grad-bars { height: 1fr; }
    GradientsPane > #grad-plot { height: 1fr; min-height: 6; }
    """

    def compose(self) -> ComposeResult:
        yield Panel(id="grad-bars")
        yield Plot(id="grad-plot")

    def wants(self, view: View) -> Wants:
        return Wants(param_stat="update_ratio")

    def draw(self, frame: Frame, view: View) -> None:
        bars = self.query_one("#grad-bars", Panel)
        sc = frame.schema
        names, pstats = (sc.params, sc.param_stats) if sc else ((), ())
        latest = frame.latest_params
        if latest is None or not names:
            bars.show(Text("no per-parameter statistics in this run (the agent's"
                             " param_stats option)", style="dim"))
            return
        bars.show(ratio_chart(names, pstats, latest[1], bars.size.width or 80,
                                bars.size.height or 10, level_styles(bars)))
        if "update_ratio" in pstats:
            x, r = frame.param_series
            r = r.T  # [reports x params]
            med = np.full(len(r), np.nan)
            worst = np.nan  # the latest report's parameter furthest from the guide
            has = np.isfinite(r).any(axis=1) if r.size else np.zeros(len(r), bool)
            with np.errstate(invalid="ignore", divide="ignore"):  # rows without parameters
                if len(r) and has[-1]:
                    worst = float(np.nanmax(np.abs(np.log10(np.abs(r[-1]) / UPDATE_RATIO_GUIDE))))
                if r.size and not np.isnan(r).any():  # the same, without NaN's slow path
                    med = np.where(has, np.median(r, axis=1), np.nan)
                else:
                    med[has] = np.nanmedian(r[has], axis=1)
            title = "median upd/w (guide 1e-3)"  # what a narrow plot keeps of its title
            if np.isfinite(worst):
                title += f", worst parameter {worst:.1f} decades off"
            plot = self.query_one("#grad-plot", Plot)
            plot.draw_series(x[: len(med)], med, title, View(log_y=True, smooth=view.smooth,
                                                             last=view.last),
                             guide=UPDATE_RATIO_GUIDE)


def ratio_chart(names: Sequence[str], pstats: Sequence[str], block: np.ndarray, width: int,
                height: int, styles: tuple[str, str, str]) -> Lines:
    """One line per parameter: name, grad norm, and its update/weight ratio as a dot on a
    log axis from 1e-6 to 1 with the 1e-3 guide marked ``┊``."""
    col = {s: i for i, s in enumerate(pstats)}
    name_w = min(max((len(n) for n in names), default=8), 28)
    axis_w = max(width - name_w - 24, 10)
    lo, hi = -6.0, 0.0
    guide_at = int(round((np.log10(UPDATE_RATIO_GUIDE) - lo) / (hi - lo) * (axis_w - 1)))
    out = Lines()
    out.lines[0] = [("parameter".ljust(name_w), "bold"), ("   grad norm", "bold"),
                    ("    upd/w  ", "bold"), ("1e-6".ljust(guide_at), "dim"), ("1e-3", "dim"),
                    ("1".rjust(max(axis_w - guide_at - 4, 1)), "dim")]
    ratio = block[:, col["update_ratio"]] if "update_ratio" in col else None
    lvls = levels("update_ratio", ratio) if ratio is not None else None
    # The header and, when some do not fit, the "+N more" line take a line each.
    shown = height - 1 if len(names) <= height - 1 else max(height - 2, 1)
    order = np.argsort(-np.abs(np.log10(np.abs(ratio) / UPDATE_RATIO_GUIDE + 1e-30))) \
        if ratio is not None and len(names) > shown else np.arange(len(names))
    for p in order[:shown]:
        gn = fmt(float(block[p, col["grad_norm"]])) if "grad_norm" in col else "-"
        line = [(names[p][-name_w:].ljust(name_w), ""), (f"{gn:>12}", "")]
        if ratio is not None:
            r = float(ratio[p])
            st = styles[int(lvls[p])]
            line.append((f"{fmt(r):>10} ", st))
            cells = ["─"] * axis_w
            cells[guide_at] = "┊"
            if np.isfinite(r) and r > 0:
                at = int(round((np.clip(np.log10(r), lo, hi) - lo) / (hi - lo) * (axis_w - 1)))
                cells[at] = "●"
                line += [("".join(cells[:at]), "dim"), ("●", f"bold {st}"),
                         ("".join(cells[at + 1:]), "dim")]
            else:
                line.append(("".join(cells), "dim"))
        out.lines.append([run for run in line if run[0]])
    if len(names) > shown:
        out.append(f"\n+{len(names) - shown} more parameters (shown: furthest from 1e-3"
                   " first)", style="dim")
    return out
