"""The UI's data: plain NumPy series filled by the receiver, read by the widgets' timer.

One writer (the client's receiver thread), many readers (the redraw timer). The timer
takes one ``Frame`` per redraw, copied under one hold of the lock, so widgets never see a
half-applied message (nor one field from before a message and the next from after it)
and never parse anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from neurotop.protocol import wire
from neurotop.tui.data.compaction import Summary
from neurotop.tui.data.frame import Frame, Schema, Wants
from neurotop.tui.data.heat import HeatCache

#: Full-resolution rows a live store keeps; older rows are compacted (``compaction``).
LIVE_WINDOW = 2048
#: Histogram reports kept for the heatmap over time.
HIST_KEEP = 256

_log = logging.getLogger(__name__)
#: What a frame holds when no screen wants series: the header, knobs, latest reports.
HEADER_ONLY = Wants()
T = TypeVar("T")
_REQUIRED = object()


def _field(h: dict[str, Any], key: str, kind: Callable[[Any], T],
           default: Any = _REQUIRED) -> T:
    """Header field ``key`` as ``kind``. A missing or mistyped field is the sender's error,
    raised as ``ValueError`` so that ``ingest`` counts it and lets the store's own bugs
    (a ``KeyError`` of its own, say) surface."""
    if default is _REQUIRED and key not in h:
        raise ValueError(f"no {key!r} field")
    try:
        return kind(h.get(key, default))
    except TypeError as e:
        raise ValueError(f"field {key!r}: {e}") from e


def _names(h: dict[str, Any], key: str, default: Any = _REQUIRED) -> list[str]:
    names = _field(h, key, list, default)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"field {key!r}: names that are not all strings")
    return names


def _edges(v: Any) -> np.ndarray:
    edges = np.asarray(v, np.float64)
    if edges.ndim != 1:
        raise ValueError(f"histogram edges of shape {edges.shape}, not a vector")
    return edges


class Growable:
    """An array that grows along axis 0 by doubling; ``view()`` is the shown part.

    ``filled`` rows hold data; the first ``n`` are shown. They differ only in replay,
    which rewinds with ``show`` and plays forward again without copying anything.
    Appending discards the rows after the shown ones.
    """

    def __init__(self, row_shape: tuple[int, ...], dtype: Any = np.float32,
                 fill: float = np.nan) -> None:
        self._a = np.full((64, *row_shape), fill, dtype=dtype)
        self._fill = fill
        self.n = self.filled = 0

    def _grow(self, capacity: int) -> None:
        grown = np.empty((capacity, *self._a.shape[1:]), self._a.dtype)  # rows past n unread
        grown[: self.n] = self._a[: self.n]
        self._a = grown

    def append(self, row: Any) -> None:
        if self.n == len(self._a):
            self._grow(2 * len(self._a))
        self._a[self.n] = row
        self.n += 1
        self.filled = self.n

    def extend(self, rows: np.ndarray, reserve: int = 0) -> None:
        """Append many rows at once; ``reserve`` sizes the array for rows still to come."""
        end = self.n + len(rows)
        if end > len(self._a):
            self._grow(max(end, reserve, 2 * len(self._a)))
        self._a[self.n:end] = rows
        self.n = self.filled = end

    def drop_front(self, k: int) -> None:
        """Forget the first ``k`` rows (a live store moving them into its ``Summary``)."""
        self._a[: self.n - k] = self._a[k: self.n]
        self.n = self.filled = self.n - k

    def show(self, n: int) -> None:
        self.n = min(max(n, 0), self.filled)

    def view(self) -> np.ndarray:
        return self._a[: self.n]


@dataclass
class RunState:
    """What the header shows: the latest heartbeat plus connection health."""

    run_id: str = ""
    run_name: str = ""
    rank: int = 0
    #: A job's size and this rank's host (from its heartbeats; 1 and "" outside a job).
    world_size: int = 1
    host: str = ""
    #: What the status bar says of a job (``4 ranks, 1 node``; "" outside one), and whether
    #: the all-ranks view is shown: set by ``tui/data/ranks.py`` on the frames it makes.
    job: str = ""
    all_ranks: bool = False
    step: int = 0
    state: str = "connecting"  # connecting | running | paused | ended
    paused_at: int | None = None
    pause_reason: str = ""  # why it paused: who asked, or what tripped auto-pause
    stopping: bool = False  # a stop was acknowledged: the loop leaves at its next check
    steps_per_s: float = 0.0
    last_message: float = 0.0
    remote_dropped: int = 0
    rejected: int = 0  # control messages the run refused (malformed, unsigned, replayed, invalid)
    missed: int = 0  # telemetry messages lost between agent and UI (seq gaps)
    bad_messages: int = 0
    last_error: str = ""
    control: bool = False  # whether this UI may send commands
    link: str = ""  # trouble with the way to the run (an ssh tunnel): "" while all is well
    rec_dropped: int = 0  # messages the run's recorder dropped (from heartbeats)
    replay: bool = False  # showing a recorded session, not a live run
    backfill: str = ""  # a late attach's backfill: its progress, then what went wrong
    #: What a viewer of a run not listening yet waits for (``neurotop demo`` while the demo
    #: imports torch), or why it stopped waiting; shown until the first message.
    starting: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Alerts raised by the run's detectors so far, by level ("warn", "critical").
    alerts: dict[str, int] = field(default_factory=dict)
    #: The rank's host and GPU metrics, from the heartbeat's ``system`` (README "System
    #: metrics"); None: not measured (yet, off Linux, or by an agent that sends none).
    cpu_pct: float | None = None  # the training process, all threads, % of one core
    host_cpu_pct: float | None = None  # the whole host, % of all its cores
    rss: float | None = None  # the training process's resident memory, bytes
    mem_total: float | None = None  # the host's memory, bytes
    mem_available: float | None = None
    cpus: float | None = None  # the host's CPU count: ``cpu_pct`` goes up to 100 x this
    #: One dict per visible GPU: ``index``, ``name``, ``uuid`` and the ``GPU_FIELDS``.
    gpus: tuple[dict[str, Any], ...] = ()
    no_gpu: str = ""  # why there are no GPU metrics ("no pynvml ...", "no NVIDIA device ...")


#: Per-GPU numbers of a heartbeat: utilisation %, memory used and total (bytes), W, deg C.
GPU_FIELDS = ("util", "mem_used", "mem_total", "power_w", "temp_c")


def _number(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ValueError(f"system field {key!r}: {v!r} is not a number")
    return None if v is None else float(v)


def _system(s: RunState, v: Any) -> None:
    """A heartbeat's ``system`` metrics into ``s``; none (an older agent): left as they are."""
    if v is None:
        return
    if not isinstance(v, dict) or not isinstance(v.get("gpus", []), list) \
            or not all(isinstance(g, dict) for g in v.get("gpus", [])):
        raise ValueError("field 'system': not a map with a list of GPU maps")
    s.cpu_pct, s.host_cpu_pct, s.rss, s.mem_total, s.mem_available, s.cpus = (
        _number(v, k) for k in ("cpu_pct", "host_cpu_pct", "rss", "mem_total", "mem_available",
                                "cpus"))
    s.gpus = tuple({"index": _field(g, "index", int, i), "name": str(g.get("name", "")),
                    "uuid": str(g.get("uuid", "")), **{k: _number(g, k) for k in GPU_FIELDS}}
                   for i, g in enumerate(v.get("gpus", [])))
    s.no_gpu = str(v.get("no_gpu") or "")


