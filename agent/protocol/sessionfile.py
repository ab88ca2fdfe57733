"""Session files: an append-only, crash-safe record of everything a run published.

Imports neither torch nor textual: the UI reads these files on a laptop. The format is
documented in ``docs/session-format.md``. In short: a 16-byte file header (magic, format
version), then records, each a 32-byte header (record magic, CRC32, type, kind, body
length, step, time) and a body. A ``MESSAGE`` record's body holds one published
telemetry message as its wire frames, untouched, so replay decodes it with
``neurotop.protocol.wire`` like a live message (``decode_message``; ``message_frames``
for many at once: the UI decodes records only through this module). ``INDEX`` records,
written every ``index_every`` records, list the records before them and point to the
previous index, so a reader finds every record from the last index backwards without
reading the file. A reader verifies every record's CRC, reports and ignores a truncated
tail, and skips a damaged record by searching for the next record magic. Index records
are hints it verifies (their entries must tile the file up to where they are): after
bytes were inserted or removed it resynchronises on the framing and the CRCs, so only
the damaged records are lost.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from neurotop.protocol import wire

FORMAT_VERSION = 1
FILE_MAGIC = b"\x8eNTOP\r\n\x1a"
REC_MAGIC = b"\x8eREC"
FILE_HEADER = struct.Struct("<8sHHI")  # magic, format version, flags, crc32 of the first 12 bytes
REC_HEADER = struct.Struct("<4sIBBHIqd")  # magic, crc32, type, kind, flags, length, step, t
REC_FIELDS = struct.Struct("<BBHIqd")  # the part after the CRC, which the CRC covers
HEADER_SIZE = REC_HEADER.size  # 32
MAX_RECORD_BYTES = 1 << 30

#: Record types. Readers skip types they do not know (0 is never valid).
META, MESSAGE, INDEX, NOTE, END = 1, 2, 3, 4, 5

#: Telemetry kinds get a code in the record header, so a reader can select records
#: (all stats, all events) from the index without decoding them. Unknown kinds get 0.
KIND_CODES = {"schema": 1, "stats": 2, "heartbeat": 3, "event": 4, "alert": 5}
OTHER_KIND = 0

#: One index entry per record: what the record header says, plus where it is.
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("type", "u1"), ("kind", "u1"),
                        ("flags", "<u2"), ("step", "<i8"), ("t", "<f8")])
INDEX_HEAD = struct.Struct("<qq")  # offset of the previous index record (-1: none), covers_from


class SessionFormatError(ValueError):
    """The file is not a session file this neurotop can read; the message says why."""


def kind_code(kind: str) -> int:
    return KIND_CODES.get(kind, OTHER_KIND)


def file_header(version: int = FORMAT_VERSION) -> bytes:
    head = FILE_MAGIC + struct.pack("<HH", version, 0)
    return head + struct.pack("<I", zlib.crc32(head))


def records_start(buf: bytes) -> int:
    """Where the first record starts in ``buf``, the beginning of a session file, after
    checking its magic and format version (not its CRC: use ``SessionReader`` for files
    that may be damaged). ``SessionFormatError`` says why it cannot be read."""
    if len(buf) < FILE_HEADER.size or not buf.startswith(FILE_MAGIC):
        raise SessionFormatError("not a neurotop session file")
    version = FILE_HEADER.unpack_from(buf)[1]
    if version > FORMAT_VERSION:
        raise SessionFormatError(f"session format version {version}, newer than this neurotop"
                                 f" reads (version {FORMAT_VERSION}); upgrade neurotop")
    return FILE_HEADER.size


def encode_frames(frames: list[bytes]) -> list[bytes]:
    """A MESSAGE body: frame count, frame lengths, then the frames (as separate parts)."""
    return [struct.pack(f"<I{len(frames)}I", len(frames), *map(len, frames)), *frames]


def split_frames(body: memoryview | bytes) -> list[memoryview]:
    """The wire frames of a MESSAGE body (views, no copies)."""
    body = memoryview(body)
    if len(body) < 4:
        raise SessionFormatError("message body shorter than its frame count")
    (n,) = struct.unpack_from("<I", body)
    start = 4 + 4 * n
    if n > 4096 or start > len(body):
        raise SessionFormatError(f"message body claims {n} frames")
    lengths = struct.unpack_from(f"<{n}I", body, 4)
    if start + sum(lengths) != len(body):
        raise SessionFormatError("message frame lengths do not add up to the body")
    frames = []
    for n_bytes in lengths:
        frames.append(body[start:start + n_bytes])
        start += n_bytes
    return frames


def decode_message(body: memoryview | bytes) -> wire.Message:
    """The telemetry message a MESSAGE body holds, decoded by the live decoder. Its frames
    are copied, so the message outlives the buffer. Raises ``SessionFormatError`` or
    ``wire.WireError`` (both ``ValueError``)."""
    return wire.decode([bytes(f) for f in split_frames(body)])


# --- writing ------------------------------------------------------------------------------

class SessionWriter:
    """Appends records to a new session file. Not thread-safe: one writer thread owns it.

    ``flush()`` hands what was written to the OS (it survives a ``kill -9`` of the
    process from then on); ``sync()`` also fsyncs (it survives a power cut).
    ``flushed`` is the size of the file up to the last flush: always a record boundary.
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], *,
                 index_every: int = 1024) -> None:
        self.path = Path(path)
        self.index_every = index_every
        self._f = open(self.path, "xb", buffering=1 << 20)  # never overwrite a session
        self._f.write(file_header())
        self.offset = FILE_HEADER.size
        self.flushed = 0
        self._entries: list[tuple] = []
        self._last_index = -1
        self._covers_from = self.offset
        self.write(META, [msgpack.packb({"format": FORMAT_VERSION, **meta}, use_bin_type=True)])
        self.flush()

    def write(self, rtype: int, parts: list[bytes], *, kind: int = 0, step: int = -1,
              t: float = 0.0) -> int:
        """Append one record made of ``parts``; returns its offset."""
        length = sum(map(len, parts))
        fields = REC_FIELDS.pack(rtype, kind, 0, length, step, t)
        crc = zlib.crc32(fields)
        for p in parts:
            crc = zlib.crc32(p, crc)
        off = self.offset
        self._f.write(REC_MAGIC + struct.pack("<I", crc) + fields)
        for p in parts:
            self._f.write(p)
        self.offset += HEADER_SIZE + length
        if rtype != INDEX:
            self._entries.append((off, length, rtype, kind, 0, step, t))
            if len(self._entries) >= self.index_every:
                self.write_index()
        return off

    def write_message(self, frames: list[bytes], *, kind: str, step: int, t: float) -> int:
        return self.write(MESSAGE, encode_frames(frames), kind=kind_code(kind), step=step, t=t)

    def write_note(self, rtype: int, note: dict[str, Any], t: float = 0.0) -> int:
        return self.write(rtype, [msgpack.packb(note, use_bin_type=True)], t=t)

    def write_index(self) -> None:
        """List the records since the previous index; a no-op when there are none."""
        if not self._entries:
            return
        entries = np.array(self._entries, dtype=INDEX_DTYPE)
        head = INDEX_HEAD.pack(self._last_index, self._covers_from)
        self._entries = []
        self._last_index = self.write(INDEX, [head, entries.tobytes()])
        self._covers_from = self.offset

    def flush(self) -> None:
        self._f.flush()
        self.flushed = self.offset

    def sync(self) -> None:
        self.flush()
        os.fsync(self._f.fileno())

    def close(self, end: dict[str, Any] | None = None, t: float = 0.0) -> None:
        """Index what is left, write the END record, fsync, close."""
        if self._f.closed:
            return
        self.write_index()
        self.write_note(END, end or {}, t)
        self.sync()
        self._f.close()


