"""Several recorded runs on the same screens (``neurotop replay A B ...``): one store per run,
and a ``Comparison`` that the app reads in place of one store.

Each frame is the selected run's (its header, its layers table), plus every run's series of
the same ``Wants`` (``Frame.runs``) for the plots to overlay, aligned by step, and each run's
knob changes (its recorded ``set`` acks). The layers table gets one more column: the chosen
statistic's difference from the reference run (the first one named), layer by layer name.
The other runs follow the reference's cursor, so scrubbing moves every run to the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from neurotop.tui.data.frame import Frame, RunOverlay, Wants
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.data.store import HEADER_ONLY

#: The prefix of the difference columns the layers table shows (``Δdead_frac``).
DELTA = "Δ"


def knob_changes(events: Sequence[tuple[int, dict[str, Any]]]) -> tuple[tuple[int, str], ...]:
    """The ``set`` commands a run applied, as ``(step, "lr=0.1")``."""
    out = []
    for step, h in events:
        if h.get("event") == "ack" and h.get("cmd") == "set" and h.get("ok"):
            args = h.get("args") or {}
            value = h.get("new", args.get("value"))
            out.append((int(h.get("step") or step), f"{args.get('knob', '?')}={value}"))
    return tuple(out)


def run_names(sources: Sequence[ReplaySource]) -> list[str]:
    """What the legend calls each run: its recorded name, else its file's directory; the
    same name twice gets ``#2``."""
    names: list[str] = []
    for s in sources:
        base = s.store.status.run_name or s.path.parent.name or s.path.stem
        names.append(base if base not in names else f"{base}#{names.count(base) + 1}")
    return names


@dataclass(frozen=True)
class _Run:
    source: ReplaySource
    name: str
    knobs: tuple[tuple[int, str], ...]


class Comparison:
    """The runs as the app's store: ``version``, ``connection()`` and ``frame(wants)``."""

    def __init__(self, sources: Sequence[ReplaySource],
                 names: Sequence[str] | None = None) -> None:
        if len(sources) < 1:
            raise ValueError("a comparison needs at least one run")
        names = list(names) if names is not None else run_names(sources)
        self.runs = [_Run(s, n, knob_changes(s.events())) for s, n in zip(sources, names,
                                                                          strict=True)]
        #: The run whose header and layers the screens show; the second one first, so the
        #: difference column says something from the start.
        self.selected = 1 if len(sources) > 1 else 0
        self._picks = 0
        self._aligned = -1

    @property
    def reference(self) -> ReplaySource:
        return self.runs[0].source

    @property
    def version(self) -> int:
        """Changes whenever any run's store does, or the selection."""
        return sum(r.source.store.version for r in self.runs) + self._picks

    def connection(self) -> str:
        return self.runs[self.selected].source.store.connection()

    def select_next(self) -> str:
        """Select the next run (for the header and the layers table); its name."""
        self.selected = (self.selected + 1) % len(self.runs)
        self._picks += 1
        return self.runs[self.selected].name

    def align(self) -> None:
        """Move every other run to the reference's step (once per step it moves to)."""
        step = self.reference.timeline().step
        if step != self._aligned:
            self._aligned = step
            for r in self.runs[1:]:
                r.source.seek_step(step)

    def frame(self, wants: Wants = HEADER_ONLY) -> Frame:
        self.align()
        sel = self.runs[self.selected]
        frame = sel.source.store.frame(wants)
        # The other runs' layer of the name the selected run's frame shows (none if they
        # have no such layer: the store would fall back on their first).
        layer = frame.schema.layer_or_first(wants.layer or "") \
            if frame.schema is not None and wants.layer is not None else None
        overlays = []
        for k, r in enumerate(self.runs):
            if k == self.selected:
                f = frame
            else:
                sc = r.source.store.frame().schema
                has = layer is not None and sc is not None and layer in sc.layers
                f = r.source.store.frame(Wants(scalars=wants.scalars, envelope=wants.envelope,
                                               layer=layer if has else None))
            overlays.append(RunOverlay(
                name=r.name, scalars=f.scalars, knobs=r.knobs, layer=f.layer,
                stats=f.schema.stats if f.schema is not None and f.layer[1].size else (),
                reference=k == 0, selected=k == self.selected))
        frame = replace(frame, version=self.version, runs=tuple(overlays))
        if wants.trend is not None:
            frame = self._with_difference(frame, wants.trend[0])
        return frame

    def _with_difference(self, frame: Frame, stat: str) -> Frame:
        """The selected run's latest report with one more column: ``stat`` less the
        reference's, for the layers of the same name (NaN for a layer it lacks)."""
        ref = self.reference.store.frame()
        rsc, latest = ref.schema, ref.latest
        if rsc is None or latest is None:
            return frame
        return with_difference(frame, stat, rsc.layers, lambda s: latest[
            :, rsc.stats.index(s)] if s in rsc.stats else None)


def with_difference(frame: Frame, stat: str, ref_layers: Sequence[str],
                    ref_values: Callable[[str], np.ndarray | None]) -> Frame:
    """``frame``'s latest report with one more column: ``stat`` less the reference's
    (``ref_values(stat)``: one value per layer of ``ref_layers``, None where it does not
    report ``stat``), for the layers of the same name (NaN for a layer it lacks). Shared by
    replay's ``Comparison`` and the live one (``live_compare.py``)."""
    sc = frame.schema
    if sc is None or frame.latest is None:
        return frame
    stat = sc.stat_or_default(stat.removeprefix(DELTA))
    ref = ref_values(stat) if stat in sc.stats else None
    if ref is None:
        return frame
    mine = frame.latest[:, sc.stats.index(stat)].astype(np.float64)
    theirs = np.full(len(sc.layers), np.nan)
    where = {n: i for i, n in enumerate(ref_layers)}
    for i, n in enumerate(sc.layers):
        if n in where:
            theirs[i] = ref[where[n]]
    block = np.column_stack([frame.latest, (mine - theirs).astype(frame.latest.dtype)])
    return replace(frame, schema=replace(sc, stats=(*sc.stats, DELTA + stat)),
                   latest=block)