def alert_counts(events: list[dict[str, Any]]) -> dict[str, int]:
    """Alerts among ``events``, by level: what the status bar counts. Replay sets the
    count from the events up to its cursor instead of adding each one it goes over again."""
    out: dict[str, int] = {}
    for h in events:
        if h.get("event") == "alert":
            level = str(h.get("level") or "warn")
            out[level] = out.get(level, 0) + 1
    return out


class RunStore:
    """Series of one run: steps, ``[steps x layers x stats]`` and named scalars."""

    STALE_AFTER_S = 3.0

    def __init__(self, window: int | None = LIVE_WINDOW) -> None:
        """``window``: full-resolution rows to keep before compacting the oldest (live, so
        memory stays bounded); ``None`` keeps every row (replay, which seeks to any row)."""
        self.lock = threading.RLock()  # re-entrant: ``frame`` holds it across the readers
        self.window = window
        self.summary = Summary(window or 2)
        self._hists: list[tuple[int, np.ndarray, np.ndarray]] = []  # the heatmap's
        #: ``histograms``' last answer, after what it was made from: (layer, which, count)
        #: and (the list, its first and last entries).
        self._hist_stack: tuple[tuple, tuple, tuple[np.ndarray, np.ndarray]] | None = None
        self.schema: dict[str, Any] | None = None
        self._schema_view: Schema | None = None  # ``frame``'s, built again after a change
        self.status = RunState()
        self.version = 0  # bumped on every change; the redraw timer compares it
        self.rewinds = 0  # shown rows cut back (replay): rows past them may be rewritten
        self._steps = Growable((), np.int64, 0)
        self._stats: Growable | None = None
        self._scalars: dict[str, Growable] = {}
        self._last_seq: int | None = None
        self.knobs: list[dict[str, Any]] = []  # the last `knobs` listing (types, bounds, docs)
        self.knob_values: dict[str, Any] = {}  # current values, from every heartbeat
        self.knob_pins: dict[str, Any] = {}  # knobs held against the script, likewise
        self._heat = HeatCache()  # the heat strip's rows, extended rather than gathered
        self._reset_extras()

    # -- writer ---------------------------------------------------------------------------

    def ingest(self, msg: wire.Message, *, count_gaps: bool = True) -> None:
        """Apply one telemetry message. Malformed content is counted, never raised.
        ``count_gaps=False`` for recorded messages, which skip sequence numbers."""
        with self.lock:
            self.status.last_message = time.time()
            self._count_gaps(msg.header, count_gaps)
            try:
                getattr(self, f"_on_{msg.kind}", self._on_unknown)(msg)
            except ValueError as e:  # the sender's content: a field or a shape that is wrong
                _log.exception("bad %s message", msg.kind)
                self.status.bad_messages += 1
                self.status.last_error = f"bad {msg.kind} message: {e}"
            self.version += 1

    def ingest_schema(self, schema: dict[str, Any]) -> None:
        self.ingest(wire.Message({"kind": wire.SCHEMA, **schema}))

    def _count_gaps(self, h: dict[str, Any], count: bool = True) -> None:
        """Track the sender's sequence number; count a jump as missed messages (live only:
        recorded messages skip numbers, and must still move the mark for what follows)."""
        seq = h.get("seq")
        if isinstance(seq, int):
            if count and self._last_seq is not None and seq > self._last_seq + 1:
                self.status.missed += seq - self._last_seq - 1
            self._last_seq = seq

    def _on_schema(self, msg: wire.Message) -> None:
        h = msg.header
        layers, stats, scalars = _names(h, "layers"), _names(h, "stats"), _names(h, "scalars")
        self._schema_view = None
        old = self.schema
        if old is None or old["layers"] != layers or old["stats"] != stats:
            self._steps = Growable((), np.int64, 0)
            self._stats = Growable((len(layers), len(stats)))
            self._scalars = {}
            self.summary = Summary(self.window or 2)
            self._hists = []
        for name in scalars:
            if name not in self._scalars:
                g = Growable(())
                g.extend(np.full(self._steps.n, np.nan, np.float32))
                self._scalars[name] = g
        self.schema = {"layers": layers, "stats": stats, "scalars": scalars,
                       "schema_id": h.get("schema_id", 0)}
        self._schema_extras(h)
        self.status.run_name = str(h.get("run_name", self.status.run_name))
        self.status.run_id = str(h.get("run", self.status.run_id))

    def _on_stats(self, msg: wire.Message) -> None:
        if self.schema is None or self._stats is None:
            return  # the schema is re-sent every few seconds; until then we cannot label it
        block, scalars = msg.arrays
        if block.shape != self._stats.view().shape[1:]:
            raise ValueError(f"block {block.shape} does not match the schema")
        if scalars.ndim != 1:
            raise ValueError(f"scalars of shape {scalars.shape}, not a vector")
        step = _field(msg.header, "step", int)
        self._steps.append(step)
        self._stats.append(block)
        names = self.schema["scalars"]
        for i, name in enumerate(names):
            self._scalars[name].append(scalars[i] if i < len(scalars) else np.nan)
        self.status.step = max(self.status.step, step)
        self._compact()

    def _on_heartbeat(self, msg: wire.Message) -> None:
        h, s = msg.header, self.status
        s.run_id = str(h.get("run", s.run_id))
        s.rank = _field(h, "rank", int, s.rank)
        s.world_size = _field(h, "world_size", int, s.world_size)
        s.host = str(h.get("host") or s.host)
        s.step = _field(h, "step", int)
        s.state = _field(h, "state", str)
        s.paused_at = h.get("paused_at")
        s.steps_per_s = _field(h, "steps_per_s", float, 0.0)
        s.remote_dropped = _field(h, "dropped", int, 0)
        s.rejected = _field(h, "rejected", int, 0)
        s.pause_reason = str(h.get("pause_reason") or "")
        s.stopping = s.stopping or bool(h.get("stopping"))
        if isinstance(h.get("knobs"), dict):
            self.knob_values = h["knobs"]
        pins = h.get("pins", {})
        self.knob_pins = {k: v for k, v in pins.items() if isinstance(v, dict)} \
            if isinstance(pins, dict) else {}
        s.rec_dropped = _field(h, "rec_dropped", int, 0)
        _system(s, h.get("system"))

    def _on_event(self, msg: wire.Message) -> None:
        h, s = msg.header, self.status
        ev = h.get("event")
        if (ev == "paused" or (ev == "ack" and h.get("ok"))) \
                and h.get("state") in ("running", "paused"):
            # Acks and "paused" events carry the run state after them: no wait for a heartbeat.
            s.state, s.paused_at = h["state"], h.get("paused_at")
            s.pause_reason = str(h.get("pause_reason") or "")
            if isinstance(h.get("step"), int):
                s.step = max(s.step, h["step"])
        if ev == "ack" and h.get("ok") and h.get("cmd") == "stop":
            s.stopping = True  # before the next heartbeat says so
        if ev == "alert":
            level = str(h.get("level") or "warn")
            s.alerts[level] = s.alerts.get(level, 0) + 1
        if ev == "ack" and h.get("ok") and h.get("cmd") == "knobs":
            self.knobs = [k for k in _field(h, "knobs", list)
                          if isinstance(k, dict) and "name" in k]
        self.status.events.append(dict(h))
        del self.status.events[:-500]

    # -- the statistics engine's extras: parameters, histograms, layer details ----------

    def _reset_extras(self) -> None:
        self._param_steps = Growable((), np.int64, 0)
        self._params: Growable | None = None
        self._hist: dict[str, Any] | None = None  # the latest histograms
        self._schema_view = None
        self.schema_extra: dict[str, Any] = {
            "params": [], "param_stats": [], "hist_layers": [], "hist_edges": np.empty(0),
            "layer_types": [], "activations": [], "calls": [], "blocks": [], "config": {}}

    def _schema_extras(self, h: dict[str, Any]) -> None:
        """Parameter names, histogram bins and layer details; older agents send none."""
        params, pstats = _names(h, "params", []), _names(h, "param_stats", [])
        old = self.schema_extra
        if self._params is None or old["params"] != params or old["param_stats"] != pstats:
            self._param_steps = Growable((), np.int64, 0)
            self._params = Growable((len(params), len(pstats)))
        self.schema_extra = {
            "params": params, "param_stats": pstats,
            "hist_layers": _names(h, "hist_layers", []),
            "hist_edges": _field(h, "hist_edges", _edges, []),
            "layer_types": _field(h, "layer_types", list, []),
            "activations": _field(h, "activations", list, []),
            "calls": _field(h, "calls", list, []),
            "blocks": _field(h, "blocks", list, []), "config": _field(h, "config", dict, {})}

    def _on_params(self, msg: wire.Message) -> None:
        if self._params is None:
            return  # labelled by the schema, which is re-sent every few seconds
        (block,) = msg.arrays
        if block.shape != self._params.view().shape[1:]:
            raise ValueError(f"params block {block.shape} does not match the schema")
        self._param_steps.append(_field(msg.header, "step", int))
        self._params.append(block)

    def _on_hist(self, msg: wire.Message) -> None:
        if self.schema is None:
            return
        act, grad = msg.arrays
        n, bins = len(self.schema_extra["hist_layers"]), len(self.schema_extra["hist_edges"]) + 1
        if act.shape != (n, bins) or grad.shape != (n, bins):
            raise ValueError(f"histograms {act.shape} do not match the schema ({n}, {bins})")
        self._hist = {"step": _field(msg.header, "step", int), "act": act.copy(),
                      "grad": grad.copy()}
        self._hists.append((self._hist["step"], self._hist["act"], self._hist["grad"]))
        del self._hists[:-HIST_KEEP]  # the heatmap over time; bounded

    def _on_unknown(self, msg: wire.Message) -> None:
        raise ValueError(f"unknown kind {msg.kind!r}")

    def ingest_stats_bulk(self, steps: np.ndarray, blocks: np.ndarray, scalars: np.ndarray,
                          *, last_seq: int | None = None, reserve: int = 0) -> int:
        """Apply many recorded stats messages at once (replay, backfill): the same result
        as ingesting them one by one. Returns how many rows were added."""
        with self.lock:
            self.version += 1
            if self.schema is None or self._stats is None or not len(steps):
                return 0  # as live: stats before any schema cannot be labelled
            if blocks.shape[1:] != self._stats.view().shape[1:]:
                self.status.bad_messages += len(steps)
                self.status.last_error = (f"bad stats message: block {blocks.shape[1:]} does"
                                          " not match the schema")
                return 0
            if last_seq is not None:
                self._last_seq = last_seq
            self._steps.extend(steps, reserve)
            self._stats.extend(blocks, reserve)
            k = scalars.shape[1] if scalars.ndim == 2 else 0
            for i, name in enumerate(self.schema["scalars"]):
                col = scalars[:, i] if i < k else np.full(len(steps), np.nan, np.float32)
                self._scalars[name].extend(col, reserve)
            self.status.step = max(self.status.step, int(steps.max()))
            self._compact()
            return len(steps)

    def show_rows(self, n: int) -> None:
        """Show only the first ``n`` stats rows (replay's cursor); the rest stay filled."""
        with self.lock:
            if n < self._steps.n:
                self.rewinds += 1
            for g in (self._steps, self._stats, *self._scalars.values()):
                if g is not None:
                    g.show(n)
            self.status.step = int(self._steps.view()[-1]) if self._steps.n else 0
            self.version += 1

    def filled_rows(self) -> int:
        with self.lock:
            return self._steps.filled

    def set_status(self, **fields: Any) -> None:
        """Set header fields a source knows better than the messages (replay's cursor)."""
        with self.lock:
            for k, v in fields.items():
                setattr(self.status, k, v)
            self.version += 1

    def reset(self) -> None:
        """Forget all series and events (replay rebuilding from an earlier point)."""
        with self.lock:
            self.schema = None  # (_reset_extras forgets the frames' schema)
            self._steps, self._stats, self._scalars = Growable((), np.int64, 0), None, {}
            self._hists, self.summary = [], Summary(self.window or 2)
            self._reset_extras()
            self._last_seq = None
            self.status.events, self.status.alerts = [], {}
            self.status.step, self.status.stopping = 0, False
            self.version += 1

    def note_error(self, text: str) -> None:
        with self.lock:
            self.status.bad_messages += 1
            self.status.last_error = text
            self.version += 1

    def set_link(self, text: str) -> None:
        """From the link's supervisor (e.g. "ssh tunnel down; reconnecting")."""
        with self.lock:
            if text != self.status.link:
                self.status.link = text
                self.version += 1

    # -- readers --------------------------------------------------------------------------

    def frame(self, wants: Wants = HEADER_ONLY) -> Frame:
        """What one redraw shows, copied under one hold of the lock: the header, the knobs
        and the latest reports, and the series ``wants`` names."""
        empty = (np.empty(0, np.int64), np.empty((0, 0), np.float32))
        with self.lock:
            sc = self._schema_now()
            s = self.status
            names = [n for group in wants.scalars for n in sc.scalars_named(*group)] \
                if sc else []
            layer = sc.layer_or_first(wants.layer) if sc and wants.layer is not None else ""
            trend = np.empty((0, 0), np.float32)
            if sc and wants.trend is not None:
                trend = self.recent_series(sc.stat_or_default(wants.trend[0]), wants.trend[1])
            return Frame(
                version=self.version, connection=self.connection(), schema=sc,
                status=replace(s, events=s.events[-wants.events:] if wants.events else [],
                               alerts=dict(s.alerts)),
                knobs=tuple(self.knobs), knob_values=dict(self.knob_values),
                knob_pins=dict(self.knob_pins),
                latest=self.latest_block(), latest_params=self.latest_params(),
                scalars={n: self.scalar(n, wants.envelope) for n in names if n},
                heat=self._heat.series(self, sc.stat_or_default(wants.heat))
                if sc and wants.heat is not None else empty,
                trend=trend,
                layer=self.layer_stats(sc.layers.index(layer)) if layer else empty,
                histogram=self.latest_histogram(layer) if layer else None,
                hist_series=self.histograms(layer, 0) if layer else empty,
                param_series=self.param_series(wants.param_stat, self._param_steps.n)
                if wants.param_stat is not None else empty)

    def _schema_now(self) -> Schema | None:
        """The schema and its extras as one frozen ``Schema``, built once per change."""
        if self._schema_view is None and self.schema is not None:
            sc, ex = self.schema, self.schema_extra
            edges = ex["hist_edges"].copy()
            edges.flags.writeable = False
            self._schema_view = Schema(
                layers=tuple(sc["layers"]), stats=tuple(sc["stats"]),
                scalars=tuple(sc["scalars"]), params=tuple(ex["params"]),
                param_stats=tuple(ex["param_stats"]), hist_layers=tuple(ex["hist_layers"]),
                hist_edges=edges, layer_types=tuple(ex["layer_types"]),
                activations=tuple(ex["activations"]), calls=tuple(ex["calls"]))
        return self._schema_view

    def connection(self) -> str:
        """``live``, ``stale`` (no message for a while), ``waiting`` or ``ended``."""
        with self.lock:
            s = self.status
            if s.replay:
                return "replay"
            if s.state == "ended":
                return "ended"
            if not s.last_message:
                return "waiting"
            return "live" if time.time() - s.last_message < self.STALE_AFTER_S else "stale"

    def steps(self) -> np.ndarray:
        """Every row's step: one per compacted bucket (its last step), then the recent rows."""
        with self.lock:
            return self._with_past(self.summary.steps[: self.summary.n], self._steps.view())

    def scalar(self, name: str, envelope: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of one scalar. Compacted buckets give their mean, or with
        ``envelope`` their min and max as two points (what a plot draws: spikes survive)."""
        with self.lock:
            g = self._scalars.get(name)
            if g is None:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            sm = self.summary
            x, y = self._steps.view(), g.view()
            key = f"s:{name}"
            if not sm.n or sm.get(key) is None:
                return x.copy(), y.copy()
            px = sm.steps[: sm.n]
            if envelope:
                px = np.repeat(px, 2)
                py = np.stack([sm.get(key, "min"), sm.get(key, "max")], 1).ravel()
            else:
                py = sm.get(key)
            return np.concatenate([px, x]), np.concatenate([py, y])

    def latest_block(self) -> np.ndarray | None:
        with self.lock:
            if self._stats is None or self._stats.n == 0:
                return None
            return self._stats.view()[-1].copy()

    def layer_series(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and ``[steps x stats]`` of one layer (the layer-detail screen's data)."""
        with self.lock:
            if self._stats is None or self.schema is None or layer not in self.schema["layers"]:
                return np.empty(0, np.int64), np.empty((0, 0), np.float32)
            i = self.schema["layers"].index(layer)
            return self._steps.view().copy(), self._stats.view()[:, i, :].copy()

    def latest_params(self) -> tuple[int, np.ndarray] | None:
        """The step and ``[params x param_stats]`` of the latest report, if any."""
        with self.lock:
            if self._params is None or self._params.n == 0:
                return None
            return int(self._param_steps.view()[-1]), self._params.view()[-1].copy()

    def param_series(self, stat: str, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps and ``[params x last]``: one parameter statistic's last reports."""
        with self.lock:
            pstats = self.schema_extra["param_stats"] if self._params is not None else []
            if stat not in pstats:
                return np.empty(0, np.int64), np.empty((0, 0), np.float32)
            j = pstats.index(stat)
            return (self._param_steps.view()[-last:].copy(),
                    self._params.view()[-last:, :, j].T.copy())

    def latest_histogram(self, layer: str) -> dict[str, Any] | None:
        """``{step, edges, act, grad}`` of a layer's latest histograms, or None."""
        with self.lock:
            if self._hist is None or layer not in self.schema_extra["hist_layers"]:
                return None
            h = self.schema_extra["hist_layers"].index(layer)
            return {"step": self._hist["step"], "edges": self.schema_extra["hist_edges"].copy(),
                    "act": self._hist["act"][h].copy(), "grad": self._hist["grad"][h].copy()}

    def recent_series(self, stat: str, last: int) -> np.ndarray:
        """``[layers x last]``: one statistic's last rows (fewer columns early in a run;
        compacted buckets as their means)."""
        with self.lock:
            if self._stats is None or self.schema is None or stat not in self.schema["stats"]:
                return np.empty((0, 0), np.float32)
            j = self.schema["stats"].index(stat)
            recent = self._stats.view()[-last:, :, j]
            if len(recent) < last and self.summary.n:
                past = self.summary.get("stats")[:, :, j]
                recent = np.concatenate([past[-(last - len(recent)):], recent])
            return recent.T.copy()

    def stat_series(self, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and ``[rows x layers]`` of one statistic over the whole run (compacted
        buckets as their max: the worst of each stretch, for the heat strip)."""
        with self.lock:
            if self._stats is None or self.schema is None or stat not in self.schema["stats"]:
                return np.empty(0, np.int64), np.empty((0, 0), np.float32)
            j = self.schema["stats"].index(stat)
            past = self.summary.get("stats", "max")
            return (self._with_past(self.summary.steps[: self.summary.n], self._steps.view()),
                    self._with_past(None if past is None else past[:, :, j],
                                    self._stats.view()[:, :, j]))

    def layer_stats(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps and ``[rows x stats]`` of one layer over the run (buckets as means)."""
        with self.lock:
            if self._stats is None:
                return np.empty(0, np.int64), np.empty((0, 0), np.float32)
            past = self.summary.get("stats")
            return (self._with_past(self.summary.steps[: self.summary.n], self._steps.view()),
                    self._with_past(None if past is None else past[:, layer],
                                    self._stats.view()[:, layer]))

    def histograms(self, layer: str, which: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Steps and ``[reports x bins]`` of one layer's histograms (``which``: 0 the
        activations, 1 the gradients), oldest first; empty without histograms."""
        with self.lock:
            names = self.schema_extra["hist_layers"]
            if layer not in names or not self._hists:
                return np.empty(0, np.int64), np.empty((0, 0), np.float32)
            i = names.index(layer)
            # Histograms come every ``hist_every`` reports: most frames stack the same
            # ones again. The list and its first and last entries (held, so compared by
            # identity) say whether any came or left since.
            held = self._hists
            made = self._hist_stack
            if made is not None and made[0] == (i, which, len(held)) and all(
                    a is b for a, b in zip(made[1], (held, held[0], held[-1]), strict=True)):
                return made[2]
            rows = [(s, h[which][i]) for s, *h in held if i < len(h[which])]
            if not rows:
                return np.empty(0, np.int64), np.empty((0, 0), np.float32)
            out = (np.array([s for s, _ in rows]), np.stack([r for _, r in rows]))
            for a in out:  # shared by frames: never written
                a.flags.writeable = False
            self._hist_stack = ((i, which, len(held)), (held, held[0], held[-1]), out)
            return out

    def memory_bytes(self) -> int:
        """What the series hold (arrays' allocated sizes), for the benchmark's report."""
        with self.lock:
            gs = [self._steps, self._stats, self._params, self._param_steps,
                  *self._scalars.values()]
            return (sum(g._a.nbytes for g in gs if g is not None) + self.summary.nbytes()
                    + sum(a.nbytes + b.nbytes for _, a, b in self._hists))

    @staticmethod
    def _with_past(past: np.ndarray | None, recent: np.ndarray) -> np.ndarray:
        if past is None or not len(past):
            return recent.copy()
        return np.concatenate([past, recent])

    # -- dashboard additions (writer side) ------------------------------------------------

    def _compact(self) -> None:
        """Live stores: move the oldest ``window`` rows into the summary once twice that
        many are held, so memory stays bounded however long the run."""
        w = self.window
        if w is None or self._stats is None:
            return
        while self._steps.n >= 2 * w:
            rows = {"stats": self._stats.view()[:w]}
            rows.update({f"s:{k}": g.view()[:w] for k, g in self._scalars.items()})
            self.summary.add(self._steps.view()[:w], rows)
            for g in (self._steps, self._stats, *self._scalars.values()):
                if g is not None:
                    g.drop_front(w)
        if self._params is not None and self._param_steps.n >= 2 * w:
            # Per-parameter statistics keep their recent reports only (no summary).
            self._params.drop_front(w)
            self._param_steps.drop_front(w)
