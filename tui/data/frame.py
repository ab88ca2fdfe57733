"""One redraw's worth of a run: the store copies it under one hold of its lock, the screens
draw from it and never from the store (whose receiver thread would change what they read
half-way through a redraw).

``Wants`` says which series the visible screen draws, so a frame copies only those; the
header, the knobs and the latest reports come with every frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from neurotop.tui.data.store import RunState

#: (steps, values) of one series; values are ``[rows]`` or ``[rows x columns]``.
Series = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True, eq=False)
class Schema:
    """What the run reports, from its schema message and the statistics engine's extras.
    The choices a screen falls back on live here too, so the store (filling a frame) and
    the widgets (drawing it) resolve a view's choice alike."""

    layers: tuple[str, ...]
    stats: tuple[str, ...]
    scalars: tuple[str, ...]
    params: tuple[str, ...]
    param_stats: tuple[str, ...]
    hist_layers: tuple[str, ...]
    hist_edges: np.ndarray  # read-only
    layer_types: tuple[str, ...]
    #: Per layer, the activation it computes or feeds when it is not an activation module
    #: (``"F.relu"``), else ""; older schemas send none.
    activations: tuple[str, ...] = ()
    #: Per layer, the most calls seen in one forward (a module used at two places: 2);
    #: older schemas send none.
    calls: tuple[int, ...] = ()

    def stat_or_default(self, stat: str) -> str:
        """``stat`` if the run reports it, else the one worth seeing first: the dead, then
        the zero fraction of units, else the last statistic."""
        if stat in self.stats or not self.stats:
            return stat
        return next((s for s in ("dead_frac", "zero_frac") if s in self.stats), self.stats[-1])

    def layer_or_first(self, layer: str) -> str:
        return layer if layer in self.layers else (self.layers[0] if self.layers else "")

    def scalars_named(self, *names: str) -> tuple[str, ...]:
        """What a plot of ``names`` draws: the first the run reports; with several
        optimizers, which report ``lr.G``, ``lr.D`` (and ``lr.G.1`` for G's second param
        group) but no ``lr``, each optimizer's first group."""
        for n in names:
            if n in self.scalars:
                return (n,)
        for n in names:
            per = tuple(h for h in self.scalars if h.startswith(n + ".")
                        and "." not in h[len(n) + 1:] and not h[len(n) + 1:].isdigit())
            if per:
                return per
        one = self.scalar_named(*names)
        return (one,) if one else ()

    def scalar_named(self, *names: str) -> str:
        """The first scalar of ``names`` (or starting with one of them) the run reports."""
        for n in names:
            if n in self.scalars:
                return n
        for n in names:
            for h in self.scalars:
                if h.startswith(n):
                    return h
        return ""


@dataclass(frozen=True)
class Wants:
    """The series a screen draws beyond the header (``None``: not drawn). Statistics and
    layers are the view's choices; the store resolves them with ``Schema``'s fallbacks."""

    scalars: tuple[tuple[str, ...], ...] = ()  # plots: each the first of its names reported
    envelope: bool = False  # compacted buckets of the scalars as min and max (raw plots)
    heat: str | None = None  # a statistic of every layer over the run (the heat strip)
    trend: tuple[str, int] | None = None  # a statistic's last columns (the table's trend)
    layer: str | None = None  # a layer's statistics over the run and its histograms
    param_stat: str | None = None  # a per-parameter statistic over every report
    events: int = 0  # the last events (the alert feed, the command log)


@dataclass(frozen=True, eq=False)
class RunOverlay:
    """One run of a comparison (``tui/data/compare.py``): its series of the frame's
    ``Wants`` and the knob changes it recorded, for the plots to draw over each other."""

    name: str
    scalars: Mapping[str, Series]
    knobs: tuple[tuple[int, str], ...]  # (step, "lr=0.1") of each applied ``set``
    #: The wanted layer's statistics over the run (its ``stats``), if the run has a layer
    #: of that name; else empty.
    layer: Series
    stats: tuple[str, ...]
    reference: bool  # the first run named: the layers table's difference is from it
    selected: bool  # the run whose header and layers the frame is


@dataclass(frozen=True, eq=False)
class Frame:
    """The run at one moment, as one redraw shows it. Nothing in it is shared with the
    store: the arrays are copies and ``status`` is a copy whose ``events`` are the last
    ``Wants.events``. Series not wanted are empty."""

    version: int  # the store's version it was copied at
    connection: str  # live | stale | waiting | ended | replay
    schema: Schema | None
    status: RunState
    knobs: tuple[dict[str, Any], ...]  # the last `knobs` listing (types, bounds, docs)
    knob_values: Mapping[str, Any]  # current values, from the latest heartbeat
    #: Knobs an operator pinned against the script: ``{"value", "targets", "overridden"
    #: (writes by the script undone), "script" (what it last wrote)}``, by knob name.
    knob_pins: Mapping[str, Any]
    latest: np.ndarray | None  # ``[layers x stats]`` of the latest report
    latest_params: tuple[int, np.ndarray] | None  # its step and ``[params x param_stats]``
    scalars: Mapping[str, Series]  # by the name ``Schema.scalar_named`` resolved
    heat: Series  # steps and ``[rows x layers]`` (buckets as their max)
    trend: np.ndarray  # ``[layers x columns]`` (buckets as means)
    layer: Series  # steps and ``[rows x stats]`` of the wanted layer (buckets as means)
    histogram: dict[str, Any] | None  # its latest histograms: step, edges, act, grad
    hist_series: Series  # steps and ``[reports x bins]`` of its activations' histograms
    param_series: Series  # steps and ``[params x reports]``
    #: Every run of a comparison, in the order named (empty: one run).
    runs: tuple[RunOverlay, ...] = ()
