"""The control panel: knobs with their current values, editing with validation and
confirmation, and the command log with every ack (from any viewer, or auto-pause).

Like every widget it draws from the app's ``Frame`` when the app's timer asks; it never
reads the store or parses messages. Values are checked here with the same rules the agent
applies (``neurotop.protocol.commands.check_value``), so a typo is refused before it is
sent; the agent checks again and its ack (or refusal) lands in the log.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Static

from neurotop.protocol.commands import check_value, parse_value, set_args, split_knob
from neurotop.tui.data.client import CommandError, LiveClient
from neurotop.tui.data.frame import Frame
from neurotop.tui.data.store import RunStore
from neurotop.tui.screens.widgets import fmt

LOG_LINES = 14


def fmt_value(v: Any) -> str:
    """A knob value for a cell: numbers compactly, lists and maps shortened."""
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, (int, float)):
        return fmt(float(v)) if isinstance(v, float) else str(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items()) or "off"
    if isinstance(v, list):
        return "[" + ", ".join(fmt_value(x) for x in v[:4]) + (", …]" if len(v) > 4 else "]")
    return str(v)


def pin_note(pin: dict[str, Any] | None) -> str:
    """`` pinned`` for a knob held against the script, with how often the script wrote
    over it (each write undone at the next step) and what it last wrote."""
    if not pin:
        return ""
    n = pin.get("overridden") or 0
    if not n:
        return " pinned"
    return f" pinned (script wrote {fmt_value(pin.get('script'))} ×{n})"


def bounds(spec: dict[str, Any]) -> str:
    lo, hi = spec.get("min"), spec.get("max")
    if lo is None and hi is None:
        return spec["type"]
    return f"{spec['type']} [{'' if lo is None else lo}, {'' if hi is None else hi}]"


def describe_command(ev: dict[str, Any]) -> str:
    """``set lr x0.5``, ``step 3``, ``pause``: what was asked, as a person would type it."""
    cmd, args = ev.get("cmd") or "?", ev.get("args") if isinstance(ev.get("args"), dict) else {}
    if cmd == "set":
        if args.get("op") == "release":
            return f"set {args.get('knob')} release"
        op = "x" if args.get("op") == "mul" else ""
        return f"set {args.get('knob')} {op}{args.get('value')}"
    if cmd == "step":
        return f"step {args.get('n')}"
    return str(cmd)


def log_line(ev: dict[str, Any]) -> Text | None:
    """One line of the command log, or None for events the log does not show."""
    kind = ev.get("event")
    if ev.get("cmd") in ("knobs", "schema"):
        return None  # read-only queries (the panel itself sends them)
    t = time.strftime("%H:%M:%S", time.localtime(ev.get("t", time.time())))
    if kind == "command":
        return Text.assemble((t, "dim"), f" {ev.get('sender') or '?'}: ",
                             (describe_command(ev), "bold"))
    if kind == "ack" and ev.get("ok"):
        change = ""
        if ev.get("cmd") == "set":
            change = f": {fmt_value(ev.get('old'))} → {fmt_value(ev.get('new'))}"
            change += " (pinned)" if ev.get("pinned") else ""
        elif ev.get("new") is not None:
            change = f": {fmt_value(ev.get('new'))}"
        who = " (auto-pause)" if ev.get("sender") == "auto-pause" else ""
        return Text.assemble((t, "dim"), ("  ✓ ", "green"),
                             f"{describe_command(ev)} @ step {ev.get('step')}{change}{who}")
    if kind == "ack":
        return Text.assemble((t, "dim"), ("  ✗ ", "red"),
                             f"{describe_command(ev)}: {ev.get('error')}")
    if kind == "paused":
        return Text.assemble((t, "dim"), ("  ⏸ ", "yellow"),
                             f"paused @ step {ev.get('step')} ({ev.get('reason')})")
    if kind == "refused":
        return Text.assemble((t, "dim"), ("  ✗ refused: ", "red"), str(ev.get("error")))
    return None


class ControlPanel(Vertical):
    """Docked on the right; ``c`` shows or hides it. Below ``BESIDE`` columns it is
    ``narrow`` (the knob and its value; the type scrolls into view): the screen beside it
    keeps room enough to be read."""

    DEFAULT_CSS = """
    ControlPanel { dock: right; width: 56; border-left: solid $accent; display: none; }
    ControlPanel.narrow { width: 30; }
    ControlPanel.shown { display: block; }
    ControlPanel > .title { height: 1; background: $boost; padding: 0 1; }
    ControlPanel > DataTable { height: auto; max-height: 12; }
    ControlPanel > #command-log { height: 1fr; padding: 0 1; }
    """
    EVENTS = 4 * LOG_LINES  # the last events it looks through (most are not commands)
    BESIDE = 120  # the app's width from which the panel takes its full 56 columns

    def compose(self) -> ComposeResult:
        # Only a viewer that may change the run is told how to (replay, read-only: not).
        read_only = getattr(self.app, "read_only", True)
        yield Static("knobs  (read-only)" if read_only else "knobs  (enter: edit)",
                     classes="title", id="knobs-title")
        yield DataTable(id="knob-table", cursor_type="row", zebra_stripes=True)
        yield Static("command log", classes="title")
        yield Static("", id="command-log")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("knob", key="knob")
        table.add_column("value", key="value")
        table.add_column("type", key="type")
        self._names: list[tuple[str, bool]] = []
        self._knobs: tuple[dict[str, Any], ...] = ()  # the listing drawn

    def draw(self, frame: Frame) -> None:
        table = self.query_one(DataTable)
        self._knobs = frame.knobs
        # Without a listing (read-only viewers cannot ask for one) the heartbeat's values
        # still show, untyped.
        specs = frame.knobs or tuple({"name": n} for n in frame.knob_values)
        names = [(k["name"], "type" in k) for k in specs]
        if names != self._names:
            table.clear()
            for k in specs:  # Text cells: a knob named ``lr[0]`` is not markup
                table.add_row(Text(k["name"]), Text(""),
                              Text(bounds(k) if "type" in k else ""), key=k["name"])
            self._names = names
        for k in specs:
            v = frame.knob_values.get(k["name"], k.get("value"))
            # The column widens to the value: a number is never cut (``2.00e-``).
            table.update_cell(k["name"], "value",
                              Text(fmt_value(v) + pin_note(frame.knob_pins.get(k["name"]))),
                              update_width=True)
        lines = [ln for ln in map(log_line, frame.status.events[-self.EVENTS:]) if ln]
        self.query_one("#command-log", Static).update(Text("\n").join(lines[-LOG_LINES:]))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.app.action_edit_knob()  # type: ignore[attr-defined]  # NeurotopApp's

    @staticmethod
    def wants_listing(frame: Frame) -> bool:
        """True when the listing is missing or a knob appeared since (``mon.knob`` later)."""
        return not frame.knobs or not set(frame.knob_values) <= {k["name"] for k in frame.knobs}

    def selected(self) -> dict[str, Any] | None:
        """The spec of the knob under the cursor, from the listing drawn."""
        table = self.query_one(DataTable)
        if not self._knobs or table.row_count == 0:
            return None
        name = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((k for k in self._knobs if k["name"] == name), None)


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no, for anything that changes the run."""

    BINDINGS = [Binding("y,enter", "answer(True)", "yes"),
                Binding("n,escape", "answer(False)", "no")]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Static { width: 64; padding: 1 2; border: round $warning; background: $panel; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        yield Static(f"{self.question}\n\n[b]y[/b] / enter: yes    [b]n[/b] / esc: no")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class KnobEditScreen(ModalScreen[dict[str, Any] | None]):
    """Edit one knob: refuses what the agent would refuse, then asks for confirmation.
    Dismisses with the ``set`` command's args, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    KnobEditScreen { align: center middle; }
    KnobEditScreen > Vertical { width: 70; height: auto; padding: 1 2; border: round $accent;
                                background: $panel; }
    KnobEditScreen Input { margin: 1 0 0 0; }
    KnobEditScreen #error { color: $error; height: auto; }
    """

    def __init__(self, spec: dict[str, Any], current: Any) -> None:
        super().__init__()
        self.spec, self.current = spec, current

    def compose(self) -> ComposeResult:
        s = self.spec
        sel = {"group": " — add [i] for one param group",
               "glob": " — add [GLOB] to pick modules"}.get(s.get("selector") or "", "")
        held = (" (held against the script until you type release)"
                if s.get("pinnable") else "")
        with Vertical():  # a Text: the hint's [i] and a doc's brackets are not markup
            yield Static(Text.assemble(
                (s["name"], "bold"), f"  {bounds(s)}  now: {fmt_value(self.current)}\n",
                f"{s.get('doc', '')}\nvalue: a number, true/false, or xFACTOR to multiply",
                held, sel))
            yield Input(value=s["name"], id="knob", placeholder="knob")
            value = "" if isinstance(self.current, (dict, list)) else fmt_value(self.current)
            yield Input(value=value, id="value", placeholder="value")
            yield Static("", id="error")

    def on_mount(self) -> None:
        self.query_one("#value", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        args, error = self.check(self.query_one("#knob", Input).value,
                                 self.query_one("#value", Input).value)
        if error:
            self.query_one("#error", Static).update(Text(error))
            return
        op = "x" if args.get("op") == "mul" else ""
        knob = escape(args["knob"])  # the question is markup; what the user typed is not
        question = (f"Release [b]{knob}[/b] (the script's own value takes over)?"
                    if args.get("op") == "release" else
                    f"Set [b]{knob}[/b] from {escape(fmt_value(self.current))} to"
                    f" [b]{op}{escape(str(args['value']))}[/b]?")
        def answered(yes: bool | None) -> None:
            if yes:  # declined: stay here, nothing is sent
                self.dismiss(args)

        self.app.push_screen(ConfirmScreen(question), answered)

    def check(self, knob: str, text: str) -> tuple[dict[str, Any], str | None]:
        """The command args, or the reason they would be refused."""
        try:
            base, sel = split_knob(knob.strip())
            value, op = parse_value(text)
        except ValueError as e:
            return {}, str(e)
        if base != self.spec["name"]:
            return {}, f"this editor sets {self.spec['name']}, not {base}"
        if sel is None and self.spec.get("selector") and not self.spec.get("targets"):
            return {}, f"{base} needs a selector: {base}[GLOB], e.g. {base}[layers.*.act]"
        error = check_value(self.spec, value, op)
        if error is None and op == "mul" and isinstance(self.current, (int, float)):
            error = check_value(self.spec, self.current * value)
        return set_args(knob.strip(), value, op), error

    def action_cancel(self) -> None:
        self.dismiss(None)


class CommandDone(Message):
    """A command's Future resolved. Futures resolve on the client's thread; this message
    carries the outcome to the app's, where widgets may be touched."""

    def __init__(self, cmd: str, future: Future) -> None:
        super().__init__()
        self.cmd, self.future = cmd, future


class ControlActions:
    """The app's control keys, mixed into ``NeurotopApp`` (which has ``client``, ``store``,
    ``read_only``, ``screen_name``, ``action_screen`` and ``redraw``). Every command's
    outcome is notified and logged."""

    client: LiveClient
    store: RunStore
    read_only: bool
    screen_name: str
    _knobs_asked = 0.0
    #: The run acknowledged ``stop``: the bar says STOPPING at once, before the telemetry's
    #: copy of the ack or a heartbeat says so, until the run ends.
    stop_acked = False

    def draw_controls(self, frame: Frame) -> None:
        panel = self.query_one(ControlPanel)
        if not panel.has_class("shown"):
            return
        panel.draw(frame)
        if not self.read_only and panel.wants_listing(frame) \
                and time.monotonic() - self._knobs_asked > 2.0:
            self._knobs_asked = time.monotonic()
            self.client.command("knobs")  # the listing comes back as telemetry, into the store

    def action_toggle_controls(self) -> None:
        if self.screen_name == "control":  # the panel is the whole screen: hiding it goes back
            self.action_screen("overview")
            return
        panel = self.query_one(ControlPanel)
        panel.toggle_class("shown")
        if panel.has_class("shown"):
            panel.query_one(DataTable).focus()
        self.redraw(force=True)

    def action_step_one(self) -> None:
        self.send("step", {"n": 1})

    def action_edit_knob(self) -> None:
        if self.read_only:
            self.notify("read-only: this view cannot change knobs", severity="warning")
            return
        panel = self.query_one(ControlPanel)
        spec = panel.selected() if panel.has_class("shown") else None
        if spec is None:
            self.notify("open the control panel (c) and pick a knob", severity="warning")
            return
        current = self.store.frame().knob_values.get(spec["name"], spec.get("value"))
        self.push_screen(KnobEditScreen(spec, current),
                         lambda args: self.send("set", args) if args else None)

    def action_stop_run(self) -> None:
        if not self.read_only:
            self.push_screen(ConfirmScreen("Stop the run? The training loop sees"
                                           " mon.should_stop at its next optimizer step."),
                             lambda yes: self.send("stop") if yes else None)
        else:
            self.send("stop")

    def action_snapshot(self) -> None:
        self.send("snapshot")

    def action_probe(self) -> None:
        """The curvature probe at the next boundary; its ack shows the numbers."""
        self.send("probe")

    def send(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        if self.read_only:
            self.notify(f"read-only: this view cannot {cmd}", severity="warning")
            return
        self.client.command(cmd, args).add_done_callback(
            lambda f: self.post_message(CommandDone(cmd, f)))

    def on_command_done(self, message: CommandDone) -> None:
        cmd = message.cmd
        try:
            ack = message.future.result()
        except CommandError as e:
            self.notify(f"{cmd} refused: {e}", severity="error", markup=False)
        else:
            self.stop_acked = self.stop_acked or cmd == "stop"
            new = "" if ack.get("new") is None else f": {fmt_value(ack['new'])}"
            self.notify(f"{cmd} took effect at step {ack.get('step')}{new}", markup=False)
        self.redraw(force=True)
