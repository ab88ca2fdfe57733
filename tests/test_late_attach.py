"""`neurotop attach --compare A.ntop`: a live demo run with a recorded one overlaid on the same
screens, as a person watches them (Pilot, real agent, real sockets), and the one-line
errors of a bad recording."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.ranks import JobClient  # what attach runs (a job: every rank)
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.data.targets import resolve
from neurotop.tui.screens.dashboard import AlertFeed, Plot
from neurotop.tui.screens.live_compare_app import LiveCompareApp
from neurotop.tui.screens.widgets import LayerTable
from tests.helpers.cli import neurotop
from tests.helpers.package import ROOT
from tests.helpers.pilot import status_text, until
from tests.helpers.recorded import Recording, read_recording

pytestmark = pytest.mark.slow  # starts training processes

DEMO = ROOT / "demos" / "mlp.py"
#: The same small model in both runs (the layers of the same name), different rates.
MODEL = ("--width", "32", "--depth", "3", "--report-every", "1")
STEPS = 60  # the recording's; the live run is paused well before it
LIVE = "demo-mlp (live)"  # the demo's name is the recording's too: the live one is marked
RECORDED = "demo-mlp"


def record_demo(where: Path, *args: str) -> Path:
    """``demos/mlp.py ARGS`` to its end, recorded under ``where`` (``record_run`` in
    tests/helpers/recorded.py runs tests/scripts/train.py, whose layers the demo's live run
    does not have)."""
    env = dict(os.environ, NEUROTOP_RUNS_DIR=str(where / "runs"),
               NEUROTOP_RUNTIME_DIR=str(where / "runtime"))
    out = subprocess.run([sys.executable, str(DEMO), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    (session,) = (where / "runs").glob("*/session.ntop")
    return session


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Recording]:
    path = record_demo(tmp_path_factory.mktemp("recorded"), "--steps", str(STEPS), "--lr",
                       "0.03", *MODEL)
    return path, read_recording(path)


def open_app(client: LiveClient, path: Path, read_only: bool = False
             ) -> tuple[LiveCompareApp, ReplaySource]:
    """What ``neurotop attach --compare PATH`` runs (``cli._show``)."""
    source = ReplaySource(path)
    source.load()
    return LiveCompareApp(client.start(), [source], read_only=read_only), source


def legend(app: LiveCompareApp, plot: str) -> str:
    return app.query_one(plot, Plot).text.splitlines()[0]


def assert_recorded_upto(app: LiveCompareApp, rec: Recording, step: int) -> None:
    """The recorded run's loss as the plots got it: its recorded values up to ``step``."""
    x, y = app.frame.runs[1].scalars["loss"]
    keep = np.asarray(rec.steps) <= step
    np.testing.assert_array_equal(x, np.asarray(rec.steps)[keep])
    np.testing.assert_allclose(y, rec.scalar("loss")[keep], rtol=1e-6)