# --- reading ------------------------------------------------------------------------------

@dataclass
class Record:
    """One intact record: its header fields and its body (a view)."""

    offset: int
    type: int
    kind: int
    step: int
    t: float
    body: memoryview
    pos: int = -1  # its position in ``SessionReader.index``, when read through it

    @property
    def end(self) -> int:
        return self.offset + HEADER_SIZE + len(self.body)


def _check_at(buf: memoryview, p: int) -> tuple[int, int] | None:
    """At ``p`` in ``buf``: ``(type, length)`` if a whole, intact record is there;
    ``(0, length)`` if a plausible header runs past the end of ``buf``; else ``None``."""
    if buf[p:p + 4] != REC_MAGIC or p + HEADER_SIZE > len(buf):
        return None
    _, crc, rtype, _, _, length, _, _ = REC_HEADER.unpack_from(buf, p)
    if rtype == 0 or length > MAX_RECORD_BYTES:
        return None
    end = p + HEADER_SIZE + length
    if end > len(buf):
        return 0, length
    if zlib.crc32(buf[p + 8:end]) != crc:
        return None
    return rtype, length


def scan(data: bytes, base: int = 0, *, final: bool = True,
         problems: list[str] | None = None, quiet_start: bool = False
         ) -> tuple[list[Record], int]:
    """Every intact record in ``data`` (whose first byte is at file offset ``base``).

    Damaged bytes are skipped by searching for the next record magic, and reported in
    ``problems``. Returns the records and how many bytes were consumed: with
    ``final=False`` an incomplete record at the end is left for the caller to complete
    with more data; with ``final=True`` it is reported as a truncated tail.
    ``quiet_start``: bytes before the first record are not reported (a scan that starts
    at an arbitrary offset, not at a record boundary).
    """
    buf = memoryview(data)
    n = len(buf)
    out: list[Record] = []
    p = 0
    bad_from = None  # start of a damaged stretch not yet reported

    def report(text: str) -> None:
        if problems is not None and not (quiet_start and not out):
            problems.append(text)

    while p + HEADER_SIZE <= n:
        hit = _check_at(buf, p)
        if hit is not None and hit[0] == 0:  # a header whose body is not all here
            if not final:
                break
            if _next_record(data, buf, p + 1) is None:
                break
            hit = None  # a later record is intact, so this length field was damaged
        if hit is None:
            if bad_from is None:
                bad_from = p
            q = _next_record(data, buf, p + 1)
            p = n if q is None else q
            continue
        if bad_from is not None:
            report(f"damaged data at offsets {base + bad_from}..{base + p}"
                   f" ({p - bad_from} bytes) skipped")
            bad_from = None
        rtype, length = hit
        _, _, _, kind, _, _, step, t = REC_HEADER.unpack_from(buf, p)
        out.append(Record(base + p, rtype, kind, step, t,
                          buf[p + HEADER_SIZE:p + HEADER_SIZE + length]))
        p += HEADER_SIZE + length
    if not final:
        return out, (p if bad_from is None else bad_from)
    if bad_from is None and p < n:
        bad_from = p
    if bad_from is not None:
        report(f"truncated or damaged tail: {n - bad_from} bytes at offset {base + bad_from}"
               " ignored")
    return out, n


