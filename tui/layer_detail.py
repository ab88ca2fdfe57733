"""One layer in full: every statistic over time, and its latest histograms.

Opened with ``enter`` on a row of the layers table; ``esc`` goes back. Like every
widget, it draws from the ``RunStore`` when the app's one timer asks (``draw``).
"""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Static

from tui.plotting import hist_plot, line_plot
from tui.store import RunStore


class StatPlot(Static):
    """One statistic of one layer over the steps."""

    DEFAULT_CSS = "StatPlot { height: 1fr; min-height: 6; }"

    def __init__(self, stat: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stat = stat

    def draw(self, steps: np.ndarray, values: np.ndarray) -> None:
        w, h = self.size.width or 40, self.size.height or 8
        last = f"{values[-1]:.4g}" if len(values) else "-"
        log_y = self.stat in LOG_STATS and len(values) and np.nanmin(values) > 0
        self.update(Text.from_ansi(line_plot(steps, values, w, h, f"{self.stat} = {last}",
                                             bool(log_y))))


class HistogramPlot(Static):
    """A layer's latest histogram of activations or of gradients."""

    DEFAULT_CSS = "HistogramPlot { width: 1fr; height: 1fr; }"

    def __init__(self, what: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.what = what  # "act" or "grad"

    def draw(self, hist: dict | None) -> None:
        w, h = self.size.width or 60, self.size.height or 10
        name = "activations" if self.what == "act" else "gradients dL/dh"
        if hist is None or not np.any(hist[self.what]):
            self.update(f"{name}: no histogram yet (sent every hist_every reports)")
            return
        self.update(Text.from_ansi(hist_plot(hist["edges"], hist[self.what], w, h,
                                             f"{name}, step {hist['step']}")))


#: Statistics drawn on a log axis when all their values are positive.
LOG_STATS = frozenset({"rms", "max_abs", "massive_ratio", "kurtosis", "grad_rms"})


class LayerDetailScreen(Screen[None]):
    """Every statistic of ``layer`` over time (a grid of plots) and its histograms."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "back")]
    DEFAULT_CSS = """
    LayerDetailScreen #title { height: 1; background: $boost; padding: 0 1; }
    LayerDetailScreen #plots { grid-size: 4; grid-gutter: 0 1; height: 2fr; }
    LayerDetailScreen #hists { height: 1fr; min-height: 8; }
    """

    def __init__(self, store: RunStore, layer: str) -> None:
        super().__init__()
        self.store, self.layer_name = store, layer
        self.stats = list(store.schema["stats"]) if store.schema else []

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        with Grid(id="plots"):
            for st in self.stats:
                yield StatPlot(st, id=f"plot-{st}")
        with Horizontal(id="hists"):
            yield HistogramPlot("act", id="hist-act")
            yield HistogramPlot("grad", id="hist-grad")
        yield Footer()

    def on_mount(self) -> None:
        self.draw()

    def draw(self) -> None:
        steps, series = self.store.layer_series(self.layer_name)
        extra = self.store.schema_extra
        layers = self.store.schema["layers"] if self.store.schema else []
        kind = ""
        if self.layer_name in layers and extra["layer_types"]:
            kind = extra["layer_types"][layers.index(self.layer_name)]
        where = f"  step {int(steps[-1])}" if len(steps) else "  waiting for a report"
        self.query_one("#title", Static).update(Text.assemble(
            (self.layer_name, "bold"), f"  {kind}", where, "  (esc: back)"))
        for j, st in enumerate(self.stats):
            values = series[:, j] if series.shape[1] > j else np.empty(0, np.float32)
            self.query_one(f"#plot-{st}", StatPlot).draw(steps, values)
        hist = self.store.latest_histogram(self.layer_name)
        for plot in self.query(HistogramPlot):
            plot.draw(hist)

    def plotted(self) -> list[str]:
        """The statistics this screen plots (for tests and the help)."""
        return [p.stat for p in self.query(StatPlot)]

