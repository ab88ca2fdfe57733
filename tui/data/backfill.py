"""A late attach's history: the run's session file, fetched from its agent, before live data.

Order matters and is what makes it whole: the client is subscribed before it asks, so
from the first live message on everything arrives live; that message triggers the first
``history`` request, whose reply covers everything published up to the request (the
agent flushes its recorder first). Live messages are held until the history is in the
store, then released, skipping those the history already had (by sequence number).
Everything here runs on the client's socket thread, the store's only writer.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import Chunk, SessionFormatError, records_start, scan
from neurotop.tui.data.sessionload import StoreLoader

if TYPE_CHECKING:
    from neurotop.tui.data.client import LiveClient

CHUNK_BYTES = 512 << 10
MAX_HELD = 200_000  # live messages held while the history loads; more are counted as missed
#: Extra ``history`` requests made when the file does not yet reach the first live message
#: (the agent's recorder flushes in the background, so the file catches up within moments).
MAX_CATCH_UP = 50


class Backfill:
    """Holds live telemetry, fetches the history in pieces, applies it, releases the rest."""

    def __init__(self, client: LiveClient) -> None:
        self.client = client
        self.store = client.store
        self.loader = StoreLoader(self.store)
        self.active = True
        self.problems: list[str] = []
        self._held: list[list[bytes]] = []
        self._lost = 0
        self._started = False
        self._offset = 0
        self._target: int | None = None
        self._pending = b""
        self._catch_up = 0

    def hold(self, frames: list[bytes]) -> bool:
        """Keep a live message for later; ``False`` once the history is in."""
        if not self.active:
            return False
        if len(self._held) < MAX_HELD:
            self._held.append(frames)
        else:
            self._lost += 1
        if not self._started:
            self._started = True
            self.store.set_status(backfill="history: asking the run…")
            self._request()
        return True

    def _request(self) -> None:
        self.client.command("history", {"offset": self._offset, "max_bytes": CHUNK_BYTES}
                            ).add_done_callback(self._on_piece)

    def _on_piece(self, fut: Future) -> None:
        if fut.exception() is not None:  # the client's CommandError: refused or timed out
            self._finish(f"no history: {fut.exception()}")
            return
        reply = fut.result()
        data, size = reply.get("history"), reply.get("size")
        if not isinstance(data, bytes) or not isinstance(size, int):
            self._finish("no history: a history reply without bytes and size")
            return
        if self._target is None:
            self._target = size
        base = self._offset - len(self._pending)
        buf = self._pending + data
        self._offset += len(data)
        if base == 0:
            try:
                base = records_start(buf)
            except SessionFormatError as e:
                self._finish(f"no history: {e}")
                return
            buf = buf[base:]
        done = not data or self._offset >= self._target
        recs, used = scan(buf, base, final=False, problems=self.problems)
        self._pending = buf[used:]
        self.loader.add_chunk(Chunk.of(buf, base, recs))
        if done and self._gap() and self._catch_up < MAX_CATCH_UP:
            # The file ends before the first message we hold: ask again from here; the
            # reply's size covers what the recorder has flushed since.
            self._catch_up += 1
            self._target = None
            self._request()
        elif done:
            if self._pending:
                self.problems.append(f"an incomplete last record ({len(self._pending)} bytes)"
                                     " ignored")
            self.loader.flush()
            self._finish("")
        else:
            self.store.set_status(backfill=f"history {100 * self._offset // self._target}%")
            self._request()

    def _gap(self) -> bool:
        """Whether messages are missing between the history's end and the first held one."""
        for frames in self._held[:1]:
            try:
                seq = wire.decode_header(frames[0]).get("seq")
            except wire.WireError:
                return False
            return isinstance(seq, int) and seq > self.loader.max_seq + 1
        return False

    def _finish(self, note: str) -> None:
        self.active = False
        held, self._held = self._held, []
        for frames in held:
            try:
                msg = wire.decode(frames)
            except wire.WireError as e:
                self.store.note_error(f"undecodable telemetry: {e}")
                continue
            seq = msg.header.get("seq")
            if isinstance(seq, int) and seq <= self.loader.max_seq:
                continue  # the history had it
            self.store.ingest(msg)
        if self._lost:
            self.store.set_status(missed=self.store.status.missed + self._lost)
        if self.problems:
            note = f"history: {len(self.problems)} damaged pieces skipped"
        self.store.set_status(backfill=note)
