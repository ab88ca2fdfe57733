"""Fixtures only (helpers live in ``tests/helpers``): each test's own runtime directory, and
the training processes a test starts, stopped when it ends."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import neurotop
from tests.helpers.package import ROOT
from tests.helpers.training import TRAIN, Run, start_training

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
    monkeypatch.setenv("NEUROTOP_SESSIONS_DIR", str(tmp_path / "sessions"))  # and their notes
    return d


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Times shown in UTC, so snapshots do not depend on the machine's time zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def start_run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """``start_run(*args, script=TRAIN, held=False)`` starts a training process; ``held``:
    it waits for ``run.go()`` before its first step. All are stopped at the end."""
    runs: list[Run] = []

    def start(*args: str, script: Path = TRAIN, held: bool = False) -> Run:
        gate = tmp_path / f"go-{len(runs)}" if held else None
        run = start_training(*args, script=script, gate=gate)
        runs.append(run)
        return run

    yield start
    for r in runs:
        r.stop()