async def test_live_run_overlaid_on_a_recording(recorded, start_run):
    path, rec = recorded
    run = start_run(*MODEL, "--step-sleep", "0.03", script=DEMO)
    client = JobClient(resolve(run.info.run_id), backfill=True)
    app, source = open_app(client, path)
    # Held early (at the first step boundary after the agent reads it), so the recording
    # is cut at a step it has: aligned by step.
    paused = client.command("pause", timeout=30)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, paused.done, what="the pause", timeout=31)
            at = paused.result()["step"]
            await until(pilot, lambda: "PAUSED" in status_text(app), what="PAUSED")
            ack = client.command("set", {"knob": "lr", "value": 0.001}, timeout=30).result(31)
            assert ack["ok"] and ack["step"] == at, ack
            await until(pilot, lambda: app.frame.runs and app.frame.runs[0].knobs
                        and RECORDED in legend(app, "#ov-plot-0"), what="the overlay")
            head = legend(app, "#ov-plot-0")
            assert LIVE in head and head.replace(LIVE, "").count(RECORDED) == 1, head
            live, old = app.frame.runs
            assert (live.name, live.selected, live.reference) == (LIVE, True, False)
            assert (old.name, old.selected, old.reference) == (RECORDED, False, True)
            assert live.scalars["loss"][0][-1] == client.store.steps()[-1] <= at
            assert_recorded_upto(app, rec, int(live.scalars["loss"][0][-1]))
            assert at < STEPS  # so the cut above cut something
            loss = app.query_one("#ov-plot-0", Plot).text.splitlines()
            assert any("\u2800" < ch <= "\u28ff" for line in loss[1:-1] for ch in line)
            # The live run's knob change: marked on the lr plot, listed with its run's name.
            assert live.knobs == ((at, "lr=0.001"),)
            assert app.query_one("#ov-plot-1", Plot).text.splitlines()[-1].count("▲") == 1
            assert f"@{at} set: {LIVE} lr=0.001" in app.query_one(AlertFeed).text

            client.command("resume", timeout=30).result(31)
            await until(pilot, lambda: app.frame.runs[0].scalars["loss"][0][-1] > STEPS + 5,
                        what="the live run past the recording's end", timeout=60)
            live, old = app.frame.runs  # the live one went on; the recording is all there
            assert_recorded_upto(app, rec, STEPS)
            assert app.frame.status.step > at
            assert "demo-mlp (live) 0.0010" in legend(app, "#ov-plot-1")  # the new rate

            await pilot.press("2")  # the layers: the live run's, with Δ from the recording
            table = app.query_one(LayerTable)
            await until(pilot, lambda: any(c.startswith("Δ") for c in table.column_names()),
                        what="the difference column")
            assert f"run {LIVE}, Δ from {RECORDED}" in table.title
            assert "r: next run" not in table.title  # r is not theirs in the live app
            await pilot.press("space")  # held, so the table and the live report agree
            await until(pilot, lambda: "PAUSED" in status_text(app), what="PAUSED again")
            await pilot.pause(0.5)
            app.redraw(force=True)
            stat = next(c for c in table.column_names() if c.startswith("Δ"))[1:]
            sc = client.store.frame().schema
            got = app.frame.latest[:, list(app.frame.schema.stats).index("Δ" + stat)]
            live_now = client.store.latest_block()[:, sc.stats.index(stat)]
            want = live_now - rec.layer_stat(stat)[-1]  # the recording's last: it ended
            assert len(got) == len(rec.schema["layers"]) == len(sc.layers)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

            await pilot.press("3")  # one layer's statistics, each run's line
            plot = app.query_one("#dt-plot-0", Plot)
            await until(pilot, lambda: LIVE in plot.text and
                        plot.text.replace(LIVE, "").count(RECORDED) == 1,
                        what="the detail plots' legend")
            await pilot.press("q")
        assert run.proc.poll() is None, "quitting the viewer must not stop the run"
    finally:
        client.close()
        source.close()


async def test_tcp_target_watch_only_with_a_recording(recorded, start_run):
    path, rec = recorded
    run = start_run(*MODEL, "--step-sleep", "0.05", script=DEMO)
    assert run.info.telemetry.startswith("tcp://")
    client = JobClient(resolve(run.info.telemetry), backfill=True)
    app, source = open_app(client, path, read_only=True)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: len(app.frame.runs) == 2
                        and len(app.frame.runs[0].scalars.get("loss", ((),))[0]) > 3,
                        what="the live run's loss", timeout=30)
            first = app.frame.runs[0].scalars["loss"][0][-1]
            assert_recorded_upto(app, rec, int(first))
            await until(pilot, lambda: app.frame.runs[0].scalars["loss"][0][-1] > first + 5,
                        what="the live run advancing")
            head = legend(app, "#ov-plot-0")
            assert LIVE in head and head.replace(LIVE, "").count(RECORDED) == 1, head
            assert_recorded_upto(app, rec, int(app.frame.runs[0].scalars["loss"][0][-1]))
            assert "read-only" in status_text(app)
    finally:
        client.close()
        source.close()


def test_a_missing_or_corrupt_recording_is_one_line_as_in_replay(tmp_path, recorded):
    missing = tmp_path / "missing.ntop"
    corrupt = tmp_path / "corrupt.ntop"
    corrupt.write_bytes(b"not a session file at all" * 10)
    for bad in (missing, corrupt):
        out = neurotop("attach", "--compare", str(bad))
        replay = neurotop("replay", str(bad))
        assert out.returncode == replay.returncode == 2, out
        assert out.stderr == replay.stderr  # the same one-line error
        assert len(out.stderr.strip().splitlines()) == 1 and str(bad) in out.stderr, out.stderr
        # The good file first, the bad one after: still the bad one's line, no UI.
        out = neurotop("attach", "--compare", str(recorded[0]), str(bad))
        assert out.returncode == 2 and str(bad) in out.stderr.splitlines()[-1], out.stderr
    out = neurotop("demo", "--no-ui", "--compare", str(recorded[0]))
    assert out.returncode == 2 and "--no-ui" in out.stderr, out.stderr
