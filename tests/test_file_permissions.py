"""What a run writes is readable by its user only (issue 14, item 9): the session file and
the snapshots (the run's recording, its model and optimizer state) are 0600 in 0700
directories, like the connection files; ``private_files=False`` leaves it to the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from neurotop import Config
from neurotop.config import ConfigError
from neurotop.protocol import runs
from tests.helpers.cli import neurotop
from tests.helpers.training import watch_options


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(run_id: str) -> Path:
    out = neurotop("ctl", run_id, "snapshot", timeout=60)
    assert out.returncode == 0, out.stderr
    return Path(json.loads(out.stdout)["new"])


@pytest.mark.slow
def test_session_file_and_snapshot_are_private(start_run, tmp_path):
    run = start_run("--step-sleep", "0.02")
    session = tmp_path / "runs" / run.info.run_id / runs.SESSION_FILE
    snap = snapshot(run.info.run_id)
    assert snap.parent == session.parent  # snapshots go beside the recording by default
    assert mode(session.parent) == 0o700
    assert mode(session) == 0o600
    assert mode(snap) == 0o600
    pointers = list(runs.sessions_dir().glob("*.json"))
    assert pointers and all(mode(p) == 0o600 for p in pointers)


@pytest.mark.slow
def test_a_snapshot_directory_the_run_creates_is_private(start_run, tmp_path):
    target = tmp_path / "snaps" / "deep"
    run = start_run("--step-sleep", "0.02", *watch_options(snapshot=str(target)))
    snap = snapshot(run.info.run_id)
    assert snap.parent == target
    assert mode(target) == 0o700 and mode(snap) == 0o600


@pytest.mark.slow
def test_private_files_false_leaves_the_modes_to_the_umask(start_run, tmp_path):
    umask = os.umask(0o022)  # what the training process inherits
    try:
        run = start_run("--step-sleep", "0.02", *watch_options(private_files=False))
    finally:
        os.umask(umask)
    session = tmp_path / "runs" / run.info.run_id / runs.SESSION_FILE
    snap = snapshot(run.info.run_id)
    assert mode(session.parent) == 0o755
    assert mode(session) == 0o644 and mode(snap) == 0o644


def test_private_files_must_be_a_boolean():
    with pytest.raises(ConfigError, match="private_files must be true or false"):
        Config(private_files="yes")
