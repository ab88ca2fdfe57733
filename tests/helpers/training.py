"""Training processes started by tests: ``tests/scripts/train.py`` (or a demo) with the
agent, found through its connection file, and what the script logs of its own steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from neurotop.protocol import connfile
from tests.helpers.package import ROOT

#: The one training script the tests run; its options choose the model and what it does.
TRAIN = ROOT / "tests" / "scripts" / "train.py"


class Run:
    """A training process started by a test, and its connection file once it is up.

    ``gate``: the file the script waits for before its first step (``--wait-for``), so a
    test can subscribe first and miss nothing; ``go()`` creates it."""

    def __init__(self, proc: subprocess.Popen, info: connfile.ConnectionInfo,
                 gate: Path | None = None) -> None:
        self.proc, self.info, self.gate = proc, info, gate

    def go(self) -> None:
        assert self.gate is not None, "started without a gate: it is already training"
        self.gate.touch()

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


def start_training(*args: str, script: Path = TRAIN, gate: Path | None = None) -> Run:
    """``script ARGS`` in a new process (``--wait-for gate`` added when ``gate`` is given);
    returns once its connection file is written."""
    argv = [sys.executable, str(script), *args, *(("--wait-for", str(gate)) if gate else ())]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=os.environ)
    try:
        return Run(proc, wait_for_connection(proc), gate)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def watch_options(**options: object) -> tuple[str, str]:
    """``train.py`` arguments that pass ``options`` to ``neurotop.watch``."""
    return "--config", json.dumps(options)


def steps_logged(path: Path) -> dict[int, dict]:
    """What ``train.py --log`` recorded, per optimizer step, in its own pre-hook."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    return {(d := json.loads(ln))["step"]: d for ln in lines if ln.endswith("}")}
