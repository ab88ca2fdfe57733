"""Fixtures that start real processes: training loops with the agent, and the UI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import neurotop
from neurotop.protocol import connfile

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# Tests and the processes they start import ``neurotop`` from the editable install; make
# sure it is this checkout's (a stale install elsewhere would test other code).
if Path(neurotop.__file__).resolve().parent != ROOT / "agent":
    raise pytest.UsageError(f"neurotop is imported from {neurotop.__file__}, not this checkout:"
                            f" run `pip install -e '{ROOT}[agent,test]'`")


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own runtime directory, so runs of other tests stay invisible."""
    d = tmp_path / "runtime"
    monkeypatch.setenv("NEUROTOP_RUNTIME_DIR", str(d))
    monkeypatch.setenv("NEUROTOP_RUNS_DIR", str(tmp_path / "runs"))  # recordings stay here
    return d


class Run:
    """A training process started by a test, and its connection file once it is up."""

    def __init__(self, proc: subprocess.Popen, info: connfile.ConnectionInfo) -> None:
        self.proc, self.info = proc, info

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for_connection(proc: subprocess.Popen, timeout: float = 60) -> connfile.ConnectionInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in connfile.live_runs() if r.pid == proc.pid]
        if runs:
            return runs[0]
        if proc.poll() is not None:
            raise RuntimeError(f"training exited ({proc.returncode}) before its connection file"
                               f" was seen: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError("training did not write its connection file")


@pytest.fixture
def start_run() -> Iterator:
    """``start_run(*args, script=...)`` starts a training process; all are stopped at the end."""
    runs: list[Run] = []

    def start(*args: str, script: Path = SCRIPTS / "train_loop.py") -> Run:
        proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ)
        run = Run(proc, wait_for_connection(proc))
        runs.append(run)
        return run

    yield start
    for r in runs:
        r.stop()


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def until(pilot, pred, timeout: float = 20.0, what: str = "condition") -> None:
    """Let a Pilot-driven app run until ``pred()`` holds (UI tests on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status_text(app) -> str:
    """What the status bar shows now, as plain text."""
    from neurotop.tui.screens.widgets import StatusBar

    return str(app.query_one(StatusBar).render())
