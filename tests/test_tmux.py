"""The real ``neurotop demo`` in a real terminal (tmux): keys in, screen out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from neurotop.protocol import connfile
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tmux"), pytest.mark.skipif(
    not shutil.which("tmux") and not os.environ.get("CI"),
    reason="tmux is not installed (.ci/run installs it, so CI never skips this)")]


class Tmux:
    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.sock = name
        self.env = env

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True,
                              text=True, env=self.env, timeout=20).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "ui")

    def step(self) -> int | None:
        m = re.search(r"step (\d+)", self.screen())
        return int(m.group(1)) if m else None


@pytest.fixture
def tmux(runtime_dir):
    t = Tmux(f"neurotop-test-{os.getpid()}", dict(os.environ))
    yield t
    t.tmux("kill-server")


#: A screen's key, and what a person sees on it (with the demo still training).
SCREENS = [("1", ("loss", "heat: ", "alerts")), ("2", ("layer", "trend: ")),
           ("3", ("layer ", "previous / next layer")),  # histograms come later under load
           ("4", ("parameter",)), ("5", ("knobs", "command log")),
           ("?", ("neurotop — keys", "overview, layers, layer detail"))]


def test_demo_in_tmux_pause_resume_quit_leaves_nothing(tmux, runtime_dir):
    neurotop = shutil.which("neurotop")
    assert neurotop, "the neurotop command is not installed (pip install -e .)"
    tmux.tmux("new-session", "-d", "-s", "ui", "-x", "120", "-y", "40",
              "-e", f"NEUROTOP_RUNTIME_DIR={runtime_dir}", neurotop, "demo")
    wait_until(lambda: "LIVE" in tmux.screen(), timeout=60, what="the UI showing LIVE")
    demo = connfile.live_runs()[0]
    first = wait_until(tmux.step, what="a step number")
    wait_until(lambda: (tmux.step() or 0) > first + 20, what="the step to advance")

    tmux.tmux("send-keys", "-t", "ui", "Space")
    wait_until(lambda: "PAUSED @" in tmux.screen(), what="PAUSED")
    held = tmux.step()
    time.sleep(1.5)
    assert tmux.step() == held
    assert f"PAUSED @ {held}" in tmux.screen()

    tmux.tmux("send-keys", "-t", "ui", "Space")
    wait_until(lambda: "LIVE" in tmux.screen(), what="LIVE after resume")
    wait_until(lambda: (tmux.step() or 0) > held + 10, what="steps after resume")

    tmux.tmux("send-keys", "-t", "ui", "q")
    wait_until(lambda: "ui" not in tmux.tmux("list-sessions"), timeout=15, what="the UI to exit")
    wait_until(lambda: not connfile.pid_alive(demo.pid), timeout=15, what="the demo to exit")
    assert not connfile.conn_path(demo.run_id).exists(), "the demo left its connection file"


def test_demo_at_80x24_draws_at_once_and_every_screen_keeps_help_and_quit(tmux, runtime_dir):
    """The UI draws before the demo has imported torch, saying what it waits for; then at
    80x24 every screen keeps the status bar and, in the footer, ``? help`` and ``q quit``."""
    neurotop = shutil.which("neurotop")
    tmux.tmux("new-session", "-d", "-s", "ui", "-x", "80", "-y", "24",
              "-e", f"NEUROTOP_RUNTIME_DIR={runtime_dir}", neurotop, "demo")
    first = wait_until(lambda: next((s for s in [tmux.screen()]
                                     if "STARTING" in s or "LIVE" in s), None),
                       timeout=60, what="the first frame")
    if "STARTING" in first:  # torch still importing: the bar says so (a fast one is LIVE)
        assert "starting the demo" in first and "conn: waiting" in first
    wait_until(lambda: "LIVE" in tmux.screen(), timeout=60, what="the UI showing LIVE")
    for key, marks in SCREENS:
        tmux.tmux("send-keys", "-t", "ui", key)
        wait_until(lambda marks=marks: marks[0] in tmux.screen(), what=f"the screen of {key!r}")
        if key == "?":  # the help is a dialog over the screen, closed with esc
            tmux.tmux("send-keys", "-t", "ui", "Escape")
            wait_until(lambda: "neurotop — keys" not in tmux.screen(), what="the help to close")
            time.sleep(0.5)  # a key right after ESC would read as alt+key
        lines = tmux.screen().rstrip("\n").split("\n")
        assert "LIVE" in lines[0] and "alert" in lines[0] and "conn: live" in lines[0], lines[0]
        assert "? help" in lines[-1] and "q quit" in lines[-1], f"{key!r}: {lines[-1]!r}"
    tmux.tmux("send-keys", "-t", "ui", "q")
    wait_until(lambda: "ui" not in tmux.tmux("list-sessions"), timeout=15, what="the UI to exit")
