"""The neurotop Textual app: pull, don't push.

The client's thread fills the store; one timer redraws what changed, at 5 Hz, and only
the visible screen (``dashboard``): it takes one ``Frame`` from the store per redraw and
hands it to the widgets in one batch. Key bindings follow htop/btop/k9s: number keys
switch screens, ``space`` pause/resume, ``/`` filter, ``?`` help, ``q`` quit.
"""

from __future__ import annotations

import gc
from dataclasses import replace

from rich.text import Text
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widgets import ContentSwitcher, DataTable, Input, Static

from neurotop.tui.data.client import CommandError, LiveClient
from neurotop.tui.data.frame import Frame, Wants
from neurotop.tui.data.glossary import ALERT_HINTS, STATISTICS, meaning
from neurotop.tui.data.ranks import Ranks
from neurotop.tui.data.store import RunStore
from neurotop.tui.data.view import WINDOW_STEPS, View
from neurotop.tui.screens.control_panel import CommandDone, ControlActions, ControlPanel
from neurotop.tui.screens.dashboard import DetailPane, GradientsPane, LayersPane, OverviewPane
from neurotop.tui.screens.ranks_view import RanksPane
from neurotop.tui.screens.widgets import ColumnPicker, KeyBar, LayerTable, StatusBar

REDRAW_HZ = 5  # a busy screen at 200 layers costs ~40 ms: 5 Hz stays under 30 % of a core


class HelpScreen(ModalScreen[None]):
    """Every binding, then the glossary: each statistic in one line with its healthy
    range, and what to try for each alert (``tui/data/glossary.py``)."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 100%; max-width: 84; max-height: 100%;
                                  height: auto; border: round $accent; background: $panel; }
    HelpScreen Static { padding: 0 1; }
    """

    def __init__(self, bindings: list[tuple[str, str]], own: tuple[str, ...] = ()) -> None:
        """``own``: the run's scalars the glossary does not know (the user's own)."""
        super().__init__()
        self._rows = bindings
        self._own = own

    def compose(self) -> ComposeResult:
        out = Text.assemble(("neurotop — keys", "bold"), "  (esc, q or ? closes; ↑↓ scroll)")
        for k, d in self._rows:
            out.append_text(Text.assemble("\n  ", (f"{k:<10}", "bold"), f" {d}"))
        out.append("\n\nstatistics — what each is; healthy range", style="bold")
        name_w = 17  # longer names push their line's text right
        for name, (what, healthy) in STATISTICS.items():
            out.append_text(Text.assemble("\n  ", (f"{name:<{name_w - 1}} ", "bold"), f"{what}; ",
                                          (healthy, "italic")))
        for name in self._own:
            out.append_text(Text.assemble("\n  ", (f"{name:<{name_w - 1}} ", "bold"),
                                          "your own scalar (observe)"))
        out.append("\n\nalerts — what to try", style="bold")
        for name, what in ALERT_HINTS.items():
            out.append_text(Text.assemble("\n  ", (f"{name:<{name_w - 1}} ", "bold"), what))
        with VerticalScroll():
            yield Static(out)


class PauseDone(CommandDone):
    """The ack (or refusal) of ``space``'s pause or resume."""


