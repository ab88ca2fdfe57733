"""The session-file reader against damaged files, property-based (``hypothesis``): over
truncations, bit flips, insertions, duplications, zero-fills and huge length fields of a
recorded file with index records in it, the reader raises nothing, finishes in time,
allocates no more than the file's size calls for (whatever a length field claims),
returns every record the damage left whole (wherever the damage moved it), once, and
nothing else, and reports the damage naming only byte ranges that hold it.

``hypothesis`` rather than hand-rolled seeds: it explores the edits, shrinks a failure to
the smallest edit that still fails, and prints it."""

from __future__ import annotations

import re
import struct
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neurotop.protocol.sessionfile import (
    FILE_HEADER,
    HEADER_SIZE,
    INDEX,
    MAX_RECORD_BYTES,
    SessionReader,
    scan,
)
from tests.helpers.sessions import write_run

RECORDED: tuple[bytes, list[tuple[int, int, int, int, bytes]]] | None = None


def recorded(tmp: Path) -> tuple[bytes, list[tuple[int, int, int, int, bytes]]]:
    """A few hundred records from the real writer, an index record every 32, and every
    record in it as ``(offset, end, type, step, body)`` (the index records too)."""
    global RECORDED
    if RECORDED is None:
        path = tmp / "recorded.ntop"
        write_run(path, 150, index_every=32, events_every=40)
        data = path.read_bytes()
        recs, _ = scan(data[FILE_HEADER.size:], FILE_HEADER.size)
        assert sum(r.type == INDEX for r in recs) >= 5 and len(recs) > 200
        RECORDED = data, [(r.offset, r.end, r.type, r.step, bytes(r.body)) for r in recs]
    return RECORDED


@dataclass(frozen=True)
class Edit:
    """Bytes ``[at, stop)`` of the file replaced by ``new``: every kind of damage is one."""

    what: str
    at: int
    stop: int
    new: bytes

    def apply(self, data: bytes) -> bytes:
        return data[:self.at] + self.new + data[self.stop:]

    @property
    def shift(self) -> int:
        return len(self.new) - (self.stop - self.at)

    def moved(self, off: int, end: int) -> int | None:
        """Where a record at ``[off, end)`` is after the edit; ``None`` if it touched it."""
        if end <= self.at:
            return off
        if off >= self.stop:
            return off + self.shift
        return None


def edits(data: bytes, recs: list) -> st.SearchStrategy[Edit]:
    n = len(data)
    pos = st.integers(0, n - 1)
    # Any record, the index records (which the reader follows) as often as all others.
    record = st.one_of(st.sampled_from(recs), st.sampled_from([r for r in recs if r[2] == INDEX]))

    @st.composite
    def truncation(draw) -> Edit:
        cut = draw(st.one_of(st.integers(FILE_HEADER.size, n - 1),
                             record.map(lambda r: r[0])))  # mid-record and at boundaries
        return Edit("truncation", cut, n, b"")

    @st.composite
    def flip(draw) -> Edit:
        p = draw(pos)
        return Edit("flip", p, p + 1, bytes([data[p] ^ (1 << draw(st.integers(0, 7)))]))

    @st.composite
    def insertion(draw) -> Edit:
        p = draw(st.one_of(pos, record.map(lambda r: r[0])))
        new = draw(st.one_of(st.binary(min_size=1, max_size=64),
                             st.integers(1, 64).map(bytes)))  # random bytes or zeros
        return Edit("insertion", p, p, new)

    @st.composite
    def duplication(draw) -> Edit:
        if draw(st.booleans()):  # whole records, repeated right after themselves
            first = draw(st.integers(0, len(recs) - 1))
            last = draw(st.integers(first, min(first + 3, len(recs) - 1)))
            a, b = recs[first][0], recs[last][1]
        else:  # any stretch of bytes
            a = draw(pos)
            b = draw(st.integers(a + 1, min(n, a + 400)))
        return Edit("duplication", b, b, data[a:b])

    @st.composite
    def zero_fill(draw) -> Edit:
        a = draw(pos)
        b = draw(st.integers(a + 1, min(n, a + 300)))
        return Edit("zero-fill", a, b, bytes(b - a))

    @st.composite
    def huge_length(draw) -> Edit:
        off = draw(record)[0]
        length = draw(st.one_of(st.sampled_from([MAX_RECORD_BYTES, MAX_RECORD_BYTES + 1,
                                                 2**32 - 1, n]),
                                st.integers(n, 2**32 - 1)))
        return Edit("huge length", off + 12, off + 16, struct.pack("<I", length))

    return st.one_of(truncation(), flip(), insertion(), duplication(), zero_fill(),
                     huge_length())


