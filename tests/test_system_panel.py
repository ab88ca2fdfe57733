"""System metrics on screen (issue 18, item 5, the UI side): the status bar's GPU
utilisation and memory (or CPU and RSS, and ``no GPU``), the overview's panel with a row per
GPU and one for the host, replay showing the heartbeat at its cursor, and 80 columns keeping
the essentials. Over a session a real training run recorded (real host metrics, no GPU here)
and synthetic ones written with the real writer in the shape ``agent/service/system.py``
sends (two fake GPUs; no GPU and why; an older agent that sends none)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neurotop.service.system import NO_PYNVML
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.screens.replay_app import ReplayApp
from neurotop.tui.screens.system_panel import SystemPanel
from neurotop.tui.screens.widgets import KeyBar
from tests.helpers.pilot import screen_lines, status_text, until
from tests.helpers.recorded import record_run
from tests.helpers.sessions import SessionBuilder, recorded_headers

GIB = 2**30
STEPS = 200
GPU_NAMES = ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")


def system_at(step: int, gpus: int, no_gpu: str) -> dict:
    """A heartbeat's ``system`` at ``step``: GPU0 busier and fuller as the run goes
    (step / 4 %, 20 + step / 10 GiB), GPU1 steady (30 %, 16 GiB), both of 80 GiB."""
    devices = [{"index": i, "name": GPU_NAMES[i], "uuid": f"GPU-{i:08x}-fake",
                "util": step // 4 if i == 0 else 30,
                "mem_used": int((20 + step / 10 if i == 0 else 16) * GIB),
                "mem_total": 80 * GIB, "power_w": 300.0 + i * 50, "temp_c": 61 + i}
               for i in range(gpus)]
    return {"cpu_pct": 97.5, "host_cpu_pct": 45.2, "cpus": 16, "rss": int(2.3 * GIB),
            "mem_total": 128 * GIB, "mem_available": 100 * GIB, "gpus": devices,
            "no_gpu": no_gpu}


def write_system_run(path: Path, *, gpus: int = 2, no_gpu: str = "",
                     system: bool = True) -> Path:
    """A short run at 20 steps/s with a heartbeat every 10 steps; ``system=False``: an
    older agent's heartbeats, without metrics."""
    b = SessionBuilder(path, name="gpus")
    for s in range(1, STEPS + 1):
        t = b.t0 + s / 20
        if s == 1:
            b.put({"kind": "schema", "schema_id": 1, "run_name": "gpus",
                   "layers": ["net.0", "net.1"], "stats": ["mean", "std"],
                   "scalars": ["loss", "lr"]}, t=t)
        block = [[0.1 * s, 1.0], [0.2, 0.5]]
        b.put({"kind": "stats", "step": s, "wall": t, "schema_id": 1, "dropped": 0},
              (np.array(block, np.float32), np.array([2.0 / s, 1e-3], np.float32)), t=t)
        if s % 10 == 0:
            hb = {"kind": "heartbeat", "step": s, "state": "running", "paused_at": None,
                  "steps_per_s": 20.0, "dropped": 0, "rec_dropped": 0, "control": ""}
            if system:
                hb["system"] = system_at(s, gpus, no_gpu)
            b.put(hb, t=t)
    b.close()
    return path


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_system_run(tmp_path_factory.mktemp("sys") / "gpus.ntop")


@pytest.fixture(scope="module")
def no_gpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_system_run(tmp_path_factory.mktemp("sys") / "cpu.ntop", gpus=0,
                            no_gpu=NO_PYNVML)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real training process's recording: its heartbeats carry its real host metrics."""
    return record_run(tmp_path_factory.mktemp("recorded"), "--steps", "60", "--step-sleep",
                      "0.03", "--config", '{"heartbeat_s": 0.2}')


def lines_with(app: ReplayApp, word: str) -> list[str]:
    return [line for line in screen_lines(app) if word in line]


async def loaded(app: ReplayApp, pilot, step: int = STEPS) -> None:
    await until(pilot, lambda: app.store.status.step == step, what="the recording")
    await pilot.pause(0.3)  # a frame drawn from it


