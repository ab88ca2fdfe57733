"""Every rank of a job on the UI side: one ``RunStore`` per rank, and what the all-ranks view
shows, computed from those stores with NumPy (torch-free).

A job's node relay sends every rank's messages down one socket, each naming its ``rank``
(and ``world_size``, ``local_rank``, ``host``); a job's recording is one file per rank. Both
fill one store per rank, so every screen can show any rank exactly as it shows a single
run. ``Ranks`` is what the app reads in place of one store (``version``, ``connection()``,
``frame(wants)``): the selected rank's frame, its status saying the job (``4 ranks, 1
node``) and which rank is shown. ``spread`` and ``step_times`` are the all-ranks view:
one statistic's min / median / max across ranks, the rank holding each extreme, and the
ranks x time matrix of step time.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from neurotop.protocol import wire
from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.frame import Frame, Wants
from neurotop.tui.data.store import HEADER_ONLY, RunState, RunStore

if TYPE_CHECKING:
    from neurotop.tui.data.replay_source import ReplaySource

#: Scalars that are a rank's step time in ms, if its agent reports one; else it is
#: ``1000 / steps_per_s`` (the rank's own rate, measured over at least a second). First
#: ``ready_ms`` (every rank of a job reports it): the time from a step boundary to the
#: model's next forward. Under DDP the all-reduce makes every rank's step time equal, so
#: that strip is flat; the time before the forward is where a straggler differs.
STEP_TIME_SCALARS = ("ready_ms", "step_time_ms", "step_ms")
READY_SCALAR = "ready_ms"
#: The strip names the rank whose median is at least this many times the median of the
#: other ranks' (the agent's straggler rule's default ratio, ``RankRules.straggler_ratio``).
LONGEST_RATIO = 1.5
RATE_SCALAR = "steps_per_s"
#: Ranks a job may have (a connection file's bound): a message naming another is refused.
MAX_RANKS = 1 << 20


def job_text(world_size: int, nodes: int) -> str:
    """The status bar's name for a job: ``8 ranks, 2 nodes``."""
    return (f"{world_size} rank{'s' * (world_size != 1)}, "
            f"{nodes} node{'s' * (nodes != 1)}")


