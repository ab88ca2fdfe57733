"""Recording in real training processes: what replay shows is what was live, a `kill -9`
leaves a readable file, and a viewer attaching late gets the whole run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from neurotop.protocol import wire
from neurotop.protocol.runs import SESSION_FILE
from neurotop.protocol.sessionfile import MESSAGE, SessionReader
from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.data.targets import resolve
from tests.helpers.cli import neurotop
from tests.helpers.telemetry import Subscriber
from tests.helpers.training import watch_options
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow  # starts training processes


def recorded_steps(path: Path) -> np.ndarray:
    if not path.exists():
        return np.empty(0, np.int64)
    with SessionReader(path) as r:
        ix = r.index
        return ix["step"][(ix["type"] == MESSAGE) & (ix["kind"] == 2)]


def test_record_then_replay_gives_identical_values(start_run):
    run = start_run("--steps", "120", "--step-sleep", "0.015", held=True)
    session = Path(run.info.run_dir) / SESSION_FILE
    assert session.is_file(), "the connection file names the run directory"
    with Subscriber(run.info.telemetry).ready() as sub:
        run.go()  # subscribed first: every step is seen live
        live = {m.header["step"]: m for m in sub.collect(60, until_step=120)
                if m.kind == wire.STATS}
    assert run.proc.wait(30) == 0
    src = ReplaySource(session)
    src.load()
    assert src.problems == [] and src.reader.end is not None  # closed cleanly
    store = src.store
    steps = store.steps()
    np.testing.assert_array_equal(steps, np.arange(1, 121))
    names = store.schema["scalars"]
    scalars = np.stack([store.scalar(n)[1] for n in names], 1)
    blocks = np.stack([store.recent_series(s, 120) for s in store.schema["stats"]], -1)
    assert sorted(live) == list(range(1, 121)), "a step was not seen live"
    for step, m in live.items():
        np.testing.assert_array_equal(blocks[:, step - 1], m.arrays[0])
        np.testing.assert_array_equal(scalars[step - 1], m.arrays[1])
    src.close()


def test_kill_9_mid_write_then_replay(start_run):
    run = start_run("--step-sleep", "0.002")
    session = Path(run.info.run_dir) / SESSION_FILE
    wait_until(lambda: len(recorded_steps(session)) > 300, timeout=30, what="300 steps on disk")
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(10)
    with SessionReader(session) as r:
        assert r.end is None
        assert all("truncated" in p for p in r.problems), r.problems
    src = ReplaySource(session)
    src.load()
    steps = src.store.steps()
    assert len(steps) >= 300 and steps[0] == 1
    np.testing.assert_array_equal(np.diff(steps), 1)  # every step up to the last flush
    assert np.isfinite(src.store.scalar("loss")[1]).all()
    src.close()
    out = neurotop("ls", "--json")
    listed = {r["run_id"]: r for r in json.loads(out.stdout)}
    assert listed[run.info.run_id]["state"] == "ended*"
    assert listed[run.info.run_id]["steps"] >= 300


def test_late_attach_sees_steps_from_before_the_ui_started(start_run):
    run = start_run("--step-sleep", "0.01")
    session = Path(run.info.run_dir) / SESSION_FILE
    wait_until(lambda: len(recorded_steps(session)) > 150, timeout=30, what="150 steps")
    client = LiveClient(resolve(run.info.run_id), backfill=True).start()
    try:
        store = client.store
        wait_until(lambda: len(store.steps()) and not store.status.backfill, timeout=20,
                   what="the history")
        attached_at = int(store.steps()[-1])
        wait_until(lambda: store.status.step > attached_at + 30, timeout=20, what="live steps")
        steps = store.steps()
        assert steps[0] == 1, "steps from before the viewer started are missing"
        np.testing.assert_array_equal(np.diff(steps), 1)  # no gap, no duplicate at the seam
        assert store.status.missed == 0 and store.status.bad_messages == 0
    finally:
        client.close()


def test_late_attach_to_an_unrecorded_run_says_so_and_goes_on_live(start_run):
    run = start_run("--step-sleep", "0.01", *watch_options(record=False))
    assert run.info.run_dir == ""
    client = LiveClient(resolve(run.info.run_id), backfill=True).start()
    try:
        store = client.store
        wait_until(lambda: "not recording" in store.status.backfill, what="the refusal")
        first = store.status.step
        wait_until(lambda: len(store.steps()) > 10 and store.status.step > first + 10,
                   what="live steps")
    finally:
        client.close()
