"""The neurotop Textual app: pull, don't push.

The client's thread fills the store; one timer redraws what changed, at 8 Hz.
Key bindings follow htop/btop: ``space`` pause/resume, ``?`` help, ``q`` quit.
"""

from __future__ import annotations

from concurrent.futures import Future

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Static

from tui.client import CommandError, LiveClient
from tui.control_panel import ControlActions, ControlPanel
from tui.layer_detail import LayerDetailScreen
from tui.store import RunStore
from tui.widgets import ColumnPicker, LayerTable, LossPlot, StatusBar

REDRAW_HZ = 8


class HelpScreen(ModalScreen[None]):
    """Every binding, in one place."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: 64; padding: 1 2; border: round $accent; background: $panel; }
    """

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self._rows = bindings

    def compose(self) -> ComposeResult:
        lines = ["[b]neurotop — keys[/b]", ""]
        lines += [f"  [b]{k:<10}[/b] {d}" for k, d in self._rows]
        lines += ["", "Press esc, q or ? to close."]
        yield Static("\n".join(lines))


class NeurotopApp(ControlActions, App[None]):
    """Live view of one run: status bar, loss plot, layers table."""

    TITLE = "neurotop"
    BINDINGS = [
        Binding("space", "toggle_pause", "pause/resume"),
        Binding("n", "step_one", "step 1"),
        Binding("c", "toggle_controls", "controls"),
        Binding("e", "edit_knob", "edit knob", show=False),
        Binding("w", "snapshot", "snapshot", show=False),
        Binding("X", "stop_run", "stop run", show=False),
        Binding("s", "cycle_spark", "trend stat"),
        Binding("o", "pick_columns", "columns"),
        Binding("p", "next_preset", "column preset"),
        Binding("l", "toggle_log", "log loss"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
    ]
    CSS = "#main { height: 1fr; }"
    #: Actions that drive the run: a read-only view neither shows nor runs them (the footer
    #: and the help leave their keys out). Add every control action here.
    CONTROL_ACTIONS = frozenset({"toggle_pause", "step_one", "toggle_controls", "edit_knob",
                                 "snapshot", "stop_run"})
    #: (keys, action, what it does) for the help screen.
    HELP = (("space", "toggle_pause", "pause / resume the run at the next optimizer step"),
            ("n", "step_one", "run one optimizer step, then pause"),
            ("c", "toggle_controls", "show / hide the control panel (knobs, command log)"),
            ("e, enter", "edit_knob", "edit the selected knob (asks to confirm)"),
            ("w", "snapshot", "snapshot model + optimizer state"),
            ("X", "stop_run", "stop the run gracefully (asks to confirm)"),
            ("s", "cycle_spark", "choose the statistic the trend column shows"),
            ("o", "pick_columns", "choose the layers table's columns"),
            ("p", "next_preset", "next column preset (overview, activations, sparsity, ...)"),
            ("enter", "layer_detail", "layer detail: every statistic over time, histograms"),
            ("l", "toggle_log", "log scale for the loss plot"),
            ("?", "help", "this help"), ("q", "quit", "quit (the run goes on)"))

    def __init__(self, client: LiveClient, *, read_only: bool = False) -> None:
        super().__init__()
        self.client = client
        self.store: RunStore = client.store
        self.read_only = read_only or not client.can_control
        self.pending = ""
        self.log_loss = False
        self._drawn = (-1, "")

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield ControlPanel(id="controls")
        with Vertical(id="main"):
            yield LossPlot(id="loss")
            yield LayerTable(id="layers")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1 / REDRAW_HZ, self.redraw)
        self.redraw()

    def redraw(self, force: bool = False) -> None:
        """Redraw only when the store or the connection state changed."""
        key = (self.store.version, self.store.connection() + self.pending)
        if key == self._drawn and not force:
            return
        self._drawn = key
        with self.batch_update():
            self.query_one(StatusBar).draw(self.store, self.pending)
            self.query_one(LossPlot).draw(self.store, self.log_loss)
            self.query_one(LayerTable).draw(self.store)
            self.draw_controls()
            if isinstance(self.screen, LayerDetailScreen):
                self.screen.draw()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (self.read_only and action in self.CONTROL_ACTIONS)

    # -- actions --------------------------------------------------------------------------

    def action_toggle_pause(self) -> None:
        cmd = "resume" if self.store.status.state == "paused" else "pause"
        self.pending = f"{cmd} requested…"
        self.client.command(cmd).add_done_callback(
            lambda f: self.call_from_thread(self._on_ack, cmd, f))
        self.redraw()

    def _on_ack(self, cmd: str, fut: Future) -> None:
        self.pending = ""
        try:
            ack = fut.result()
        except CommandError as e:
            self.notify(f"{cmd} failed: {e}", severity="error")
        else:
            verb = "paused" if cmd == "pause" else "resumed"
            self.notify(f"{verb} at step {ack['step']}")
        self.redraw(force=True)

    def action_cycle_spark(self) -> None:
        table = self.query_one(LayerTable)
        stats = self.store.schema["stats"] if self.store.schema else []
        if stats:
            i = stats.index(table.spark_stat) if table.spark_stat in stats else -1
            table.spark_stat = stats[(i + 1) % len(stats)]
            self.redraw(force=True)

    def action_pick_columns(self) -> None:
        if self.store.schema is None:
            return
        table = self.query_one(LayerTable)
        stats = self.store.schema["stats"]

        def apply(chosen: list[str] | None) -> None:
            if chosen:
                table.choose(chosen)
                self.redraw(force=True)
        self.push_screen(ColumnPicker(stats, table.shown(stats)), apply)

    def action_next_preset(self) -> None:
        self.notify(f"columns: {self.query_one(LayerTable).next_preset()}")
        self.redraw(force=True)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """``enter`` on a layer: every statistic of it over time, and its histograms."""
        if isinstance(event.data_table, LayerTable) and event.row_key.value is not None:
            self.push_screen(LayerDetailScreen(self.store, str(event.row_key.value)))

    def action_toggle_log(self) -> None:
        self.log_loss = not self.log_loss
        self.redraw(force=True)

    def action_help(self) -> None:
        rows = [(keys, text) for keys, action, text in self.HELP
                if not (self.read_only and action in self.CONTROL_ACTIONS)]
        self.push_screen(HelpScreen(rows))