RANGE = re.compile(r"offsets (\d+)\.\.(\d+)|(\d+) bytes at offset (\d+)")


def reported_ranges(problems: list[str]) -> list[tuple[int, int]]:
    out = []
    for m in RANGE.finditer("\n".join(problems)):
        if m[1] is not None:
            out.append((int(m[1]), int(m[2])))
        else:
            out.append((int(m[4]), int(m[4]) + int(m[3])))
    return out


def check(edit: Edit, data: bytes, recs: list, damaged: Path) -> None:
    buf = edit.apply(data)
    damaged.write_bytes(buf)
    tracemalloc.start()
    try:
        with SessionReader(damaged) as r:
            got = {rec.offset: (rec.type, rec.step, bytes(rec.body)) for rec in r.records()}
            problems = list(r.problems)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Memory: what the file's size calls for, never what a length field claims (4 GiB).
    assert peak < 6 * len(buf) + (2 << 20), f"{edit.what}: reader allocated {peak} bytes"

    want = {}  # where each record the edit left whole is now
    lo, hi = edit.at, edit.at + len(edit.new)  # the damaged bytes, in the damaged file
    if edit.at < FILE_HEADER.size:  # records are looked for from where it used to end
        lo, hi = 0, max(hi, FILE_HEADER.size, FILE_HEADER.size + edit.shift)
    for off, end, rtype, step, body in recs:
        new_off = edit.moved(off, end)
        if new_off is None:
            lo, hi = min(lo, off), max(hi, min(end + edit.shift, len(buf)))
        elif rtype != INDEX:
            want[new_off] = (rtype, step, body)
    lost = [off for off, rec in want.items() if got.get(off) != rec]
    assert not lost, f"{edit.what}: undamaged records lost at {lost[:10]} ({problems})"
    contents = {(rtype, step, body) for _, _, rtype, step, body in recs}
    for off, rec in got.items():
        if off not in want:  # only a record the damage holds (a duplicate), and a real one
            assert lo <= off + HEADER_SIZE + len(rec[2]) and off <= hi, (edit.what, off)
            assert rec in contents, f"{edit.what}: a record that was never written at {off}"
    for a, b in reported_ranges(problems):
        assert a <= hi and lo <= b, f"{edit.what}: {a}..{b} reported; damage is {lo}..{hi}"
    assert len(set(got.values())) == len(got), f"{edit.what}: a record read twice"
    # Damage is always reported; only a cut between records looks like a file being written.
    boundary_cut = edit.what == "truncation" and any(off == edit.at for off, *_ in recs)
    if buf != data and not boundary_cut:
        assert problems, f"{edit.what}: damage not reported"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def original(workdir: Path) -> tuple[bytes, list]:
    return recorded(workdir)


def test_the_undamaged_file_is_read_whole_from_its_index(original, workdir):
    data, recs = original
    with SessionReader(workdir / "recorded.ntop") as r:
        assert r.problems == [] and r.end is not None
        assert len(r.index) == sum(rtype != INDEX for _, _, rtype, _, _ in recs)


def test_one_inserted_byte_loses_only_the_record_it_lands_in(original, workdir):
    """The issue's case: a zero byte inserted at offset 1000."""
    data, recs = original
    hit = next((off, end) for off, end, *_ in recs if off < 1000 < end)
    check(Edit("insertion", 1000, 1000, b"\0"), data, recs, workdir / "one.ntop")
    with SessionReader(workdir / "one.ntop") as r:
        assert len(r.index) == sum(rtype != INDEX for _, _, rtype, _, _ in recs) - 1
        assert f"damaged data at offsets {hit[0]}..{hit[1] + 1}" in "\n".join(r.problems)


@settings(max_examples=300, deadline=3000, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_damage_loses_only_the_records_it_touches(data, workdir):
    raw, recs = recorded(workdir)  # not a fixture: hypothesis would print it whole
    edit = data.draw(edits(raw, recs))
    check(edit, raw, recs, workdir / "damaged.ntop")
