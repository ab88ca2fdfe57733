"""Fixtures only (helpers live in ``tests/helpers``): each test's own runtime directory, and
the training processes a test starts, stopped when it ends; and, for ``-n 2 --dist
loadgroup``, one worker for the tests that share a module's fixture."""

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


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups into node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` an ungrouped test is a unit of its own, so a module's tests
    spread over both workers and each worker builds the module's shared fixture again (a
    recorded training run, a wheel and its venv). Tests that use a fixture of
    this project wider than one test run on one worker, grouped by module."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("xdist_group"):
            continue
        if any(d.scope != "function" and d.baseid.startswith("tests")
               for defs in info.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