class NeurotopApp(ControlActions, App[None]):
    """Live view of one run: status bar, loss plot, layers table."""

    TITLE = "neurotop"
    BINDINGS = [
        Binding("1", "screen('overview')", "overview"),
        Binding("2", "screen('layers')", "layers"),
        Binding("3", "screen('detail')", "detail"),
        Binding("4", "screen('gradients')", "grads"),
        Binding("5", "screen('control')", "control"),
        Binding("6", "help", show=False),
        Binding("slash", "filter", "filter", show=False),
        Binding("S", "sort", "sort", show=False),
        Binding("R", "all_ranks", show=False),  # a single-process run: reverse the sort
        Binding("r", "next_rank", show=False),
        Binding("m", "toggle_smooth", "smooth", show=False),
        Binding("a", "toggle_window", "window", show=False),
        Binding("escape", "back", show=False),
        Binding("comma", "next_layer(-1)", show=False),
        Binding("full_stop", "next_layer(1)", show=False),
        Binding("space", "toggle_pause", "pause/resume"),
        Binding("n", "step_one", "step 1"),
        Binding("c", "toggle_controls", "controls"),
        Binding("e", "edit_knob", "edit knob", show=False),
        Binding("w", "snapshot", "snapshot", show=False),
        Binding("H", "probe", "probe", show=False),
        Binding("X", "stop_run", "stop run", show=False),
        Binding("s", "cycle_spark", "statistic", show=False),
        Binding("l", "toggle_log", "log", show=False),
        Binding("o", "pick_columns", "columns", show=False),
        Binding("p", "next_preset", "preset", show=False),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
    ]
    CSS = """
    #body { height: 1fr; }
    #main { height: 1fr; }
    ControlPanel.full { dock: none; width: 1fr; height: 1fr; border-left: none; }
    #main.hidden { display: none; }
    """
    #: (keys, action, what it does) of the screens and views, for the help screen.
    VIEW_HELP = (("1 … 5", "screen", "overview, layers, layer detail, gradients, control"),
                 ("? or 6", "help", "this help"),
                 ("s", "cycle_spark", "choose the statistic (heat strip, trend column)"),
                 ("l", "toggle_log", "log scale of the plots"),
                 ("m", "toggle_smooth", "smoothing of the plots"),
                 ("a", "toggle_window", f"window: the last {WINDOW_STEPS:,} steps / all"),
                 ("S, R", "sort", "layers: sort by the next column / reverse (in a job: R"
                  " below)"),
                 ("r", "next_rank", "a job: the next rank's data on every screen"),
                 ("R", "all_ranks", "a job: all ranks (their spread, step time); R: back"),
                 ("o", "pick_columns", "layers: choose the columns"),
                 ("p", "next_preset", "layers: next column preset (overview, activations, …)"),
                 ("/", "filter", "layers: filter by name glob (esc clears)"),
                 ("enter", "detail", "layers: open the layer's detail"),
                 (", .", "next_layer", "detail: previous / next layer"),
                 ("esc", "back", "detail: back to the layers"))
    #: Actions that drive the run: a read-only view neither shows nor runs them (the footer
    #: and the help leave their keys out). Add every control action here.
    CONTROL_ACTIONS = frozenset({"toggle_pause", "step_one", "toggle_controls", "edit_knob",
                                 "snapshot", "stop_run", "probe"})
    #: (keys, action, what it does) for the help screen.
    HELP = (("space", "toggle_pause", "pause / resume the run at the next optimizer step"),
            ("n", "step_one", "run one optimizer step, then pause"),
            ("c", "toggle_controls", "show / hide the control panel (knobs, command log)"),
            ("e, enter", "edit_knob", "edit the selected knob (asks to confirm)"),
            ("w", "snapshot", "snapshot model + optimizer state"),
            ("H", "probe", "curvature probe now (lambda_max vs 2/lr; needs mon.probe_batch)"),
            ("X", "stop_run", "stop the run gracefully (asks to confirm)"),
            ("q", "quit", "quit (the run goes on)"))

    def __init__(self, client: LiveClient, *, read_only: bool = False,
                 ranks: Ranks | None = None) -> None:
        """``ranks``: a job's ranks (else the client's own, a ``JobClient``'s): the app
        reads them as its store, the selected rank's data."""
        super().__init__()
        self.client = client
        self.store: RunStore = client.store
        self.ranks: Ranks | None = ranks if ranks is not None else getattr(client, "ranks", None)
        if self.ranks is not None:
            self.store = self.ranks  # type: ignore[assignment]  # a store's reading face
        self.note = ""  # a passing word in the status line ("not a distributed job")
        self._before_ranks = "overview"
        self.read_only = read_only or not client.can_control
        self.pending = ""
        self.view = View()
        self.screen_name = "overview"
        self.frame: Frame = self.store.frame()  # the last one drawn: what the user sees
        self._drawn: tuple = ()

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        # The panel docks in the body, under the status bar: opening it hides no status.
        yield Horizontal(
            ControlPanel(id="controls"),
            ContentSwitcher(OverviewPane(id="overview"), LayersPane(id="layers-pane"),
                            DetailPane(id="detail"), GradientsPane(id="gradients"),
                            RanksPane(id="ranks"), id="main", initial="overview"),
            id="body")
        yield KeyBar(id="keys")

    def on_mount(self) -> None:
        # Everything built so far lives as long as the app: keep it out of the collector's
        # full passes, which otherwise cost a frame 50+ ms every few seconds.
        gc.freeze()
        self.query_one(ControlPanel).set_class(self.size.width < ControlPanel.BESIDE, "narrow")
        self.set_interval(1 / REDRAW_HZ, self.redraw)
        self.redraw()

    def on_resize(self, event: events.Resize) -> None:
        for panel in self.query(ControlPanel):
            panel.set_class(event.size.width < ControlPanel.BESIDE, "narrow")

    def redraw(self, force: bool = False) -> None:
        """Redraw only when the store, the connection state or the screen changed, and
        only what the visible screen shows. A run that will never start (its process
        exited first) closes the UI: the command then says why, with the run's output."""
        if self.client.gone:
            self.exit()
            return
        key = (self.store.version, self.store.connection() + self.pending + self.note,
               self.stop_acked,
               self.screen_name, self.size)
        if key == self._drawn and not force:
            return  # nothing new
        try:  # by its id: a cached lookup, where ``query(StatusBar)`` walked every widget
            bar = self.query_one("#status", StatusBar)
        except NoMatches:  # the app is closing and its widgets are gone
            return
        kind = {"overview": OverviewPane, "layers": LayersPane, "detail": DetailPane,
                "gradients": GradientsPane, "ranks": RanksPane}.get(self.screen_name)
        pane = self.query_one(kind) if kind is not None else None
        wants = pane.wants(self.view) if pane is not None else Wants()
        if self.query_one(ControlPanel).has_class("shown"):
            wants = replace(wants, events=max(wants.events, ControlPanel.EVENTS))
        self.frame = frame = self.store.frame(wants)
        self._drawn = (frame.version, frame.connection + self.pending + self.note,
                       self.stop_acked,
                       self.screen_name, self.size)
        if frame.schema is not None:  # the store chose the series' statistic alike
            self.view.stat = frame.schema.stat_or_default(self.view.stat)
        with self.batch_update():
            bar.draw(frame, self.pending or self.note, self.stop_acked)
            if pane is not None:
                pane.draw(frame, self.view)
            self.draw_controls(frame)

    def invalidate(self) -> None:
        """Redraw at the next tick even if the store did not change (a widget resized)."""
        self._drawn = ()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (self.read_only and action in self.CONTROL_ACTIONS)

    # -- actions --------------------------------------------------------------------------

    def action_toggle_pause(self) -> None:
        cmd = "resume" if self.store.frame().status.state == "paused" else "pause"
        self.pending = f"{cmd} requested…"
        self.client.command(cmd).add_done_callback(
            lambda f: self.post_message(PauseDone(cmd, f)))
        self.redraw()

    def on_pause_done(self, message: PauseDone) -> None:
        cmd, self.pending = message.cmd, ""
        try:
            ack = message.future.result()
        except CommandError as e:
            self.notify(f"{cmd} failed: {e}", severity="error", markup=False)
        else:
            verb = "paused" if cmd == "pause" else "resumed"
            self.notify(f"{verb} at step {ack['step']}")
        self.redraw(force=True)

    def action_cycle_spark(self) -> None:
        stats = self.frame.schema.stats if self.frame.schema else ()
        if stats:
            i = stats.index(self.view.stat) if self.view.stat in stats else -1
            self.view.stat = stats[(i + 1) % len(stats)]
            self.query_one(LayerTable).spark_stat = self.view.stat
            self.notify(f"statistic: {self.view.stat}", timeout=2)
            self.redraw(force=True)

    def action_pick_columns(self) -> None:
        if self.frame.schema is None:
            return
        table = self.query_one(LayerTable)
        stats = list(self.frame.schema.stats)

        def apply(chosen: list[str] | None) -> None:
            if chosen:
                table.choose(chosen)
                self.redraw(force=True)
        if self.screen_name != "layers":
            self.action_screen("layers")
        self.push_screen(ColumnPicker(stats, table.shown(stats)), apply)

    def action_next_preset(self) -> None:
        self.notify(f"columns: {self.query_one(LayerTable).next_preset()}")
        if self.screen_name != "layers":
            self.action_screen("layers")
        self.redraw(force=True)

    def action_toggle_log(self) -> None:
        self.view.log_y = not self.view.log_y
        self.redraw(force=True)

    def action_toggle_smooth(self) -> None:
        self.view.smooth = not self.view.smooth
        self.redraw(force=True)

    def action_toggle_window(self) -> None:
        self.view.last = None if self.view.last else WINDOW_STEPS
        self.redraw(force=True)

    def action_screen(self, name: str) -> None:
        """Show one screen; the control screen is the control panel at full width."""
        panel = self.query_one(ControlPanel)
        self.query_one(ContentSwitcher).set_class(name == "control", "hidden")
        if name == "control":
            panel.add_class("shown", "full")
            panel.query_one(DataTable).focus()
        else:
            if self.screen_name == "control":
                panel.remove_class("shown", "full")
            self.query_one(ContentSwitcher).current = (
                "layers-pane" if name == "layers" else name)
            if name == "layers":
                self.query_one(LayerTable).focus()
        self.screen_name = name
        if self.ranks is not None and self.ranks.all_view != (name == "ranks"):
            self.ranks.toggle_all()
        self.redraw(force=True)

    def action_sort(self) -> None:
        """The next column on screen: never one the user cannot see."""
        if self.screen_name != "layers":
            self.action_screen("layers")  # drawn now: its columns are the ones to cycle
        cols = self.query_one(LayerTable).sortable()
        i = cols.index(self.view.sort) if self.view.sort in cols else 0
        self.view.sort = cols[(i + 1) % len(cols)]
        self.view.descending = True
        self._sorted()

    def action_reverse_sort(self) -> None:
        self.view.descending = not self.view.descending
        self.view.sort = self.view.sort or "layer"
        self._sorted()

    def _sorted(self) -> None:
        self.notify(f"sorted by {self.view.sort or 'model order'}"
                    f"{' (descending)' if self.view.sort and self.view.descending else ''}",
                    timeout=2)
        if self.screen_name != "layers":
            self.action_screen("layers")
        self.redraw(force=True)

    def on_layer_table_sort_by(self, event: LayerTable.SortBy) -> None:
        same = event.column == self.view.sort
        self.view.sort = event.column
        # Numbers sort worst-first (largest); names A to Z (the model's order) first.
        self.view.descending = not self.view.descending if same else event.column != "layer"
        self._sorted()

    def action_filter(self) -> None:
        if self.screen_name != "layers":
            self.action_screen("layers")
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.value = self.view.filter
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.view.filter = event.value.strip()
            self.redraw(force=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            event.input.remove_class("shown")
            self.query_one(LayerTable).focus()

    def on_key(self, event) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:
            box.value = ""
            box.remove_class("shown")
            self.query_one(LayerTable).focus()
            event.stop()

    def on_layer_table_chosen(self, event: LayerTable.Chosen) -> None:
        self.view.layer = event.layer
        self.action_screen("detail")

    def action_back(self) -> None:
        if self.screen_name == "detail":
            self.action_screen("layers")

    def action_next_layer(self, step: int) -> None:
        layers = self.frame.schema.layers if self.frame.schema else ()
        if layers:
            i = layers.index(self.view.layer) if self.view.layer in layers else 0
            self.view.layer = layers[(i + step) % len(layers)]
            self.redraw(force=True)

    def is_job(self) -> bool:
        """Whether this is a distributed job; if not, says so in the status line."""
        if self.ranks is not None and self.ranks.is_job:
            return True
        self.note = "not a distributed job"
        self.set_timer(3, self._clear_note)
        self.redraw(force=True)
        return False

    def _clear_note(self) -> None:
        self.note = ""
        self.redraw(force=True)

    def action_next_rank(self) -> None:
        """``r``: the next rank's data on every screen (rank 0 after the last)."""
        if self.is_job() and self.ranks is not None:
            self.notify(f"rank {self.ranks.select_next()}", timeout=2)
            self.redraw(force=True)

    def action_all_ranks(self) -> None:
        """``R``: the all-ranks view, or back to the screen before it. In a single-process
        run (no ranks) ``R`` reverses the layers' sort, as it always did."""
        if self.ranks is None or not self.ranks.is_job:
            self.action_reverse_sort()
            return
        if self.screen_name == "ranks":
            self.action_screen(self._before_ranks)
        else:
            self._before_ranks = self.screen_name
            self.action_screen("ranks")

    def action_help(self) -> None:
        rows = [(keys, text) for keys, action, text in (*self.VIEW_HELP, *self.HELP)
                if not (self.read_only and action in self.CONTROL_ACTIONS)]
        self.push_screen(HelpScreen(rows, self.own_scalars()))

    def own_scalars(self) -> tuple[str, ...]:
        """The run's scalars the glossary has no line for: the user's ``observe`` names."""
        sc = self.frame.schema
        return tuple(n for n in (sc.scalars if sc else ()) if meaning(n) is None)