def _next_record(data: bytes, buf: memoryview, start: int) -> int | None:
    """Offset of the next record magic at or after ``start`` that starts an intact (or
    plausible but incomplete) record; ``None`` if there is none."""
    p = start
    while True:
        p = data.find(REC_MAGIC, p)
        if p < 0:
            return None
        if _check_at(buf, p) is not None:
            return p
        p += 1


class SessionReader:
    """Reads a session file, also while it is being written (up to its size at open).

    ``index`` has one entry per record (``INDEX_DTYPE``), in file order: from the index
    records as far as they are intact and in place, from a forward scan for the rest.
    ``problems`` lists, in words, every damaged stretch (by byte range) and a truncated
    tail; those bytes are ignored. Nothing it allocates is sized by a length field
    larger than the file.
    """

    TAIL_WINDOW = 1 << 20

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise SessionFormatError(f"{self.path} is a directory without a session file")
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"no session file {self.path}") from None
        self.size = os.fstat(self._f.fileno()).st_size
        self.problems: list[str] = []
        self.version = self._check_header()
        self.index = self._build_index()
        self.meta: dict[str, Any] = {}
        self.end: dict[str, Any] | None = None
        self.notes: list[dict[str, Any]] = []
        self._read_notes()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SessionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening -----------------------------------------------------------------------

    def _pread(self, offset: int, n: int) -> bytes:
        return os.pread(self._f.fileno(), n, offset)

    def _check_header(self) -> int:
        head = self._pread(0, FILE_HEADER.size)
        if len(head) < FILE_HEADER.size:
            raise SessionFormatError(f"{self.path} is not a neurotop session file"
                                     f" ({len(head)} bytes long)")
        magic, version, _, crc = FILE_HEADER.unpack(head)
        intact = zlib.crc32(head[:12]) == crc
        if intact and magic == FILE_MAGIC:
            if version > FORMAT_VERSION:
                raise SessionFormatError(
                    f"{self.path} is session format version {version}, newer than this"
                    f" neurotop reads (version {FORMAT_VERSION}); upgrade neurotop")
            return version
        # A damaged header: go on only if records follow, read as this version.
        first = self._pread(FILE_HEADER.size, HEADER_SIZE + (1 << 16))
        if magic[:4] != FILE_MAGIC[:4] and _next_record(first, memoryview(first), 0) is None:
            raise SessionFormatError(f"{self.path} is not a neurotop session file")
        self.problems.append(f"the file header is damaged; reading the records as format"
                             f" version {FORMAT_VERSION}")
        return FORMAT_VERSION

    def _build_index(self) -> np.ndarray:
        """Index records are hints: the chain of them is used as far as it is verified to
        describe the file as it is (the records of each tile the bytes up to it), and the
        rest is found by scanning. So bytes inserted or removed cost only the records they
        damage, and a file whose index records are all intact and in place is not read."""
        last, whole = self._find_last_index()
        if last is None:
            return _entries(self._drop_repeats(whole or []))
        parts, verified_to = self._verified_index(last)
        parts.append(_entries(self._scan_range(verified_to, self.size)))
        index = np.concatenate(parts)
        return index[index["offset"] + HEADER_SIZE + index["length"] <= self.size]

    def _verified_index(self, last: Record) -> tuple[list[np.ndarray], int]:
        """The entries of the index chain that ends at ``last``, earliest first, as far as
        they are verified, and the offset up to which they cover the file."""
        chain = [last]
        while True:
            prev, covers_from = INDEX_HEAD.unpack_from(chain[-1].body)
            if not 0 <= prev < chain[-1].offset:  # the first; or not a chain back (no loop)
                break
            rec = self._read_index_at(prev)
            if rec is None or rec.end != covers_from:
                break
            chain.append(rec)
        parts: list[np.ndarray] = []
        at = FILE_HEADER.size
        for rec in reversed(chain):
            covers_from = INDEX_HEAD.unpack_from(rec.body)[1]
            entries = _listed(rec)
            if entries is None or covers_from < at or (covers_from > at and rec is not chain[-1]):
                self.problems.append(f"the index record at offset {rec.offset} does not match"
                                     " the records before it (bytes inserted or removed);"
                                     f" scanning from offset {at}")
                break
            if at < covers_from:  # the index before this one is damaged
                prev = INDEX_HEAD.unpack_from(rec.body)[0]
                if prev >= 0:
                    self.problems.append(f"index record at offset {prev} damaged; scanning"
                                         " the records it listed")
                parts.append(_entries(self._scan_range(at, covers_from)))
            parts.append(entries)
            at = rec.end
        return parts, at

    def _find_last_index(self) -> tuple[Record | None, list[Record] | None]:
        """The last intact INDEX record, found by scanning windows that grow from the
        end; or, when there is none, every record (the window reached the start)."""
        window = self.TAIL_WINDOW
        while True:
            start = max(FILE_HEADER.size, self.size - window)
            whole = start == FILE_HEADER.size
            problems: list[str] = []
            recs, _ = scan(self._pread(start, self.size - start), start, problems=problems,
                           quiet_start=not whole)
            for r in reversed(recs):
                if _is_index(r):
                    return r, None
            if whole:
                self.problems += problems
                return None, recs
            window *= 4

    def _read_index_at(self, offset: int) -> Record | None:
        head = self._pread(offset, HEADER_SIZE)
        if len(head) < HEADER_SIZE or head[:4] != REC_MAGIC:
            return None
        length = REC_HEADER.unpack(head)[5]
        if offset + HEADER_SIZE + length > self.size:  # never allocate what a length claims
            return None
        recs, _ = scan(self._pread(offset, HEADER_SIZE + length), offset)
        return recs[0] if recs and recs[0].offset == offset and _is_index(recs[0]) else None

    def _scan_range(self, start: int, end: int) -> list[Record]:
        if end <= start:
            return []
        recs, _ = scan(self._pread(start, end - start), start, problems=self.problems)
        return self._drop_repeats([r for r in recs if r.type != INDEX])

    def _drop_repeats(self, recs: list[Record], window: int = 64) -> list[Record]:
        """``recs`` without copies of a record among the ``window`` before it: the writer
        never writes the same bytes twice (every message has its own sequence number), so
        a copy is damage (a duplicated stretch of the file), reported and skipped."""
        out: list[Record] = []
        recent: dict[tuple, Record] = {}
        for r in recs:
            key = (r.type, r.kind, r.step, r.t, len(r.body))
            seen = recent.get(key)
            if seen is not None and seen.body == r.body:
                self.problems.append(f"copy of the record at offset {seen.offset} at offsets"
                                     f" {r.offset}..{r.end} skipped")
                continue
            out.append(r)
            recent[key] = r
            if len(out) > window:
                old = out[-window - 1]
                key = (old.type, old.kind, old.step, old.t, len(old.body))
                if recent.get(key) is old:
                    del recent[key]
        return out

    def _read_notes(self) -> None:
        sel = np.flatnonzero(np.isin(self.index["type"], (META, NOTE, END)))
        for rec in self.records(sel):
            try:
                note = msgpack.unpackb(rec.body, raw=False)
            except Exception:  # CRC-valid but not msgpack: a writer bug; keep reading
                self.problems.append(f"unreadable {rec.type} record at offset {rec.offset}")
                continue
            if not isinstance(note, dict):
                continue
            if rec.type == META and not self.meta:
                self.meta = note
            elif rec.type == END:
                self.end = note
            elif rec.type == NOTE:
                self.notes.append(note)

    # -- reading records ---------------------------------------------------------------

    def chunks(self, positions: np.ndarray | None = None, *, chunk_bytes: int = 8 << 20
               ) -> Iterator[Chunk]:
        """The intact records at ``positions`` (indices into ``index``; default: all), in
        file order, a piece of the file at a time. A record whose CRC fails is reported
        in ``problems`` and left out."""
        pos = np.arange(len(self.index)) if positions is None else np.sort(positions)
        idx = self.index[pos]
        offsets = idx["offset"].astype(np.int64)
        lengths = idx["length"].astype(np.int64)
        ends = offsets + HEADER_SIZE + lengths
        fd = self._f.fileno()
        i, n = 0, len(idx)
        while i < n:
            start = int(offsets[i])
            j = max(int(np.searchsorted(ends, start + chunk_bytes, side="right")), i + 1)
            buf = os.pread(fd, int(ends[j - 1]) - start, start)
            rel = offsets[i:j] - start
            ok = intact(buf, rel, lengths[i:j])
            for bad, bad_end in zip(offsets[i:j][~ok], ends[i:j][~ok], strict=True):
                self.problems.append(f"damaged record at offsets {bad}..{bad_end} skipped")
            e = idx[i:j][ok]
            yield Chunk(buf, start, rel[ok], lengths[i:j][ok], e["type"], e["kind"], e["step"],
                        e["t"], pos[i:j][ok])
            i = j

    def records(self, positions: np.ndarray | None = None) -> Iterator[Record]:
        """Like ``chunks``, one ``Record`` at a time."""
        for c in self.chunks(positions):
            yield from c.records()

    def summary(self) -> dict[str, Any]:
        """What ``neurotop ls`` shows of a session file."""
        stats = self.index["kind"][self.index["type"] == MESSAGE] == kind_code("stats")
        steps = self.index["step"][self.index["type"] == MESSAGE][stats]
        return {"run_id": self.meta.get("run_id", self.path.parent.name),
                "name": self.meta.get("name", ""), "start_time": self.meta.get("start_time", 0.0),
                "host": self.meta.get("host", ""), "pid": self.meta.get("pid"),
                "steps": int(steps.max()) if len(steps) else 0, "size": self.size,
                "closed": self.end is not None, "session": str(self.path)}

    @property
    def dropped(self) -> int:
        """Messages the recorder could not keep up with (from its notes)."""
        counts = [n.get("dropped", 0) for n in [*self.notes, self.end or {}]]
        return max([c for c in counts if isinstance(c, int)], default=0)


