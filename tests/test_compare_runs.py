"""`neurotop replay A B`: two real recorded runs of different learning rates on the same
screens, as a person compares them (Pilot), and as they look (snapshots)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import MESSAGE, SessionReader, SessionWriter, decode_message
from neurotop.tui.data.client import Endpoints, LiveClient
from neurotop.tui.data.compare import Comparison
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.screens.dashboard import AlertFeed, Plot
from neurotop.tui.screens.replay_app import ReplayApp, TimelineBar
from neurotop.tui.screens.widgets import LayerTable
from tests.helpers.cli import neurotop
from tests.helpers.pilot import status_text, until
from tests.helpers.recorded import Recording, read_recording, record_run
from tests.helpers.training import start_training
from tests.helpers.waiting import wait_until

STEPS = 60
SET_AT = 21  # run B pauses early, steps on to here, and its lr is set here


@dataclass
class Runs:
    a: Path
    b: Path
    rec_a: Recording
    rec_b: Recording


def record_with_knob_change(where: Path) -> Path:
    """A real run (lr 0.2) whose operator sets lr to 0.1 at step ``SET_AT``: paused first,
    so the change lands at the same step every time."""
    gate = where / "go"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUROTOP_RUNS_DIR", str(where / "runs"))
        mp.setenv("NEUROTOP_RUNTIME_DIR", str(where / "runtime"))
        run = start_training("--steps", str(STEPS), "--lr", "0.2", "--config",
                             json.dumps({"name": "lr-0.2"}), gate=gate)
    client = LiveClient(Endpoints(run.info.telemetry, run.info.control,
                                  run.info.key_bytes)).start()
    try:
        paused = client.command("pause", timeout=60)  # applied at an early step's boundary
        run.go()
        at = paused.result(61)["step"]
        assert at < SET_AT
        client.command("step", {"n": SET_AT - at}, timeout=60).result(61)
        wait_until(lambda: (s := client.store.frame().status).state == "paused"
                   and s.step == SET_AT, timeout=60)
        ack = client.command("set", {"knob": "lr", "value": 0.1}, timeout=60).result(61)
        assert ack["ok"] and ack["step"] == SET_AT, ack
        client.command("resume", timeout=60).result(61)
        assert run.proc.wait(120) == 0
    finally:
        client.close()
        run.stop()
    (session,) = (where / "runs").glob("*/session.ntop")
    return session


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    a = record_run(tmp_path_factory.mktemp("run-a"), "--steps", str(STEPS), "--lr", "0.02",
                   "--config", json.dumps({"name": "lr-0.02"}))
    b = record_with_knob_change(tmp_path_factory.mktemp("run-b"))
    return Runs(a, b, read_recording(a), read_recording(b))


def open_comparison(runs: Runs) -> tuple[ReplayApp, list[ReplaySource]]:
    sources = [ReplaySource(runs.a).start(), ReplaySource(runs.b).start()]
    return ReplayApp(sources[0], Comparison(sources)), sources


def at_end(app: ReplayApp) -> bool:
    return f"step {STEPS} / {STEPS}" in str(app.query_one(TimelineBar).render())


@pytest.mark.slow
async def test_two_runs_overlaid_with_knob_change_and_difference(runs):
    app, sources = open_comparison(runs)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: at_end(app), what="the recordings")
            await until(pilot, lambda: "lr-0.02" in app.query_one("#ov-plot-0", Plot).text,
                        what="the loss plot's legend")
            loss = app.query_one("#ov-plot-0", Plot).text.splitlines()
            assert "lr-0.02" in loss[0] and "lr-0.2" in loss[0], loss[0]  # the legend
            (ra, rb) = app.frame.runs  # what the plots drew: each run's own curve
            np.testing.assert_allclose(ra.scalars["loss"][1], runs.rec_a.scalar("loss"))
            np.testing.assert_allclose(rb.scalars["loss"][1], runs.rec_b.scalar("loss"))
            assert any(ch for line in loss[1:-1] for ch in line if "\u2800" < ch <= "\u28ff")

            lr = app.query_one("#ov-plot-1", Plot).text.splitlines()
            assert "lr-0.02 0.02" in lr[0] and "lr-0.2 0.1" in lr[0], lr[0]
            steps, b_lr = rb.scalars["lr"]
            np.testing.assert_allclose(b_lr, np.where(steps <= SET_AT, 0.2, 0.1), rtol=1e-6)
            # The knob change: a tick on the x axis where step 21 falls, listed in the feed.
            axis = lr[-1]
            assert axis.count("▲") == 1
            assert f"@{SET_AT} set: lr-0.2 lr=0.1" in app.query_one(AlertFeed).text
            assert "lr-0.2" in status_text(app)  # the selected run's header

            await pilot.press("2")
            table = app.query_one(LayerTable)
            await until(pilot, lambda: any(c.startswith("Δ") for c in table.column_names()),
                        what="the difference column")
            stat = next(c for c in table.column_names() if c.startswith("Δ"))[1:]
            sc = runs.rec_b.schema
            want = runs.rec_b.layer_stat(stat)[-1] - runs.rec_a.layer_stat(stat)[-1]
            got = app.frame.latest[:, list(app.frame.schema.stats).index("Δ" + stat)]
            assert np.any(want != 0)  # the learning rates changed what the layers do
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert len(got) == len(sc["layers"])
            assert "run lr-0.2, Δ from lr-0.02" in table.title

            await pilot.press("3")  # one layer's statistics, each run's line on each plot
            plot = app.query_one("#dt-plot-0", Plot)
            await until(pilot, lambda: "lr-0.02" in plot.text and "lr-0.2" in plot.text,
                        what="the detail plots' legend")
            (ra, rb) = app.frame.runs
            for run, rec in ((ra, runs.rec_a), (rb, runs.rec_b)):
                k = run.stats.index("mean")
                np.testing.assert_allclose(run.layer[1][:, k], rec.layer_stat("mean")[:, 0],
                                           rtol=1e-6)
            assert plot.text.splitlines()[-1].count("▲") == 1

            await pilot.press("2", "r")  # the reference's own values: no difference
            await until(pilot, lambda: "run lr-0.02" in table.title, what="the next run")
            got = app.frame.latest[:, list(app.frame.schema.stats).index("Δ" + stat)]
            assert np.nanmax(np.abs(got)) == 0

            await pilot.press("1", "home")  # every run goes back with the reference
            await until(pilot, lambda: [len(r.scalars["loss"][0]) if "loss" in r.scalars
                                          else -1 for r in app.frame.runs]
                        == [1, 1], what="both runs at step 1")  # (mid-rewind: no loss yet)
            await pilot.press("q")
    finally:
        for s in sources:
            s.close()


@pytest.mark.slow
def test_replay_of_a_run_and_a_missing_one_says_which(runs, tmp_path):
    missing = tmp_path / "nope.ntop"
    out = neurotop("replay", str(runs.a), str(missing))
    assert out.returncode != 0
    assert str(missing) in out.stderr and "Traceback" not in out.stderr, out.stderr


#: What a recording measured of the machine rather than computed by training, pinned for
#: the snapshots: the clock, throughput, memory, CPU, who sent the commands.
STEADY_SYSTEM = {"cpu_pct": 50.0, "host_cpu_pct": 60.0, "cpus": 2, "rss": 300 << 20,
                 "mem_total": 16 << 30, "mem_available": 8 << 30, "gpus": [],
                 "no_gpu": "no pynvml (pip install 'neurotop[gpu]' for GPU metrics)"}
STEADY_SCALARS = {"steps_per_s": 20.0, "samples_per_s": 1280.0, "mem_host": 300 << 20,
                  "mem_device": 0.0, "mem_device_peak": 0.0}
T0 = 1_700_000_000.0


def steady_copy(src: Path, dst: Path) -> Path:
    """``src``'s messages, as recorded, with what depends on the machine and the clock made
    the same every time (``STEADY_*``; each message's time from its step, 20 steps/s), so a
    snapshot shows what the training computed and nothing the machine measured."""
    with SessionReader(src) as r:
        name = str(r.meta.get("name", ""))
        writer = SessionWriter(dst, {"run_id": f"run-{name}", "name": name, "start_time": T0})
        step = 0
        names: list[str] = []
        for rec in r.records():
            if rec.type != MESSAGE:
                continue
            m = decode_message(rec.body)
            h, arrays = dict(m.header), list(m.arrays)
            step = max(step, int(h.get("step") or 0))
            t = T0 + step / 20
            h.update(t=t, run=f"run-{name}", **({"wall": t} if "wall" in h else {}))
            if "sender" in h:
                h["sender"] = "tester@host"
            if h.get("pause_reason"):
                h["pause_reason"] = "paused by tester@host"
            if h["kind"] == "schema":
                names = h["scalars"]
                h.update(start_time=T0, pid=1)
            elif h["kind"] == "heartbeat":
                h.update(system=STEADY_SYSTEM, steps_per_s=20.0, control="tcp://127.0.0.1:1")
            elif h["kind"] == "stats":
                arrays[1] = arrays[1].copy()
                for n, v in STEADY_SCALARS.items():
                    if n in names:
                        arrays[1][names.index(n)] = v
            h.pop("v", None)
            h.pop("arrays", None)
            writer.write_message(wire.encode(h, tuple(arrays)), kind=h["kind"],
                                 step=-1 if h.get("step") is None else int(h["step"]), t=t)
        writer.close({"dropped": 0}, t=T0 + step / 20)
    return dst


@pytest.fixture(scope="module")
def steady(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    where = tmp_path_factory.mktemp("steady")
    a, b = steady_copy(runs.a, where / "a.ntop"), steady_copy(runs.b, where / "b.ntop")
    return Runs(a, b, runs.rec_a, runs.rec_b)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
@pytest.mark.parametrize("screen", ["1", "2"], ids=["overview", "layers"])
def test_compare_snapshot(snap_compare, steady, utc, screen, size):
    app, sources = open_comparison(steady)

    async def loaded(pilot) -> None:
        await until(pilot, lambda: at_end(app), what="the recordings")
        await until(pilot, lambda: len(app.frame.runs) == 2
                    and app.frame.runs[1].knobs, what="both runs")
        await pilot.press(screen)

    try:
        assert snap_compare(app, terminal_size=size, run_before=loaded)
    finally:
        for s in sources:
            s.close()
