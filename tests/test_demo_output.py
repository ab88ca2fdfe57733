"""``neurotop demo`` never blocks its demo on a pipe (issue 14, item 3): the demo's output
goes to ``demo.log`` in its run directory, whose path neurotop prints; a demo that writes
a lot to stderr keeps training, heartbeating and answering, and quits cleanly on ``q``."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time

import pytest

from neurotop.protocol import connfile, wire
from tests.helpers.cli import neurotop
from tests.helpers.package import ROOT
from tests.helpers.telemetry import Subscriber
from tests.helpers.waiting import wait_until

FLOOD = ROOT / "tests" / "scripts" / "flood_train.py"


class Tmux:
    """A private tmux server with one 120x40 window, ``ui``: a real terminal for the UI."""

    def __init__(self, name: str) -> None:
        self.sock = name

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True,
                              text=True, timeout=20).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-J", "-t", "ui")  # -J: wrapped lines joined


@pytest.fixture
def tmux():
    t = Tmux(f"neurotop-demo-output-{os.getpid()}")
    yield t
    t("kill-server")


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("tmux") and not os.environ.get("CI"),
                    reason="tmux is not installed (.ci/run installs it, so CI never skips this)")
def test_a_demo_flooding_stderr_keeps_heartbeating_for_60_s(tmux, runtime_dir, tmp_path):
    neurotop_cmd = shutil.which("neurotop")
    assert neurotop_cmd, "the neurotop command is not installed (pip install -e .)"
    runs_dir = tmp_path / "runs"
    # ``; sleep`` keeps the window (and what neurotop printed last) after it exits
    tmux("new-session", "-d", "-s", "ui", "-x", "120", "-y", "40",
         "-e", f"NEUROTOP_RUNTIME_DIR={runtime_dir}", "-e", f"NEUROTOP_RUNS_DIR={runs_dir}",
         f"{neurotop_cmd} demo --script {FLOOD}; echo EXITED $?; sleep 600")
    wait_until(lambda: "LIVE" in tmux.screen(), timeout=90, what="the UI showing LIVE")
    info = connfile.live_runs()[0]
    log = runs_dir / info.run_id / "demo.log"

    with Subscriber(info.telemetry) as sub:
        sub.ready()
        start = time.monotonic()
        sub.collect(60)
        beats = [(m.header["t"], m.header["step"]) for m in sub.msgs
                 if m.kind == wire.HEARTBEAT]
    assert time.monotonic() - start >= 60
    times = [t for t, _ in beats]
    assert times[-1] - times[0] > 55, f"heartbeats only over {times[-1] - times[0]:.1f} s"
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) < 5, f"the agent went silent for {max(gaps):.1f} s"
    late = [s for t, s in beats if t > times[-1] - 15]
    assert late[-1] > late[0], f"training stalled in its last 15 s at step {late[0]}"
    assert log.stat().st_size > 10 * 65536, "the demo did not flood: this test tests nothing"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "UserWarning: step" in log.read_text()[-5000:]

    tmux("send-keys", "-t", "ui", "q")
    wait_until(lambda: "EXITED" in tmux.screen(), timeout=30, what="neurotop to quit")
    shown = tmux.screen()
    assert "EXITED 0" in shown and f"the demo's output is in {log}" in shown, shown
    listed = json.loads(neurotop("ls", "--json", env={"NEUROTOP_RUNS_DIR": str(runs_dir)}).stdout)
    assert [(r["run_id"], r["state"]) for r in listed] == [(info.run_id, "ended")]


@pytest.mark.slow
def test_a_demo_that_fails_shows_the_end_of_its_log(tmp_path):
    out = neurotop("demo", "--script", str(FLOOD), "--", "--fail-with", "3", timeout=60)
    assert out.returncode == 2
    assert "the demo exited with code 3 before it started" in out.stderr
    assert "giving up: no such dataset" in out.stderr  # its last lines, as they were
    log = next((tmp_path / "runs").glob("*/demo.log"))
    assert f"the demo's output goes to {log}" in out.stderr
    assert "setting up, line 0" in log.read_text()  # the whole output is kept there
    assert "Traceback" not in out.stderr


def test_a_missing_script_is_a_one_line_error(tmp_path):
    out = neurotop("demo", "--script", str(tmp_path / "nope.py"))
    assert out.returncode == 2 and out.stderr.strip() == f"neurotop: no training script" \
        f" {tmp_path / 'nope.py'}"
