"""Session files on their own: framing, index, damage, versions, the recorder thread, and
that replay's bulk loading gives exactly what the live decoder gives."""

from __future__ import annotations

import random
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import (
    FILE_HEADER,
    INDEX,
    INDEX_DTYPE,
    INDEX_HEAD,
    MESSAGE,
    SessionFormatError,
    SessionReader,
)
from neurotop.service.recorder import Recorder
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.data.store import RunStore
from tests.helpers.sessions import write_run


def reference_store(messages: list[list[bytes]], upto_step: int | None = None) -> RunStore:
    """What a live viewer subscribed from the start would hold (after step ``upto_step``)."""
    store = RunStore()
    for frames in messages:
        msg = wire.decode(frames)
        if upto_step is not None and msg.kind == wire.STATS and msg.header["step"] > upto_step:
            break
        store.ingest(msg)
    return store


def assert_same_series(got: RunStore, want: RunStore) -> None:
    assert got.schema == want.schema
    np.testing.assert_array_equal(got.steps(), want.steps())
    for name in want.schema["scalars"]:
        np.testing.assert_array_equal(got.scalar(name)[1], want.scalar(name)[1])
    n = len(want.steps())
    for stat in want.schema["stats"]:
        np.testing.assert_array_equal(got.recent_series(stat, n), want.recent_series(stat, n))
    assert [e["id"] if "id" in e else e["alert"] for e in got.status.events] == \
        [e["id"] if "id" in e else e["alert"] for e in want.status.events]


def test_replay_loads_exactly_what_live_ingest_gives(tmp_path):
    """Index chain, bulk stats, a schema that grows a scalar, NaNs, events: all identical."""
    path = tmp_path / "s.ntop"
    run = write_run(path, 400, extra_scalar_at=150, events_every=70, index_every=16)
    src = ReplaySource(path)
    src.load()
    assert src.problems == []
    assert_same_series(src.store, reference_store(run.messages))
    assert src.store.status.step == 400 and src.store.schema["scalars"][2] == "acc"
    src.close()


def test_seeking_shows_the_run_as_it_was_then(tmp_path):
    """Back and forth, across a change of layers (which forces a reload), and to events."""
    path = tmp_path / "s.ntop"
    run = write_run(path, 300, relayer_at=120, events_every=50)
    src = ReplaySource(path).start()
    try:
        for step in (250, 60, 200, 119, 120, 5, 300, 1):
            tl = src.seek_step(step).result(10)
            assert tl.step == step
            assert_same_series(src.store, reference_store(run.messages, upto_step=step))
        assert src.jump_marker(+1).result(10).step == 50  # from step 1 to the first ack
        assert src.store.status.events[-1]["cmd"] == "pause"
        assert src.jump_marker(+1).result(10).step == 50  # its resume, same step
        assert src.jump_marker(+1).result(10).step == 50  # and the alert
        assert src.jump_marker(+1).result(10).step == 100
        assert src.jump_marker(-1).result(10).step == 50
        assert src.to_end().result(10).step == 300
        assert len(src.store.steps()) == 300 - 119  # the store keeps the last layout only
    finally:
        src.close()


def test_random_truncation_and_byte_flips_lose_only_damaged_records(tmp_path):
    """Over many seeds: the reader never raises, returns every record whose bytes are
    intact (and nothing else), and replay loads only true values."""
    path = tmp_path / "orig.ntop"
    run = write_run(path, 120, index_every=8, events_every=40)
    data = path.read_bytes()
    with SessionReader(path) as r:
        spans = {int(e["offset"]): int(e["offset"]) + 32 + int(e["length"])
                 for e in r.index if e["type"] == MESSAGE}
    truth = {}
    for frames in run.messages:
        m = wire.decode(frames)
        if m.kind == wire.STATS:
            truth[m.header["step"]] = m.arrays[0]
    damaged = tmp_path / "damaged.ntop"
    for seed in range(150):
        rng = random.Random(seed)
        buf = bytearray(data)
        flips = [rng.randrange(FILE_HEADER.size, len(buf)) for _ in range(rng.randint(0, 6))]
        for f in flips:
            buf[f] ^= 1 << rng.randrange(8)
        cut = rng.randrange(FILE_HEADER.size, len(buf)) if rng.random() < 0.5 else len(buf)
        damaged.write_bytes(bytes(buf[:cut]))
        with SessionReader(damaged) as r:
            got = {rec.offset: bytes(rec.body) for rec in r.records() if rec.type == MESSAGE}
            if flips or cut < len(buf):
                assert r.problems, f"seed {seed}: damage not reported"
        for off, end in spans.items():
            whole = end <= cut and not any(off <= f < end for f in flips)
            if whole:
                assert got.get(off) == data[off + 32:end], f"seed {seed}: lost record {off}"
            else:
                assert off not in got, f"seed {seed}: damaged record {off} returned"
        src = ReplaySource(damaged)
        src.load()
        steps = src.store.steps()
        assert np.all(np.diff(steps) > 0)
        hist = src.store.recent_series("mean", len(steps))
        for i, step in enumerate(steps):
            np.testing.assert_array_equal(hist[:, i], truth[int(step)][:, 0])
        src.close()


def test_a_damaged_file_header_is_reported_and_records_still_read(tmp_path):
    path = tmp_path / "s.ntop"
    write_run(path, 30)
    buf = bytearray(path.read_bytes())
    buf[2] ^= 0xFF
    path.write_bytes(bytes(buf))
    with SessionReader(path) as r:
        assert any("file header is damaged" in p for p in r.problems)
        assert (r.index["type"] == MESSAGE).sum() > 30