@dataclass
class Chunk:
    """Intact records that lie in one buffer (which starts at file offset ``base``): their
    offsets in it (``off``), body lengths, header fields and positions in the reader's
    index, as arrays."""

    buf: bytes
    base: int
    off: np.ndarray
    length: np.ndarray
    type: np.ndarray
    kind: np.ndarray
    step: np.ndarray
    t: np.ndarray
    pos: np.ndarray

    def body(self, i: int) -> memoryview:
        a = int(self.off[i]) + HEADER_SIZE
        return memoryview(self.buf)[a:a + int(self.length[i])]

    def records(self) -> Iterator[Record]:
        for i in range(len(self.off)):
            yield Record(self.base + int(self.off[i]), int(self.type[i]), int(self.kind[i]),
                         int(self.step[i]), float(self.t[i]), self.body(i), int(self.pos[i]))

    @classmethod
    def of(cls, buf: bytes, base: int, recs: list[Record]) -> Chunk:
        """The records ``scan`` found in ``buf`` (which starts at file offset ``base``)."""
        e = _entries(recs)
        return cls(buf, base, e["offset"].astype(np.int64) - base, e["length"].astype(np.int64),
                   e["type"], e["kind"], e["step"], e["t"], np.arange(len(e)))


def message_frames(c: Chunk, which: np.ndarray, count: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frames of many MESSAGE records of chunk ``c`` at once (NumPy, no loop per record),
    for the bulk readers: of the records ``which`` (indices into ``c``), those whose body
    holds exactly ``count`` frames, and for them where each frame starts in ``c.buf`` and
    its length, as ``(kept, starts, lengths)``; ``starts`` and ``lengths`` are
    ``[len(kept), count]``."""
    which = np.asarray(which, np.int64)
    table_bytes = 4 * (1 + count)  # the frame count, then the frame lengths
    which = which[(c.type[which] == MESSAGE) & (c.length[which] >= table_bytes)]
    body = c.off[which] + HEADER_SIZE
    table = u32_at(np.frombuffer(c.buf, np.uint8), body, 1 + count).astype(np.int64)
    lengths = table[:, 1:]
    whole = (table[:, 0] == count) & (c.length[which] == table_bytes + lengths.sum(axis=1))
    which, body, lengths = which[whole], body[whole], lengths[whole]
    before = np.cumsum(lengths, axis=1) - lengths  # the bytes of the frames before each
    return which, body[:, None] + table_bytes + before, lengths


def u32_at(u8: np.ndarray, at: np.ndarray, count: int = 1) -> np.ndarray:
    """Little-endian uint32s at byte offsets ``at`` (``count`` consecutive ones each)."""
    if not len(at):
        return np.empty((0, count), np.uint32)
    gathered = u8[np.asarray(at, np.int64)[:, None] + np.arange(4 * count)]
    return np.ascontiguousarray(gathered).view("<u4").reshape(len(at), count)


def intact(buf: bytes, off: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Which of the records at ``off`` (body ``length``) in ``buf`` have their magic and a
    matching CRC; the CRCs are computed in one tight loop."""
    u8 = np.frombuffer(buf, np.uint8)
    ok = off + HEADER_SIZE + length <= len(u8)
    off, length = np.where(ok, off, 0), np.where(ok, length, 0)
    magic = u32_at(u8, off)[:, 0] == struct.unpack("<I", REC_MAGIC)[0]
    stored = u32_at(u8, off + 4)[:, 0]
    mv = memoryview(buf)
    crcs = np.fromiter((zlib.crc32(mv[a:b]) for a, b in zip((off + 8).tolist(),
                                                          (off + HEADER_SIZE + length).tolist(),
                                                          strict=True)),
                       np.uint32, count=len(off))
    return ok & magic & (crcs == stored)


def _is_index(rec: Record) -> bool:
    """An INDEX record with room for its head and one entry (the writer writes no fewer)."""
    return rec.type == INDEX and len(rec.body) >= INDEX_HEAD.size + INDEX_DTYPE.itemsize


def _listed(rec: Record) -> np.ndarray | None:
    """The entries of INDEX record ``rec`` if they tile the bytes before it without a gap,
    from where it says they start to where it is; else ``None`` (they do not describe the
    file as it is: bytes were inserted or removed, or a record duplicated, before it)."""
    covers_from = INDEX_HEAD.unpack_from(rec.body)[1]
    table = rec.body[INDEX_HEAD.size:]
    if len(table) % INDEX_DTYPE.itemsize:
        return None
    entries = np.frombuffer(table, dtype=INDEX_DTYPE)
    offsets = entries["offset"].astype(np.int64)
    ends = offsets + HEADER_SIZE + entries["length"]
    if (offsets[0] != covers_from or ends[-1] != rec.offset
            or not np.array_equal(offsets[1:], ends[:-1])):
        return None
    return entries


def _entries(recs: list[Record]) -> np.ndarray:
    out = np.empty(len(recs), INDEX_DTYPE)
    for i, r in enumerate(recs):
        out[i] = (r.offset, len(r.body), r.type, r.kind, 0, r.step, r.t)
    return out[out["type"] != INDEX]
