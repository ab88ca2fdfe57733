"""``neurotop replay``: the live app's screens over a recording, plus a timeline bar.

``ReplayApp`` is ``NeurotopApp`` with a ``ReplaySource`` in place of the live client:
the same store, widgets and redraw timer. It adds the timeline (play/pause, speed,
seek, scrub, jump between commands and alerts) and has no control: ``space`` plays and
pauses the playback, not the run. Given a ``Comparison`` (``neurotop replay A B``), it draws
several recordings overlaid, the timeline being the reference's; ``r`` selects the run whose
header and layers show.
"""

from __future__ import annotations

import time
from dataclasses import replace

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from neurotop.tui.data.compare import Comparison
from neurotop.tui.data.ranks import Ranks
from neurotop.tui.data.replay_source import ReplaySource, Timeline
from neurotop.tui.screens.app import HelpScreen, NeurotopApp
from neurotop.tui.screens.widgets import KeyBar, fit_parts


def speed_label(speed: float) -> str:
    return "max" if speed == float("inf") else f"{speed:g}x"


class TimelineBar(Static):
    """Where the cursor is in the recording, with a mark at every command and alert.
    Click or drag on the bar to seek."""

    DEFAULT_CSS = "TimelineBar { height: 2; background: $boost; padding: 0 1; }"

    class Seek(Message):
        def __init__(self, fraction: float) -> None:
            super().__init__()
            self.fraction = fraction

    def draw(self, tl: Timeline) -> None:
        width = max(10, (self.size.width or 80) - 2)
        state = "▶ PLAY" if tl.playing else "⏸ PAUSE"
        commands = sum(1 for _, alert in tl.markers if not alert)
        alerts = len(tl.markers) - commands
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(tl.time)) if tl.time else ""
        # One line, by priority (``fit_parts``): it never wraps and pushes the bar away.
        parts = [
            (0, Text(f" {state} ", style="bold black on cyan")),
            (0, Text(speed_label(tl.speed), style="bold")),
            (0, Text(f"step {tl.step:,} / {tl.last_step:,}")),
            (1, Text(tl.landed, style="bold")),
            (1, Text(f"▲ {alerts} alerts" if alerts else "", style="red")),
            (2, Text(f"◆ {commands} commands", style="yellow")),
            (1, Text(f"damaged: {tl.problems} (see stderr on exit)" if tl.problems else "",
                     style="red")),
            (2, Text(f"rec-dropped: {tl.dropped}" if tl.dropped else "", style="yellow")),
            (3, Text(when)),
        ]
        info = fit_parts([p for p in parts if p[1].plain], width)
        cells = ["─"] * width
        cur = round(tl.fraction * (width - 1))
        for i in range(cur):
            cells[i] = "━"
        styles = ["cyan" if i < cur else "dim" for i in range(width)]
        for f, alert in tl.markers:
            i = min(width - 1, max(0, round(f * (width - 1))))
            cells[i], styles[i] = ("▲", "bold red") if alert else ("◆", "bold yellow")
        cells[cur], styles[cur] = "●", "bold white"
        bar = Text()
        for c, s in zip(cells, styles, strict=True):
            bar.append(c, style=s)
        self.update(Text("\n").join([info, bar]))

    def _seek_at(self, x: int) -> None:
        width = max(10, (self.size.width or 80) - 2)
        self.post_message(self.Seek(min(max((x - 1) / (width - 1), 0.0), 1.0)))

    def on_mouse_down(self, event: events.MouseDown) -> None:
        self.capture_mouse()
        self._seek_at(event.x)

    def on_mouse_move(self, event: events.MouseMove) -> None:
        if event.button and self.app.mouse_captured is self:
            self._seek_at(event.x)

    def on_mouse_up(self, event: events.MouseUp) -> None:
        self.release_mouse()


class GotoStep(ModalScreen[int | None]):
    """Ask for a step to seek to."""

    BINDINGS = [Binding("escape", "dismiss(None)", "cancel")]
    DEFAULT_CSS = """
    GotoStep { align: center middle; }
    GotoStep > Input { width: 40; border: round $accent; }
    """

    def compose(self) -> ComposeResult:
        yield Input(placeholder="go to step (Enter)", type="integer", id="step")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            self.dismiss(int(event.value))
        except ValueError:
            self.notify(f"not a step: {event.value!r}", severity="error", markup=False)


