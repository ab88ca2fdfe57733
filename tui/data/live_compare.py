"""A live run overlaid on recorded ones (``neurotop attach --compare A.ntop [B.ntop ...]``).

The live run is the selected one: its header, layers table and control are the frame's,
as in a plain attach. Each recorded run is an overlay on the same plots (``Frame.runs``:
the live run first, then the files in the order named), its own colour and legend entry,
its knob changes marked. The reference of the layers table's difference column is the
first file named, as in ``neurotop replay A B``.

Aligned by step, as replay's other runs follow its cursor: every recorded run is shown up
to the live run's latest report, and the difference is from the reference's report at
that step (its last one at or before it). Recordings do not grow, so each is loaded once
and its series for a screen's ``Wants`` are copied out once (read-only arrays); a frame
then only cuts them at the live step (one ``searchsorted`` per series), so the overlay
costs the live frame little (README "Comparing runs" has the figure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from neurotop.tui.data.compare import knob_changes, run_names, with_difference
from neurotop.tui.data.frame import Frame, RunOverlay, Series, Wants
from neurotop.tui.data.ranks import Ranks
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.data.store import HEADER_ONLY, RunStore

#: Series of one recorded run kept for this many different ``Wants`` (screens, layers)
#: and statistics at most: a recording's copies are as large as the recording.
CACHED = 8


def _frozen(s: Series) -> Series:
    for a in s:
        a.flags.writeable = False
    return s


def _upto(s: Series, step: int) -> Series:
    """The points of ``s`` at steps up to ``step`` (views: the cached arrays are frozen)."""
    n = int(np.searchsorted(s[0], step, side="right"))
    return s[0][:n], s[1][:n]


@dataclass
class _Recorded:
    """One recorded run, loaded to its end; what the screens asked of it, by ``Wants``."""

    source: ReplaySource
    name: str
    knobs: tuple[tuple[int, str], ...]
    frames: dict[tuple, Frame] = field(default_factory=dict)
    stats: dict[str, Series] = field(default_factory=dict)

    def frame(self, wants: Wants) -> Frame:
        key = (wants.scalars, wants.envelope, wants.layer)
        f = self.frames.get(key)
        if f is None:
            if len(self.frames) >= CACHED:
                self.frames.clear()
            f = self.source.store.frame(wants)
            for s in (*f.scalars.values(), f.layer):
                _frozen(s)
            self.frames[key] = f
        return f

    def stat_at(self, stat: str, step: int) -> np.ndarray | None:
        """``stat`` of every layer in the report at ``step`` (its last one at or before;
        NaN before the first); None if the run does not report ``stat``."""
        sc = self.frame(HEADER_ONLY).schema
        if sc is None or stat not in sc.stats:
            return None
        s = self.stats.get(stat)
        if s is None:
            if len(self.stats) >= CACHED:
                self.stats.clear()
            s = self.stats[stat] = _frozen(self.source.store.stat_series(stat))
        row = int(np.searchsorted(s[0], step, side="right")) - 1
        return s[1][row] if row >= 0 else np.full(len(sc.layers), np.nan)


class LiveComparison:
    """The live store and the recorded runs as the app's store: ``version``,
    ``connection()`` and ``frame(wants)``, like ``RunStore`` and ``Comparison``."""

    def __init__(self, live: RunStore | Ranks, sources: Sequence[ReplaySource],
                 names: Sequence[str] | None = None) -> None:
        """``live``: the app's store face (a job's ``Ranks``: the selected rank is the
        live run). ``sources``: loaded (``ReplaySource.load``), not playing; the first is
        the reference. ``names``: the legend's (default: ``compare.run_names``)."""
        if not sources:
            raise ValueError("a live comparison needs at least one recorded run")
        names = list(names) if names is not None else run_names(sources)
        self.live = live
        self.recorded = [_Recorded(s, n, knob_changes(s.events()))
                         for s, n in zip(sources, names, strict=True)]
        #: Per live store (a job's ranks), its knob changes as its acks arrive and the
        #: last event looked at.
        self._knobs: dict[int, tuple[list[tuple[int, str]], dict[str, Any] | None]] = {}

    @property
    def reference(self) -> ReplaySource:
        return self.recorded[0].source

    @property
    def version(self) -> int:
        """The live store's: the recordings do not change."""
        return self.live.version

    def connection(self) -> str:
        return self.live.connection()

    def store(self) -> RunStore:
        """The live run's store (in a job, the selected rank's)."""
        return self.live.store if isinstance(self.live, Ranks) else self.live

    def live_name(self) -> str:
        """The live run's legend entry: its name, marked ``(live)`` if a recording has it."""
        s = self.store().status
        name = s.run_name or s.run_id or "live"
        return f"{name} (live)" if any(r.name == name for r in self.recorded) else name

    def _live_knobs(self) -> tuple[tuple[int, str], ...]:
        """The live run's ``set`` acks so far: the store keeps its last events only, so
        they are collected as they arrive (only the events after the last one seen)."""
        store = self.store()
        knobs, seen = self._knobs.get(id(store), ([], None))
        with store.lock:
            evs = store.status.events
            if evs and evs[-1] is not seen:
                i = len(evs)
                while i > 0 and evs[i - 1] is not seen:
                    i -= 1
                knobs += knob_changes([(int(h.get("step") or 0), h) for h in evs[i:]])
                self._knobs[id(store)] = (knobs, evs[-1])
        return tuple(knobs)

    def frame(self, wants: Wants = HEADER_ONLY) -> Frame:
        store = self.store()
        with store.lock:  # the live frame and its last report's step alike
            frame = self.live.frame(wants)
            steps = store.steps()
        step = int(steps[-1]) if len(steps) else frame.status.step
        sc = frame.schema
        layer = sc.layer_or_first(wants.layer or "") \
            if sc is not None and wants.layer is not None else None
        overlays = [RunOverlay(
            name=self.live_name(), scalars=frame.scalars, knobs=self._live_knobs(),
            layer=frame.layer, stats=sc.stats if sc is not None and frame.layer[1].size
            else (), reference=False, selected=True)]
        for k, r in enumerate(self.recorded):
            rsc = r.frame(HEADER_ONLY).schema
            has = layer is not None and rsc is not None and layer in rsc.layers
            f = r.frame(Wants(scalars=wants.scalars, envelope=wants.envelope,
                              layer=layer if has else None))
            lx, ly = _upto(f.layer, step)
            overlays.append(RunOverlay(
                name=r.name, scalars={n: _upto(s, step) for n, s in f.scalars.items()},
                knobs=tuple(m for m in r.knobs if m[0] <= step), layer=(lx, ly),
                stats=rsc.stats if rsc is not None and ly.size else (),
                reference=k == 0, selected=False))
        frame = replace(frame, runs=tuple(overlays))
        if wants.trend is not None:
            ref = self.recorded[0]
            rsc = ref.frame(HEADER_ONLY).schema
            frame = with_difference(frame, wants.trend[0], rsc.layers if rsc else (),
                                    lambda stat: ref.stat_at(stat, step))
        return frame