def across(values: np.ndarray, ranks: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Min, median and max over axis 0 of ``values`` (``[ranks x ...]``), NaN (no value:
    a layer not called, a rank without that row) left out, and the rank holding the min
    and the max (-1 where no rank has a value)."""
    v = np.asarray(values, np.float64)
    shape = v.shape[1:]
    if not len(v):
        nan = np.full(shape, np.nan)
        return nan, nan.copy(), nan.copy(), np.full(shape, -1), np.full(shape, -1)
    some = ~np.isnan(v).all(axis=0)
    order = np.asarray(ranks, np.int64)
    lo, hi = np.fmin.reduce(v, axis=0), np.fmax.reduce(v, axis=0)
    med = np.full(shape, np.nan)
    if some.any():
        med[some] = np.nanmedian(v[:, some], axis=0)
    lo_rank = np.where(some, order[np.argmin(np.where(np.isnan(v), np.inf, v), axis=0)], -1)
    hi_rank = np.where(some, order[np.argmax(np.where(np.isnan(v), -np.inf, v), axis=0)], -1)
    return lo, med, hi, lo_rank, hi_rank


def align(series: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Each rank's ``(steps, values[rows, ...])`` on the union of their steps: ``steps``
    and ``[ranks x steps x ...]`` (NaN where a rank has no row for a step; its last row of
    a step when it has several)."""
    parts = [np.asarray(s, np.int64) for s, _ in series.values()]
    rows = next((v.shape[1:] for _, v in series.values() if v.ndim >= 1), ())
    first = parts[0] if parts else np.empty(0, np.int64)
    same = bool(parts) and all(np.array_equal(p, first) for p in parts) \
        and bool(np.all(np.diff(first) > 0)) \
        and all(v.shape == (len(first), *rows) for _, v in series.values())
    if same:  # DDP ranks report at the same steps: no union to take
        return first.copy(), np.stack([v for _, v in series.values()]).astype(np.float64)
    steps = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    out = np.full((len(series), len(steps), *rows), np.nan, np.float64)
    for k, (s, v) in enumerate(series.values()):
        if len(s) and v.shape[1:] == rows:
            out[k, np.searchsorted(steps, s)] = v  # repeated steps: the last one wins
    return steps, out


@dataclass(frozen=True, eq=False)
class Spread:
    """One statistic of every layer across ranks, at each rank's latest report."""

    stat: str
    layers: tuple[str, ...]
    ranks: tuple[int, ...]  # the ranks with a report, in order
    steps: np.ndarray  # each of those ranks' latest step
    values: np.ndarray  # [ranks x layers]
    lo: np.ndarray  # [layers]
    median: np.ndarray
    hi: np.ndarray
    lo_rank: np.ndarray  # [layers]: the rank holding the min (-1: none has a value)
    hi_rank: np.ndarray

    def extreme_rank(self) -> np.ndarray:
        """Per layer, the rank furthest from the median (the one to look at)."""
        with np.errstate(invalid="ignore"):
            low = (self.median - self.lo) > (self.hi - self.median)
        return np.where(low, self.lo_rank, self.hi_rank)


@dataclass(frozen=True, eq=False)
class StepTimes:
    """The ranks x time matrix of step time (ms): one row per rank, one column per step."""

    ranks: tuple[int, ...]
    steps: np.ndarray
    ms: np.ndarray  # [ranks x steps], NaN where a rank has no figure
    #: What the figures are: ``READY_SCALAR`` when every rank's are its ready time, else
    #: "" (step times, or a mix)
    source: str = ""

    def longest(self, ms: np.ndarray | None = None) -> tuple[int, float] | None:
        """The rank whose median (over ``ms``, default all of it) is at least
        ``LONGEST_RATIO`` times the median of the other ranks' medians, and that ratio;
        None when no rank stands out (or fewer than two ranks have figures)."""
        m = self.ms if ms is None else ms
        ok = np.isfinite(m).any(axis=1) if m.size else np.zeros(len(self.ranks), bool)
        if ok.sum() < 2:
            return None
        with np.errstate(invalid="ignore"):
            med = np.array([np.nanmedian(r) if k else np.nan for r, k in zip(m, ok, strict=True)])
        i = int(np.nanargmax(med))
        others = float(np.nanmedian(np.delete(med, i)))
        if not others > 0 or not med[i] >= LONGEST_RATIO * others:
            return None
        return self.ranks[i], float(med[i] / others)


class Ranks:
    """One store per rank and the selection the screens show; the app's store face.

    Thread-safety: stores are created by the one writer (a client's socket thread, or the
    replay's setup) under ``_lock``; readers take a copy of the map. Each store has its
    own lock, so a frame of one rank is consistent; the all-ranks view reads each rank's
    latest report under that rank's lock (ranks report independently anyway)."""

    def __init__(self, stores: Mapping[int, RunStore] | None = None, primary: int = 0) -> None:
        self._lock = threading.Lock()
        self._stores: dict[int, RunStore] = dict(stores or {})
        self.primary = primary
        self.selected = primary
        self.all_view = False
        self._picks = 0  # bumped on every change of selection: the redraw key changes
        self._world = 1
        self._nodes: dict[int, tuple[str, str]] = {}  # rank -> (host, node id)
        #: (node relays this viewer subscribes to, relays the job lists); None: not known
        self.reach: tuple[int, int] | None = None

    # -- the writer -----------------------------------------------------------------------

    def store_for(self, rank: int, control: bool = False) -> RunStore:
        """Rank ``rank``'s store, made on its first message (``control``: as the primary's)."""
        with self._lock:
            store = self._stores.get(rank)
            if store is None:
                store = self._stores[rank] = RunStore()
                store.status.control = control
                store.status.rank = rank
                self._picks += 1
            return store

    def set_primary(self, rank: int, store: RunStore) -> None:
        """The connected rank is ``rank`` (known once a pending client found its run)."""
        with self._lock:
            self._stores = {r: s for r, s in self._stores.items() if s is not store}
            self._stores[rank] = store
            self.primary = self.selected = rank
            self._picks += 1

    def note(self, header: dict[str, Any]) -> None:
        """What any message says of the job: its size and the rank's node (its host and
        node id: two torchruns on one host are two nodes, each with its relay)."""
        w, r, host = header.get("world_size"), header.get("rank"), header.get("host")
        if isinstance(w, int) and not isinstance(w, bool) and 0 < w <= MAX_RANKS:
            self._world = max(self._world, w)
        node = (host, str(header.get("node") or ""))
        if isinstance(r, int) and isinstance(host, str) and host and self._nodes.get(r) != node:
            with self._lock:
                self._nodes[r] = node
                self._picks += 1

    # -- what the job is ------------------------------------------------------------------

    @property
    def stores(self) -> dict[int, RunStore]:
        with self._lock:
            return dict(sorted(self._stores.items()))

    @property
    def world_size(self) -> int:
        sizes = [s.status.world_size for s in self.stores.values()]
        return max([self._world, len(self.stores), *sizes])

    @property
    def nodes(self) -> int:
        with self._lock:
            nodes = set(self._nodes.values())
        if nodes:
            return len(nodes)
        return max(len({s.status.host for s in self.stores.values() if s.status.host}), 1)

    @property
    def is_job(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        """``4 ranks, 2 nodes``; when some nodes' relays are on other hosts (not reachable
        from here), how many ranks report and how many nodes this viewer reaches."""
        if not self.is_job:
            return ""
        reached, total = self.reach or (0, 0)
        if reached >= total:
            return job_text(self.world_size, self.nodes)
        return (f"{job_text(self.world_size, max(self.nodes, total))} ({len(self.stores)}"
                f" of {self.world_size} reporting: {reached} of {total} nodes reachable)")

    def silent(self) -> list[int]:
        """Ranks whose messages stopped coming (live: none for ``RunStore.STALE_AFTER_S``)."""
        return [r for r, s in self.stores.items() if s.connection() == "stale"]

    def select_next(self) -> int:
        """The next rank that has sent anything (rank 0 after the last); the new rank."""
        ranks = list(self.stores)
        if ranks:
            i = ranks.index(self.selected) if self.selected in ranks else -1
            self.selected = ranks[(i + 1) % len(ranks)]
        self._picks += 1
        return self.selected

    def toggle_all(self) -> bool:
        self.all_view = not self.all_view
        self._picks += 1
        return self.all_view

    # -- the store face the app reads -----------------------------------------------------

    @property
    def store(self) -> RunStore:
        """The selected rank's store (the primary's until that rank has sent anything)."""
        stores = self.stores
        return stores.get(self.selected) or stores.get(self.primary) or RunStore()

    @property
    def version(self) -> int:
        return sum(s.version for s in self.stores.values()) + self._picks

    @property
    def status(self) -> RunState:
        return self.store.status

    def connection(self) -> str:
        return self.store.connection()

    def align(self) -> None:
        """Bring the other ranks to the primary's moment (replay's cursor); live: nothing."""

    def frame(self, wants: Wants = HEADER_ONLY) -> Frame:
        """The selected rank's frame; its status says the job and the rank shown."""
        self.align()
        f = self.store.frame(wants)
        return replace(f, version=self.version, status=replace(
            f.status, rank=self.selected, job=self.describe(), all_ranks=self.all_view))

    # -- the all-ranks view ---------------------------------------------------------------

    def spread(self, stat: str) -> Spread | None:
        """``stat`` of every layer across ranks, at each rank's latest report; None before
        any rank has reported it. Ranks whose layers differ from the lowest rank's (DDP
        makes none) are left out."""
        ranks, steps, blocks = [], [], []
        layers: tuple[str, ...] | None = None
        for r, s in self.stores.items():
            with s.lock:  # (not ``frame()``: at hundreds of ranks its copies are the cost)
                sc, latest, step = s.schema, s.latest_block(), s.status.step
            if sc is None or latest is None or stat not in sc["stats"]:
                continue
            if layers is None:
                layers = tuple(sc["layers"])
            if tuple(sc["layers"]) != layers or latest.shape[0] != len(layers):
                continue
            ranks.append(r)
            steps.append(step)
            blocks.append(latest[:, sc["stats"].index(stat)])
        if layers is None:
            return None
        values = np.stack(blocks).astype(np.float64)
        lo, med, hi, lo_r, hi_r = across(values, ranks)
        return Spread(stat=stat, layers=layers, ranks=tuple(ranks),
                      steps=np.asarray(steps, np.int64), values=values, lo=lo, median=med,
                      hi=hi, lo_rank=lo_r, hi_rank=hi_r)

    def spread_over_steps(self, stat: str) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """``stat`` across ranks at each step: the steps and ``across``'s five arrays,
        each ``[steps x layers]``."""
        series = {r: s.stat_series(stat) for r, s in self.stores.items()}
        series = {r: v for r, v in series.items() if len(v[0])}
        steps, values = align(series)
        return steps, across(values, list(series))

    def step_times(self, last: int | None = None) -> StepTimes:
        """Every rank's step time per report (ms), on the union of their steps; ``last``:
        only the last that many steps."""
        series: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        sources: set[str] = set()  # the scalar each rank's figures are
        for r, s in self.stores.items():
            with s.lock:
                names = s.schema["scalars"] if s.schema is not None else ()
            name = next((n for n in STEP_TIME_SCALARS if n in names), "")
            if name:
                x, y = s.scalar(name)
                ms = y.astype(np.float64)
            elif RATE_SCALAR in names:
                x, y = s.scalar(RATE_SCALAR)
                rate = y.astype(np.float64)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ms = np.where(rate > 0, 1000.0 / rate, np.nan)
            else:
                continue
            series[r] = (x, ms)
            sources.add(name)
        steps, ms = align(series)
        if last is not None and len(steps) > last:
            steps, ms = steps[-last:], ms[:, -last:]
        source = READY_SCALAR if sources == {READY_SCALAR} else ""
        return StepTimes(ranks=tuple(series), steps=steps, ms=ms, source=source)


class JobClient(LiveClient):
    """A ``LiveClient`` that keeps every rank of a job: attached to a node relay
    (``Endpoints.rank`` set), each rank's messages go to that rank's store in ``ranks``;
    the connected rank's (rank 0's) take the usual way, its backfill included, into
    ``store``. Without a relay (one process, or a job's rank over ssh) it is a
    ``LiveClient`` whose ``ranks`` hold that one rank."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ranks = Ranks({self._primary(): self.store}, primary=self._primary())

    def _primary(self) -> int:
        return self.endpoints.rank if self.endpoints.rank is not None else 0

    def _on_telemetry(self, frames: list[bytes]) -> None:
        try:
            h = wire.decode_header(frames[0])
        except (wire.WireError, IndexError) as e:
            self.store.note_error(f"undecodable telemetry: {e}")
            return
        self.ranks.note(h)
        self.ranks.reach = (1 + len(self.endpoints.more), self.endpoints.relays)
        rank = h.get("rank", 0)
        if self.endpoints.rank is not None and (not isinstance(rank, int) or isinstance(
                rank, bool) or not 0 <= rank < MAX_RANKS):
            self.store.note_error(f"telemetry of rank {rank!r}: not a rank (0 to {MAX_RANKS})")
            return
        if self.endpoints.rank is None or rank == self.endpoints.rank:
            if self.ranks.primary != self._primary():  # a pending client's endpoints came
                self.ranks.set_primary(self._primary(), self.store)
            super()._on_telemetry(frames)
            return
        self.ranks_seen.add(rank)
        store = self.ranks.store_for(rank, control=self.store.status.control)
        try:
            msg = wire.decode(frames)
        except wire.WireError as e:
            store.note_error(f"undecodable telemetry: {e}")
            return
        store.ingest(msg)


class ReplayRanks(Ranks):
    """A job's recording, one ``ReplaySource`` per rank: the primary's (rank 0's) cursor
    is the timeline's; every other rank follows it to the same step."""

    def __init__(self, sources: Mapping[int, ReplaySource], primary: int = 0) -> None:
        super().__init__({r: s.store for r, s in sources.items()}, primary=primary)
        self.sources = dict(sorted(sources.items()))
        self._aligned: int | None = None
        for r, s in self.sources.items():
            meta = s.reader.meta
            self.note({"rank": r, "world_size": meta.get("world_size"),
                       "host": meta.get("host"), "node": meta.get("node")})

    @classmethod
    def beside(cls, source: ReplaySource) -> ReplayRanks | None:
        """The job ``source`` is rank 0's recording of (its run directory holds the other
        ranks' ``session-r<r>.ntop``), each other rank's source started; None for the
        recording of one process. Raises as ``ReplaySource`` does for a bad file."""
        from neurotop.protocol import runs
        from neurotop.tui.data.replay_source import ReplaySource

        files = runs.rank_sessions(source.path)
        if len(files) < 2:
            return None
        others: dict[int, ReplaySource] = {}
        try:
            for r, p in files.items():
                if r:
                    others[r] = ReplaySource(p)
        except (OSError, ValueError):
            for o in others.values():
                o.close()
            raise
        for o in others.values():
            o.start()
        return cls({0: source, **others}, primary=0)

    def align(self) -> None:
        """Seek every other rank to the primary's step, once per step it moves to."""
        step = self.sources[self.primary].timeline().step
        if step != self._aligned:
            self._aligned = step
            for r, s in self.sources.items():
                if r != self.primary:
                    s.seek_step(step)

    def close(self) -> None:
        """Close every rank's source but the primary's (its caller closes that one)."""
        for r, s in self.sources.items():
            if r != self.primary:
                s.close()
