"""A recorded session as a source for the live UI: it fills a ``RunStore`` as a live client
does, from its own thread, and moves a cursor through the recording.

The whole recording is loaded once (with ``StoreLoader``); the cursor then only changes
how many stats rows the store shows, which events are listed, and which heartbeat the
header reflects, so seeking anywhere is cheap. Going back over something that cannot be
rewound that way (a change of layers, or a message kind the store keeps its own series
for) reloads from the start up to the cursor. Control commands are refused.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import KIND_CODES, MESSAGE, SessionReader, decode_message
from neurotop.tui.data.client import CommandError
from neurotop.tui.data.sessionload import StoreLoader
from neurotop.tui.data.store import RunStore, alert_counts

#: Playback speeds, in recorded seconds per second; ``inf`` is "max" (see ``MAX_TICKS``).
SPEEDS = (1.0, 2.0, 5.0, 10.0, 30.0, 100.0, 1000.0, math.inf)
TICK_S = 0.05
#: At "max" speed the whole recording plays in this many ticks, whatever its length.
MAX_TICKS = 100
#: Longer stretches without messages (the run was paused, or stalled) play this long.
MAX_GAP_S = 2.0
_MARKER_CODES = (KIND_CODES["event"], KIND_CODES["alert"])


def is_alert(event: dict[str, Any]) -> bool:
    """Alerts and commands are both events on the timeline; alerts are marked apart."""
    return event.get("kind") == "alert" or event.get("event") == "alert"


@dataclass(frozen=True)
class Timeline:
    """What the timeline bar shows, at one moment; compared to decide whether to redraw."""

    playing: bool
    speed: float
    step: int
    first_step: int
    last_step: int
    fraction: float
    time: float
    markers: tuple[tuple[float, bool], ...]  # (fraction, is an alert)
    dropped: int
    problems: int
    landed: str = ""  # the event the last ``[`` / ``]`` landed on, until the cursor moves


def describe_event(event: dict[str, Any]) -> str:
    """One event as the timeline names it: ``alert dying_layer (warn)``, ``pause ✓``."""
    if is_alert(event):
        return f"▲ {event.get('alert', '?')} ({event.get('level') or 'warn'})"
    cmd = event.get("cmd") or event.get("event") or "?"
    if event.get("event") == "ack":
        return f"◆ {cmd} {'✓' if event.get('ok') else '✗ refused'}"
    return f"◆ {event.get('event')}: {event.get('reason') or cmd}"


class ReplaySource:
    """Plays a session file into a store; looks like a ``LiveClient`` that cannot control."""

    gone = ""  # a recording is there from the start (``LiveClient.gone``)

    def __init__(self, path: str | Path) -> None:
        self.reader = SessionReader(path)  # a clear error now, before any UI starts
        self.path = Path(path)
        self.store = RunStore(window=None)  # every row: seeking shows any of them
        meta = self.reader.meta
        self.store.set_status(replay=True, control=False, run_id=str(meta.get("run_id", "")),
                              run_name=str(meta.get("name", "")))
        ix = self.reader.index
        msg = ix["type"] == MESSAGE
        self._last = len(ix) - 1
        self._stats_pos = np.flatnonzero(msg & (ix["kind"] == KIND_CODES["stats"]))
        steps = ix["step"][self._stats_pos]
        self._stats_steps = np.maximum.accumulate(steps) if len(steps) else steps
        self._hb_pos = np.flatnonzero(msg & (ix["kind"] == KIND_CODES["heartbeat"]))
        marks = msg & np.isin(ix["kind"], _MARKER_CODES)
        self._marker_pos = np.flatnonzero(marks)
        # Kinds _show() can show as of any moment; any other kind (a store series of its
        # own) makes going back over it reload up to the cursor.
        rewindable = [KIND_CODES[k] for k in ("schema", "stats", "heartbeat", "event")]
        self._unrewindable = np.flatnonzero(msg & ~np.isin(ix["kind"], rewindable))
        t = ix["t"].astype(np.float64)
        t = np.maximum.accumulate(np.where(t > 0, t, 0.0)) if len(t) else t
        self._time = t
        gaps = np.clip(np.diff(t), 0.0, MAX_GAP_S) if len(t) else t
        self._clock = np.concatenate([[0.0], np.cumsum(gaps)]) if len(t) else t
        self._markers: tuple[tuple[float, bool], ...] = ()
        self._loader = StoreLoader(self.store, reserve=len(self._stats_pos))
        self._rows = np.empty(0, np.int64)
        self._cursor = self._hi = -1
        self._hb_applied = -1
        self._hb_msg: wire.Message | None = None
        self._playing = False
        self._speed_i = 0
        self._landed = ""
        self._anchor = (0.0, 0.0)  # (monotonic time, recorded clock) when play started
        self._loaded = False
        self._todo: queue.Queue[tuple[Callable[[], None], Future | None]] = queue.Queue()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neurotop-replay", daemon=True)
        self._state_lock = threading.Lock()
        self._timeline = self._timeline_state()

    # -- the LiveClient face --------------------------------------------------------------

    can_control = False

    def start(self) -> ReplaySource:
        """Load the recording (here, before any UI competes for the interpreter: that is
        faster than loading behind it), then play it from the replay thread."""
        self.load()
        self._thread.start()
        return self

    def close(self) -> None:
        self._halt.set()
        self._todo.put((lambda: None, None))
        if self._thread.is_alive():
            self._thread.join(5)
        self.reader.close()

    def command(self, cmd: str, args: dict[str, Any] | None = None,
                timeout: float = 10.0) -> Future:
        fut: Future = Future()
        fut.set_exception(CommandError("this is a replay: a recording cannot be controlled"))
        return fut

    @property
    def problems(self) -> list[str]:
        return list(self.reader.problems)

    def row_times(self) -> np.ndarray:
        """When the agent published each of the store's stats rows (Unix seconds)."""
        return self.reader.index["t"][np.asarray(self._loader.rows, np.int64)]

    def events(self) -> list[tuple[int, dict[str, Any]]]:
        """Every command ack and alert as ``(step, header)``, in order."""
        return [(self._step_at(p), h) for p, h in self._loader.events]

    # -- what the UI calls (any thread) ---------------------------------------------------

    def timeline(self) -> Timeline:
        with self._state_lock:
            return self._timeline

    # Each returns a Future that resolves to the timeline once the store shows the change.

    def play_pause(self) -> Future:
        return self._ask(self._toggle_play)

    def faster(self) -> Future:
        return self._ask(lambda: self._set_speed(self._speed_i + 1))

    def slower(self) -> Future:
        return self._ask(lambda: self._set_speed(self._speed_i - 1))

    def seek_step(self, step: int) -> Future:
        return self._ask(lambda: self._goto(self._pos_of_step(step)))

    def seek_fraction(self, f: float) -> Future:
        tl = self.timeline()
        return self.seek_step(round(tl.first_step + min(max(f, 0.0), 1.0)
                                    * (tl.last_step - tl.first_step)))

    def scrub(self, df: float) -> Future:
        """Move by ``df`` of the recording's steps (negative: back)."""
        return self._ask(lambda: self._scrub(df))

    def jump_marker(self, direction: int) -> Future:
        """To the next (``+1``) or previous (``-1``) command or alert."""
        return self._ask(lambda: self._jump(direction))

    def to_start(self) -> Future:
        return self._ask(lambda: self._goto(self._pos_of_step(self._first_step())))

    def to_end(self) -> Future:
        return self._ask(lambda: self._goto(self._last))

    def _ask(self, fn: Callable[[], None]) -> Future:
        fut: Future = Future()
        self._todo.put((fn, fut))
        return fut

    # -- the replay thread: the store's only writer ---------------------------------------

    def load(self) -> None:
        """Load the whole recording and put the cursor at its end."""
        if not self._loaded:
            self._load(-1, self._last)
            self._cursor = self._last
            first = self._first_step()
            span = max(1, (int(self._stats_steps[-1]) if len(self._stats_steps) else 0) - first)
            self._markers = tuple(((self._step_at(p) - first) / span, is_alert(h))
                                  for p, h in self._loader.events)
            self._show()
            self._loaded = True
            self._publish()

    def _run(self) -> None:
        while not self._halt.is_set():
            done: list[Future] = []
            try:
                fn, fut = self._todo.get(timeout=TICK_S if self._playing else None)
                while True:  # apply everything the UI asked for before drawing anything
                    fn()
                    if fut is not None:
                        done.append(fut)
                    fn, fut = self._todo.get_nowait()
            except queue.Empty:
                pass
            if self._playing:
                self._tick()
            self._publish()
            for fut in done:
                fut.set_result(self._timeline)
        while True:  # closed: nobody waits forever
            try:
                _, fut = self._todo.get_nowait()
            except queue.Empty:
                return
            if fut is not None:
                fut.cancel()

    def _load(self, a: int, b: int) -> None:
        """Apply every message after position ``a`` up to ``b`` (heartbeats aside)."""
        ix = self.reader.index
        sel = np.arange(a + 1, b + 1)
        sel = sel[(ix["type"][sel] == MESSAGE) & (ix["kind"][sel] != KIND_CODES["heartbeat"])]
        for chunk in self.reader.chunks(sel):
            self._loader.add_chunk(chunk)
        self._loader.flush()
        self._rows = np.asarray(self._loader.rows, np.int64)
        self._hi = b

    def _goto(self, p: int) -> None:
        p = min(max(p, -1), self._last)
        c = self._cursor
        if p < c:
            blocked = self._unrewindable[(self._unrewindable > p) & (self._unrewindable <= c)]
            resets = [r for r in self._loader.resets if p < r <= c]
            if len(blocked) or resets:
                self.store.reset()
                self._loader = StoreLoader(self.store, reserve=len(self._stats_pos))
                self._load(-1, p)
        elif p > self._hi:
            self.store.show_rows(self.store.filled_rows())  # append after every loaded row
            self._load(self._hi, p)
        self._cursor = p
        self._landed = ""
        self._show()

    def _show(self) -> None:
        """Make the store show the recording as it was at the cursor."""
        p = self._cursor
        i = int(np.searchsorted(self._hb_pos, p, side="right")) - 1
        hb = int(self._hb_pos[i]) if i >= 0 else -1
        if hb != self._hb_applied:
            self._hb_applied, self._hb_msg = hb, None
            for rec in self.reader.records(np.array([hb]) if hb >= 0 else np.empty(0, int)):
                try:
                    self._hb_msg = decode_message(rec.body)
                except (wire.WireError, ValueError) as e:
                    self.store.note_error(f"undecodable recorded heartbeat: {e}")
        if self._hb_msg is not None:  # every time: acks after it may have been undone
            self.store.ingest(self._hb_msg, count_gaps=False)
        for pos, h in self._loader.events:  # acks since that heartbeat: paused, resumed
            if hb < pos <= p and not is_alert(h):  # (alerts change no state)
                self.store.ingest(wire.Message(h), count_gaps=False)
        rows = int(np.searchsorted(self._rows, p, side="right"))
        past = [h for pos, h in self._loader.events if pos <= p]
        # Events and their count as of the cursor, set, not added: every seek and every
        # replay pass goes over the same events again.
        self.store.set_status(events=past[-500:], alerts=alert_counts(past))
        self.store.show_rows(rows)

    def _tick(self) -> None:
        if self._cursor >= self._last:
            self._playing = False
            return
        speed = SPEEDS[self._speed_i]
        if math.isinf(speed):
            p = self._cursor + max(1, (self._last + 1) // MAX_TICKS)
        else:
            t0, clock0 = self._anchor
            target = clock0 + speed * (time.monotonic() - t0)
            p = max(self._cursor, int(np.searchsorted(self._clock, target, side="right")) - 1)
        self._goto(p)
        if self._cursor >= self._last:
            self._playing = False

    def _toggle_play(self) -> None:
        if not self._playing and self._cursor >= self._last:
            self._goto(self._pos_of_step(self._first_step()))  # play again from the start
        self._playing = not self._playing
        self._reanchor()

    def _set_speed(self, i: int) -> None:
        self._speed_i = min(max(i, 0), len(SPEEDS) - 1)
        self._reanchor()

    def _reanchor(self) -> None:
        clock = float(self._clock[self._cursor]) if self._cursor >= 0 else 0.0
        self._anchor = (time.monotonic(), clock)

    def _scrub(self, df: float) -> None:
        tl = self._timeline_state()
        span = max(1, tl.last_step - tl.first_step)
        self._goto(self._pos_of_step(tl.step + round(df * span)))
        self._reanchor()

    def _jump(self, direction: int) -> None:
        m = self._marker_pos
        k = int(np.searchsorted(m, self._cursor, side="right" if direction > 0 else "left"))
        k = k if direction > 0 else k - 1
        if 0 <= k < len(m):
            self._goto(int(m[k]))
            events = dict(self._loader.events)
            h = events.get(int(m[k]))
            what = describe_event(h) if h is not None else "event"
            self._landed = f"{what} @ step {self._step_at(int(m[k])):,} ({k + 1}/{len(m)})"
        else:
            self._landed = f"no {'later' if direction > 0 else 'earlier'} event"
        self._reanchor()

    def _pos_of_step(self, step: int) -> int:
        """The last stats message at or before ``step`` (the first one if ``step`` is
        before the recording)."""
        if not len(self._stats_pos):
            return self._last
        i = max(int(np.searchsorted(self._stats_steps, step, side="right")) - 1, 0)
        if i == len(self._stats_pos) - 1:
            return self._last if step >= self._stats_steps[-1] else int(self._stats_pos[i])
        return int(self._stats_pos[i + 1]) - 1  # also whatever came before the next step

    # -- the timeline's state -------------------------------------------------------------

    def _step_at(self, p: int) -> int:
        i = int(np.searchsorted(self._stats_pos, p, side="right")) - 1
        return int(self._stats_steps[i]) if i >= 0 else self._first_step()

    def _first_step(self) -> int:
        return int(self._stats_steps[0]) if len(self._stats_steps) else 0

    def _timeline_state(self) -> Timeline:
        first = self._first_step()
        last = int(self._stats_steps[-1]) if len(self._stats_steps) else 0
        span = max(1, last - first)
        step = self._step_at(self._cursor)
        return Timeline(
            playing=self._playing,
            speed=SPEEDS[self._speed_i], step=step, first_step=first, last_step=last,
            fraction=(step - first) / span,
            time=float(self._time[self._cursor]) if self._cursor >= 0 else 0.0,
            markers=self._markers, dropped=self.reader.dropped, problems=len(self.reader.problems),
            landed=self._landed)

    def _publish(self) -> None:
        tl = self._timeline_state()
        with self._state_lock:
            self._timeline = tl
