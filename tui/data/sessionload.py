"""Recorded messages into a ``RunStore``: the live decoder, in bulk where it matters.

Used by replay and by a late attach's backfill. Every message goes through
``wire.decode`` and ``RunStore.ingest`` as live, except runs of stats messages: decoding
and ingesting 100k of those one by one in Python takes seconds. For them, the first of
each array layout is decoded in full by ``wire.decode``; for the rest, NumPy reads the
frame lengths of all records at once, checks that they match that layout (what
``wire.decode`` checks: the CRC already proved each record is what the agent sent), and
one ``ingest_stats_bulk`` applies thousands.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import (
    KIND_CODES,
    MESSAGE,
    Chunk,
    SessionFormatError,
    decode_message,
    message_frames,
    split_frames,
)
from neurotop.tui.data.store import RunStore

STATS, HEARTBEAT = KIND_CODES["stats"], KIND_CODES["heartbeat"]
MARKER_KINDS = frozenset({wire.EVENT, "alert"})
_VOLATILE = frozenset({"seq", "t", "v"})


class StoreLoader:
    """Applies recorded messages to one store, in file order.

    Heartbeats are skipped: each describes the run at one moment, so the caller applies
    the one it wants. What was applied where is kept for the caller: ``rows`` (positions
    of the messages that became the store's stats rows; it starts afresh when the layers
    change, as the store's series do), ``events`` and ``resets`` (positions of layer
    changes). ``max_seq`` is the highest sequence number applied.
    """

    BATCH = 4096

    def __init__(self, store: RunStore, *, reserve: int = 0) -> None:
        self.store = store
        self.reserve = reserve
        self.max_seq = -1
        self.rows: list[int] = []
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.resets: list[int] = []
        self._schema_seen: dict[str, Any] | None = None
        self._layout: tuple | None = None  # (dtypes, shapes, array frame sizes) of stats
        self._pos: list[np.ndarray] = []
        self._steps: list[np.ndarray] = []
        self._pairs: list[memoryview] = []  # each a block frame and the scalars after it

    # -- feeding ------------------------------------------------------------------------

    def add_chunk(self, c: Chunk) -> None:
        """Apply a chunk of intact records, stats in bulk."""
        n = len(c.off)
        msg = c.type == MESSAGE
        # Stats messages of a header, a block and a scalars frame: where each frame lies.
        stats, starts, lengths = message_frames(c, np.flatnonzero(msg & (c.kind == STATS)), 3)
        bulk = np.zeros(n, bool)
        bulk[stats] = True
        others = np.flatnonzero(msg & ~bulk & (c.kind != HEARTBEAT))
        start = 0
        for b in [*others.tolist(), n]:
            run = np.flatnonzero(bulk[start:b]) + start
            if len(run):
                i = np.searchsorted(stats, run)
                self._add_run(c, run, starts[i], lengths[i])
            if b < n:
                self.add(int(c.pos[b]), int(c.kind[b]), c.body(b))
            start = b + 1

    def add(self, pos: int, kind: int, body: memoryview | bytes) -> None:
        """Apply one recorded message through the live decoder."""
        if kind == HEARTBEAT:  # not shown from the past, but its sequence number counts
            try:
                seq = wire.decode_header(bytes(split_frames(body)[0])).get("seq")
            except (SessionFormatError, wire.WireError, IndexError):
                return
            if isinstance(seq, int):
                self.max_seq = max(self.max_seq, seq)
            return
        try:  # copies: the file's buffer is reused, a message may keep its arrays
            msg = decode_message(body)
        except (SessionFormatError, wire.WireError) as e:
            self.store.note_error(f"undecodable recorded message: {e}")
            return
        h = msg.header
        if msg.kind == wire.SCHEMA:
            same = {k: v for k, v in h.items() if k not in _VOLATILE}
            if same == self._schema_seen:
                return  # re-sent every few seconds; only changes matter
            self._schema_seen = same
        self.flush()
        if isinstance(h.get("seq"), int):
            self.max_seq = max(self.max_seq, h["seq"])
        if msg.kind == wire.SCHEMA:
            old, layers, stats = self.store.schema, h.get("layers"), h.get("stats")
            if isinstance(layers, list) and isinstance(stats, list) and (
                    old is None or old["layers"] != layers or old["stats"] != stats):
                self.resets.append(pos)  # the store starts its series afresh
                self.rows = []
                self._layout = None
        elif msg.kind in MARKER_KINDS:
            self.events.append((pos, dict(h)))
        before = self.store.filled_rows()
        self.store.ingest(msg, count_gaps=False)
        if msg.kind == wire.STATS and self.store.filled_rows() > before:
            self.rows.append(pos)  # a stats row the bulk path could not take (more arrays)

    def flush(self) -> None:
        """Apply the stats gathered so far."""
        if not self._pairs or self._layout is None:
            return
        (d0, d1), (s0, s1), _ = self._layout
        pairs = np.frombuffer(b"".join(self._pairs), np.dtype([("b", d0, s0), ("s", d1, s1)]))
        added = self.store.ingest_stats_bulk(np.concatenate(self._steps), pairs["b"],
                                             pairs["s"], last_seq=self.max_seq,
                                             reserve=self.reserve)
        if added:
            self.rows += np.concatenate(self._pos).tolist()
        self._pos, self._steps, self._pairs = [], [], []

    # -- stats runs ---------------------------------------------------------------------

    def _add_run(self, c: Chunk, run: np.ndarray, starts: np.ndarray,
                 lengths: np.ndarray) -> None:
        """Gather stats records ``run`` of chunk ``c``; ``starts`` and ``lengths``: where each
        record's three frames (header, block, scalars) start in ``c.buf``, and their lengths."""
        mv = memoryview(c.buf)
        k = 0
        while k < len(run):
            if self._layout is None or tuple(lengths[k, 1:]) != self._layout[2]:
                if not self._new_layout(c.body(int(run[k]))):
                    self.add(int(c.pos[run[k]]), STATS, c.body(int(run[k])))
                    k += 1
                    continue
            nb, ns = self._layout[2]
            same = (lengths[k:, 1] == nb) & (lengths[k:, 2] == ns)
            end = k + (len(same) if same.all() else int(np.argmin(same)))
            self._pairs += [mv[a:a + nb + ns] for a in starts[k:end, 1].tolist()]
            self._steps.append(c.step[run[k:end]].astype(np.int64))
            self._pos.append(c.pos[run[k:end]])
            h = int(starts[end - 1, 0])
            header = mv[h:h + int(lengths[end - 1, 0])]
            try:
                seq = wire.decode_header(header).get("seq")
            except wire.WireError:
                seq = None
            if isinstance(seq, int):
                self.max_seq = max(self.max_seq, seq)
            if len(self._pairs) >= self.BATCH:
                self.flush()
            k = end

    def _new_layout(self, body: memoryview) -> bool:
        """Decode one stats message in full; its layout is the one bulk records must have."""
        try:
            frames = split_frames(body)
            arrays = wire.decode(list(frames)).arrays
        except (SessionFormatError, wire.WireError):
            return False
        if len(arrays) != 2 or arrays[0].ndim != 2 or arrays[1].ndim != 1:
            return False
        self.flush()
        self._layout = ((arrays[0].dtype, arrays[1].dtype), (arrays[0].shape, arrays[1].shape),
                        (len(frames[1]), len(frames[2])))
        return True