class ReplayApp(NeurotopApp):
    """The live screens over a ``ReplaySource``, with the timeline bar."""

    BINDINGS = [
        Binding("space", "play_pause", "play/pause"),  # the playback, never the run
        Binding("left", "scrub(-0.01)", "back", priority=True),
        Binding("right", "scrub(0.01)", "forward", priority=True),
        Binding("shift+left", "scrub(-0.1)", show=False, priority=True),
        Binding("shift+right", "scrub(0.1)", show=False, priority=True),
        Binding("home", "to_start", show=False, priority=True),
        Binding("end", "to_end", show=False, priority=True),
        Binding("minus", "slower", "slower"),
        Binding("plus,equals_sign", "faster", "faster"),
        Binding("left_square_bracket", "marker(-1)", "prev event"),
        Binding("right_square_bracket", "marker(1)", "next event"),
        Binding("g", "goto", "go to step"),
        Binding("r", "next_run", "next run"),  # comparing runs: whose header and layers
    ]

    def __init__(self, source: ReplaySource, compare: Comparison | None = None,
                 ranks: Ranks | None = None) -> None:
        """``compare``: several runs overlaid (``source`` its reference, whose timeline
        the bar shows and the other runs follow); the screens read it as their store.
        ``ranks``: a job's recording, every rank's (``ReplayRanks``, ``source`` rank 0's)."""
        super().__init__(source, read_only=True, ranks=ranks)  # type: ignore[arg-type]
        self.source = source
        self.compare = compare
        # ``r`` (the next run, or without a comparison the next rank) stays out of the key
        # bar, as it always was drawn; the help lists it.
        keys = self._bindings.key_to_bindings
        keys["r"] = [replace(b, show=False) for b in keys.get("r", [])]
        if compare is not None:
            self.store = compare  # type: ignore[assignment]  # a store's reading face
            self.frame = compare.frame()
        self._timeline_drawn: Timeline | None = None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "next_run":  # without a comparison, ``r`` is the next rank
            return True
        return super().check_action(action, parameters)

    def action_next_run(self) -> None:
        if self.compare is not None:
            self.notify(f"run: {self.compare.select_next()}", timeout=2)
            self.redraw(force=True)
        else:
            self.action_next_rank()

    def compose(self) -> ComposeResult:
        for w in super().compose():
            if isinstance(w, KeyBar):
                yield TimelineBar(id="timeline")
            yield w

    def on_mount(self) -> None:
        super().on_mount()
        for problem in self.source.problems[:3]:
            self.notify(problem, title="damaged session file", severity="warning", timeout=10,
                        markup=False)

    def redraw(self, force: bool = False) -> None:
        if self.compare is not None:  # the other runs to the reference's step, if it moved
            self.compare.align()
        super().redraw(force)
        tl = self.source.timeline()
        bar = self.query(TimelineBar)  # none while the app closes: its widgets are gone
        if bar and (tl != self._timeline_drawn or force):
            self._timeline_drawn = tl
            bar.first().draw(tl)

    # -- actions --------------------------------------------------------------------------

    def action_play_pause(self) -> None:
        self.source.play_pause()

    def action_scrub(self, df: float) -> None:
        self.source.scrub(df)

    def action_to_start(self) -> None:
        self.source.to_start()

    def action_to_end(self) -> None:
        self.source.to_end()

    def action_slower(self) -> None:
        self.source.slower()

    def action_faster(self) -> None:
        self.source.faster()

    def action_marker(self, direction: int) -> None:
        self.source.jump_marker(direction)

    def action_goto(self) -> None:
        self.push_screen(GotoStep(), lambda step: step is None or self.source.seek_step(step))

    def on_timeline_bar_seek(self, message: TimelineBar.Seek) -> None:
        self.source.seek_fraction(message.fraction)

    def action_help(self) -> None:
        rows = [("space", "play / pause the playback"),
                ("← →", "scrub 1% (shift: 10%); click or drag the bar"),
                ("home end", "start / end of the recording"),
                ("- +", "playback speed (1x … max)"),
                ("[ ]", "previous / next command or alert (the bar names it)"),
                ("g", "go to a step"),
                *((("r", "comparing runs: the next run's header and layers (Δ from the"
                        " first)"),) if self.compare is not None else ()),
                *((keys, text) for keys, _, text in self.VIEW_HELP), ("q", "quit")]
        self.push_screen(HelpScreen(rows, self.own_scalars()))
