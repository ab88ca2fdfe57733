"""A real short training run's recording, and what it holds read straight from the file (the
wire decoder, no store), for tests of what the CLI prints or writes from a session."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import MESSAGE, SessionReader, split_frames
from tests.helpers.package import ROOT
from tests.helpers.training import TRAIN


def record_run(where: Path, *args: str, timeout: float = 180, script: Path = TRAIN) -> Path:
    """``tests/scripts/train.py ARGS`` (or another ``script``: a demo) to its end, its runs
    and runtime directories under ``where``; the session file it recorded."""
    env = dict(os.environ, NEUROTOP_RUNS_DIR=str(where / "runs"),
               NEUROTOP_RUNTIME_DIR=str(where / "runtime"))
    out = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    (session,) = (where / "runs").glob("*/session.ntop")
    return session


@dataclass
class Recording:
    """The last schema's names, and every stats and params report under it, by step."""

    schema: dict = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    blocks: list[np.ndarray] = field(default_factory=list)  # [layers x stats] each
    scalars: list[np.ndarray] = field(default_factory=list)
    param_steps: list[int] = field(default_factory=list)
    params: list[np.ndarray] = field(default_factory=list)  # [params x param_stats] each
    events: list[dict] = field(default_factory=list)

    def scalar(self, name: str) -> np.ndarray:
        return np.array([s[self.schema["scalars"].index(name)] for s in self.scalars])

    def layer_stat(self, stat: str) -> np.ndarray:
        """``[steps x layers]`` of one statistic."""
        return np.stack(self.blocks)[:, :, self.schema["stats"].index(stat)]


def read_recording(path: Path) -> Recording:
    rec = Recording()
    with SessionReader(path) as r:
        for record in r.records():
            if record.type != MESSAGE:
                continue
            m = wire.decode(list(split_frames(record.body)))
            h = m.header
            if h["kind"] == "schema":
                rec.schema = h
            elif h["kind"] == "stats":
                rec.steps.append(h["step"])
                rec.blocks.append(m.arrays[0])
                rec.scalars.append(m.arrays[1])
            elif h["kind"] == "params":
                rec.param_steps.append(h["step"])
                rec.params.append(m.arrays[0])
            elif h["kind"] in ("event", "alert"):
                rec.events.append(h)
    return rec