def test_a_newer_format_version_is_a_clear_error(tmp_path):
    path = tmp_path / "s.ntop"
    write_run(path, 10)
    buf = bytearray(path.read_bytes())
    head = buf[:8] + struct.pack("<HH", 2, 0)
    buf[:16] = head + struct.pack("<I", zlib.crc32(head))
    path.write_bytes(bytes(buf))
    with pytest.raises(SessionFormatError, match="session format version 2, newer than this"
                                                 r" neurotop reads \(version 1\); upgrade"):
        SessionReader(path)


def test_not_a_session_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a recording at all")
    with pytest.raises(SessionFormatError, match="is not a neurotop session file"):
        SessionReader(path)


def test_readable_while_written_and_a_half_written_record_is_a_truncated_tail(tmp_path):
    path = tmp_path / "s.ntop"
    run = write_run(path, 50, close=False)
    run.writer.flush()
    with SessionReader(path) as r:
        assert r.end is None and r.problems == []
        n = (r.index["type"] == MESSAGE).sum()
    assert n == len(run.messages)
    with open(path, "ab") as f:  # what a kill -9 in the middle of a write leaves
        f.write(b"\x8eREC" + b"\x00" * 20)
    with SessionReader(path) as r:
        assert (r.index["type"] == MESSAGE).sum() == n
        assert any("truncated" in p for p in r.problems)


def test_recorder_never_blocks_on_a_stuck_disk_and_counts_what_it_drops(tmp_path):
    rec = Recorder(tmp_path / "s.ntop", {"run_id": "slow"}, max_queued=8)
    write = rec._writer.write_message
    disk = threading.Event()  # set: the disk takes writes again

    def stuck_write(*args, **kwargs):
        disk.wait()
        return write(*args, **kwargs)

    rec._writer.write_message = stuck_write
    rec.start()
    frames = wire.encode({"kind": "stats", "step": 0}, [np.zeros((50, 4), np.float32)])
    # Should record() wait for the disk, only this timer lets it go on: then it is too late.
    rescue = threading.Timer(60, disk.set)
    rescue.start()
    for step in range(200):
        rec.record("stats", step, float(step), frames)
    blocked = disk.is_set()
    disk.set()
    rescue.cancel()
    assert not blocked, "record() waited for the disk"
    # Kept: the queue and the one message being written; the rest dropped and counted.
    assert rec.dropped >= 200 - rec.max_queued - 1
    rec.close()
    with SessionReader(rec.path) as r:
        written = int((r.index["type"] == MESSAGE).sum())
        assert r.dropped == rec.dropped
    assert written + rec.dropped == 200


def test_sync_makes_everything_recorded_readable(tmp_path):
    rec = Recorder(tmp_path / "s.ntop", {"run_id": "sync"}, flush_s=60.0)
    rec.start()
    frames = wire.encode({"kind": "heartbeat", "step": 1})
    for step in range(10):
        rec.record("heartbeat", step, 0.0, frames)
    assert rec.sync(5.0)
    with SessionReader(rec.path) as r:
        assert (r.index["type"] == MESSAGE).sum() == 10
        assert r.index["offset"][-1] + 32 + r.index["length"][-1] == rec.flushed_size
    rec.close()


def test_export_writes_documented_csv_tables(tmp_path):
    from neurotop.tui.data.export import export_csv

    path = tmp_path / "s.ntop"
    run = write_run(path, 40, events_every=20)
    src = ReplaySource(path)
    scalars_csv, layers_csv, events_csv, _ = export_csv(src, tmp_path / "csv")
    ref = reference_store(run.messages)
    rows = np.genfromtxt(scalars_csv, delimiter=",", names=True)
    assert rows.dtype.names == ("step", "time", "loss", "grad_norm", "lr")
    np.testing.assert_array_equal(rows["step"], ref.steps())
    np.testing.assert_array_equal(rows["loss"].astype(np.float32), ref.scalar("loss")[1])
    lines = Path(layers_csv).read_text().splitlines()
    assert lines[0] == "step,layer,mean,std,max_abs,zero_frac"
    assert len(lines) == 1 + 40 * 3
    step, layer, *vals = lines[1 + 3 * 16].split(",")  # step 17, layer net.0: a NaN std
    assert (step, layer, vals[1]) == ("17", "net.0", "nan")
    want = np.stack([ref.recent_series(s, 40) for s in ref.schema["stats"]], -1)  # [L, T, S]
    got = np.array([ln.split(",")[2:] for ln in lines[1:]], np.float32).reshape(40, 3, 4)
    np.testing.assert_array_equal(got, want.transpose(1, 0, 2))
    events = Path(events_csv).read_text().splitlines()
    assert events[0] == "step,time,kind,event,cmd,ok,old,new,error,sender,details"
    assert len(events) == 1 + 2 * 3 and ",pause,True," in events[1] and "dying_layer" in events[3]
    src.close()


def test_an_index_chain_that_loops_does_not_hang_the_reader(tmp_path):
    """A crafted (CRC-valid) INDEX whose previous index is itself: read by scanning."""
    path = tmp_path / "s.ntop"
    run = write_run(path, 20, close=False)
    w = run.writer
    w.write_index()
    at = w.offset
    entry = np.zeros(1, INDEX_DTYPE)
    body_len = INDEX_HEAD.size + entry.nbytes
    w.write(INDEX, [INDEX_HEAD.pack(at, at + 32 + body_len), entry.tobytes()])
    w.close()
    with SessionReader(path) as r:
        assert (r.index["type"] == MESSAGE).sum() == len(run.messages)
        assert r.end is not None