async def test_two_gpus_in_the_status_bar_and_a_row_each_in_the_panel(two_gpus):
    source = ReplaySource(two_gpus).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await loaded(app, pilot)
            # The busiest GPU's utilisation, the memory of both.
            await until(pilot, lambda: "2 GPUs max 50% 56/160G" in status_text(app),
                        what="the GPUs in the status bar")
            (gpu0,) = lines_with(app, "GPU0 ")
            (gpu1,) = lines_with(app, "GPU1 ")
            for text in (GPU_NAMES[0], "50%", "40.0/80.0 GiB", "300 W", "61 °C"):
                assert text in gpu0
            for text in (GPU_NAMES[1], "30%", "16.0/80.0 GiB", "350 W", "62 °C"):
                assert text in gpu1
            (host,) = lines_with(app, "process ")
            for text in ("process  CPU 98% of 1600%  RSS 2.3 GiB", "host  CPU 45%",
                         "available 100/128 GiB"):
                assert text in host
            assert not lines_with(app, "no GPU")

            # Replay shows what the run recorded at the cursor.
            await pilot.press("g", *"100", "enter")
            await until(pilot, lambda: "2 GPUs max 30% 46/160G" in status_text(app),
                        what="the status bar at step 100")
            await until(pilot, lambda: any("25%" in line and "30.0/80.0 GiB" in line
                                           for line in lines_with(app, "GPU0 ")),
                        what="GPU0 at step 100 in the panel")
    finally:
        source.close()


async def test_no_gpu_shows_cpu_and_says_why(no_gpu):
    source = ReplaySource(no_gpu).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await loaded(app, pilot)
            await until(pilot, lambda: "CPU 98% RSS 2.3G no GPU" in status_text(app),
                        what="CPU and RSS in the status bar")
            assert lines_with(app, f"no GPU: {NO_PYNVML}")
            assert lines_with(app, "process  CPU 98% of 1600%")
            assert not lines_with(app, "GPU0")
    finally:
        source.close()


async def test_an_agent_without_metrics_shows_none(tmp_path):
    source = ReplaySource(write_system_run(tmp_path / "old.ntop", system=False)).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await loaded(app, pilot)
            assert not app.query_one(SystemPanel).display
            assert "GPU" not in status_text(app) and "CPU" not in status_text(app)
            assert not lines_with(app, "process  CPU")
    finally:
        source.close()


async def test_80_columns_keep_the_essentials_and_the_plots(two_gpus):
    source = ReplaySource(two_gpus).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await loaded(app, pilot)
            bar = status_text(app)
            for text in ("REPLAY", f"step {STEPS}", "▲ 0 alerts", "conn: replay"):
                assert text in bar
            footer = str(app.query_one(KeyBar).render())
            assert "? help" in footer and "q quit" in footer
            assert not app.query_one(SystemPanel).display  # the plots keep the room
            assert lines_with(app, "loss") and lines_with(app, "heat:")
            await pilot.resize_terminal(80, 40)  # a tall terminal has room for the panel
            await until(pilot, lambda: len(lines_with(app, "GPU")) >= 2,
                        what="the panel at 80x40")
    finally:
        source.close()


@pytest.mark.slow  # records a real training run
async def test_a_real_run_shows_its_recorded_host_metrics(real_run):
    beats = [h for h in recorded_headers(real_run) if h["kind"] == "heartbeat"]
    last = beats[-1]["system"]
    assert 0 < last["rss"] < GIB and (last["gpus"] or last["no_gpu"])  # a small model
    source = ReplaySource(real_run).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.store.status.step == beats[-1]["step"],
                        what="the recording")
            mib = round(last["rss"] / 2**20)
            (host,) = await host_line(app, pilot)
            assert f"RSS {mib} MiB" in host  # the last heartbeat's, as recorded
            assert f"CPU {last['cpu_pct']:.0f}% of {last['cpus'] * 100}%" in host
            if last["gpus"]:  # a machine with an NVIDIA GPU and pynvml
                assert "GPU" in status_text(app) and lines_with(app, "GPU0 ")
            else:
                assert f"RSS {mib}M no GPU" in status_text(app)
                assert lines_with(app, f"no GPU: {last['no_gpu']}")
    finally:
        source.close()


async def host_line(app: ReplayApp, pilot) -> list[str]:
    await until(pilot, lambda: lines_with(app, "process  CPU"), what="the host row")
    return lines_with(app, "process  CPU")


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
@pytest.mark.parametrize("case", ["two_gpus", "no_gpu"])
def test_overview_snapshot(snap_compare, request, utc, case, size):
    source = ReplaySource(request.getfixturevalue(case)).start()
    app = ReplayApp(source)

    async def ready(pilot) -> None:
        await until(pilot, lambda: app.store.status.step == STEPS, what="the recording")
        last, quiet = -1, 0
        for _ in range(100):  # the heartbeats after the last report are in: 4 quiet ticks
            if quiet >= 4:
                break
            await pilot.pause(0.1)
            quiet, last = (quiet + 1, last) if app.store.version == last else (0,
                                                                             app.store.version)

    try:
        assert snap_compare(app, terminal_size=size, run_before=ready)
    finally:
        source.close()
