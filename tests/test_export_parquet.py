"""``neurotop export FILE --parquet DIR`` (issue 18, item 9): a real run's recording read back
with ``pandas.read_parquet`` holds what the file holds (read straight from it), the
per-parameter table included, and agrees with the CSV export; without pyarrow, one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import neurotop
from tests.helpers.recorded import Recording, read_recording, record_run
from tests.helpers.training import watch_options

pytestmark = pytest.mark.slow

NAN_AT = 25  # the run's NaN auto-pauses it; nobody resumes, so it stops: events to export
TABLES = ("scalars", "layers", "params", "events", "system")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_run(tmp_path_factory.mktemp("recorded"), "--steps", "60", "--nan-at",
                      str(NAN_AT), *watch_options(auto_pause_timeout=1))


@pytest.fixture(scope="module")
def recording(session: Path) -> Recording:
    return read_recording(session)


def export(session: Path, fmt: str, out: Path) -> list[str]:
    done = neurotop("export", str(session), f"--{fmt}", str(out), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_parquet_round_trips_through_pandas(session: Path, recording: Recording,
                                            tmp_path: Path):
    pd = pytest.importorskip("pandas", reason="pandas is not installed (pip install pandas)")
    pytest.importorskip("pyarrow", reason="pyarrow is not installed: pip install"
                        " 'neurotop[parquet]'")
    out = tmp_path / "pq"
    assert export(session, "parquet", out) == [str(out / f"{t}.parquet") for t in TABLES]
    tables = {t: pd.read_parquet(out / f"{t}.parquet") for t in TABLES}
    schema, steps = recording.schema, np.array(recording.steps)
    # The NaN step is in; so is the next when the training thread passes the boundary
    # before the agent thread's auto-pause lands (on a loaded machine it may not).
    assert len(steps) >= NAN_AT

    scalars = tables["scalars"]
    assert list(scalars.columns) == ["step", "time", *schema["scalars"]]
    np.testing.assert_array_equal(scalars["step"], steps)
    for name in schema["scalars"]:
        assert scalars[name].dtype == np.float32
        np.testing.assert_array_equal(scalars[name], recording.scalar(name))  # NaN included
    assert np.isnan(scalars["loss"].iloc[-1])

    layers = tables["layers"]
    names, stats = schema["layers"], schema["stats"]
    assert list(layers.columns) == ["step", "layer", *stats]
    np.testing.assert_array_equal(layers["step"], np.repeat(steps, len(names)))
    assert list(layers["layer"].astype(str)) == names * len(steps)
    np.testing.assert_array_equal(layers[stats].to_numpy(),
                                  np.stack(recording.blocks).reshape(-1, len(stats)))

    params = tables["params"]  # what CSV does not write
    pnames, pstats = schema["params"], schema["param_stats"]
    assert pnames and list(params.columns) == ["step", "param", *pstats]
    np.testing.assert_array_equal(params["step"], np.repeat(recording.param_steps, len(pnames)))
    assert list(params["param"].astype(str)) == pnames * len(recording.param_steps)
    np.testing.assert_array_equal(params[pstats].to_numpy(),
                                  np.stack(recording.params).reshape(-1, len(pstats)))

    events = tables["events"]
    assert list(events.columns) == ["step", "time", "kind", "event", "cmd", "ok", "old", "new",
                                    "error", "sender", "details"]
    cmds = [None if pd.isna(c) else c for c in events["cmd"]]
    assert [(e.get("event"), e.get("cmd")) for e in recording.events] == list(
        zip(events["event"], cmds, strict=True))
    alert = events[events["event"] == "alert"].iloc[0]
    assert alert["step"] == NAN_AT and json.loads(alert["details"])["alert"] == "nonfinite"
    pause = events[events["cmd"] == "pause"].iloc[0]
    assert bool(pause["ok"]) and pd.isna(alert["ok"])  # an alert is no acknowledgement
    assert (pause["old"], pause["new"], pause["sender"]) == ("running", "paused", "auto-pause")

    # The CSV export of the same session: the same values, table by table.
    csv_dir = tmp_path / "csv"
    export(session, "csv", csv_dir)
    for t in ("scalars", "layers"):
        csv = pd.read_csv(csv_dir / f"{t}.csv")
        assert list(csv.columns) == list(tables[t].columns)
        np.testing.assert_array_equal(csv["step"], tables[t]["step"])
        values = [c for c in csv.columns if c not in ("step", "time", "layer")]
        np.testing.assert_array_equal(csv[values].to_numpy(np.float32),  # CSV: float32 text
                                      tables[t][values].to_numpy())
    def times(table: str) -> list[float]:  # parsed by Python: exactly the float written
        return [float(t) for t in pd.read_csv(csv_dir / f"{table}.csv", dtype=str)["time"]]

    assert times("scalars") == list(scalars["time"])
    assert times("events") == list(events["time"])
    csv_events = pd.read_csv(csv_dir / "events.csv")
    assert list(csv_events["cmd"].dropna()) == list(events["cmd"].dropna())

    system, csv_system = tables["system"], pd.read_csv(csv_dir / "system.csv")
    assert len(system) >= 2 and list(system.columns) == list(csv_system.columns)
    assert system["state"].iloc[-1] == "ended" and system["rss"].dtype == np.int64
    numbers = [c for c in system.columns if c not in ("state", "no_gpu")
               and not c.endswith("_name")]
    np.testing.assert_allclose(csv_system[numbers].to_numpy(np.float64),
                               system[numbers].to_numpy(np.float64), rtol=1e-15)


def test_without_pyarrow_parquet_export_is_one_line(session: Path, tmp_path: Path):
    """``sys.modules['pyarrow'] = None``: to this interpreter pyarrow is not installed."""
    code = ("import sys; sys.modules['pyarrow'] = None;"
            " from neurotop.tui.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "export", str(session), "--parquet",
                          str(tmp_path / "pq")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout
    assert out.stderr.splitlines() == ["neurotop: --parquet needs pyarrow, which is not"
                                       " installed: pip install 'neurotop[parquet]'"]
    assert not (tmp_path / "pq").exists()
