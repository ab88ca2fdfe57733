"""The command line a new user expects (issue 15, item 11): ``neurotop`` alone helps and lists
the runs, ``--version``, no traceback on a closed stdout, one-line ``ctl`` usage errors,
``attach`` to an ended run says how to replay it, ``ctl knobs`` a table on a terminal, and
``ls`` shows each run's duration and last loss. All through the real command, on real runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neurotop.protocol.sessionfile import SessionReader
from tests.helpers.cli import neurotop
from tests.helpers.recorded import Recording, read_recording, record_run

COMMANDS = ("attach", "demo", "ls", "ctl", "replay", "plot", "export")
CTL = f"{shlex.quote(sys.executable)} -c 'from neurotop.tui.cli import main; main()'"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recording of a run that ended; its runs root is ``session.parent.parent``."""
    return record_run(tmp_path_factory.mktemp("recorded"), "--steps", "40", "--step-sleep",
                      "0.05")


@pytest.fixture(scope="module")
def recording(session: Path) -> Recording:
    return read_recording(session)


def recorded_env(session: Path) -> dict[str, str]:
    """The environment in which ``neurotop`` finds ``session`` under its runs root."""
    return {"NEUROTOP_RUNS_DIR": str(session.parent.parent)}


def one_line_error(out: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code and len(lines) == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and lines[0].startswith("neurotop: ")
    return lines[0]


def on_a_terminal(command: str, columns: int = 100) -> str:
    """``command``'s output when its stdout is a terminal (``script`` gives it a pty)."""
    out = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "COLUMNS": str(columns)})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.replace("\r\n", "\n")


@pytest.mark.slow
def test_neurotop_alone_lists_the_commands_then_the_live_run(start_run):
    run = start_run("--step-sleep", "0.02")
    out = neurotop()
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("usage: neurotop COMMAND")
    for name in COMMANDS:  # each command once, on its own line, with what it does
        (line,) = [ln for ln in lines if ln.split()[:1] == [name]]
        assert len(line.split()) > 3, line
    (row,) = [ln for ln in lines if ln.startswith(run.info.run_id)]
    assert " live " in row and "test-loop" in row and run.info.telemetry in row
    assert lines.index(row) > max(i for i, ln in enumerate(lines) if ln.split()[:1] == ["export"])


def test_neurotop_alone_without_runs_says_where_it_looked(runtime_dir):
    out = neurotop()
    assert out.returncode == 0 and "no live runs or recorded sessions" in out.stdout
    assert str(runtime_dir) in out.stdout


def test_version_is_the_installed_distributions():
    out = neurotop("--version")
    assert out.returncode == 0
    assert out.stdout == f"neurotop {importlib.metadata.version('neurotop')}\n"


@pytest.mark.parametrize("argv", [("ls", "--json"), ("ls",), (), ("--version",), ("--help",),
                                  ("demo", "--list"), ("ls", "--help")])
def test_a_closed_stdout_ends_quietly(argv):
    """The reader went away before the first byte (a pipe whose read end is closed)."""
    r, w = os.pipe()
    os.close(r)
    try:
        out = subprocess.run([sys.executable, "-c", "from neurotop.tui.cli import main; main()",
                              *argv], stdout=w, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(w)
    assert out.returncode in (0, 1) and out.stderr == "", out.stderr


@pytest.mark.slow
def test_ls_json_into_head_ends_quietly_on_many_sessions(session, tmp_path):
    """``ls --json | head -c 10`` through a real pipe, with more output than a pipe holds."""
    root = tmp_path / "many"
    for i in range(300):
        (root / f"run{i:03d}").mkdir(parents=True)
        shutil.copy(session, root / f"run{i:03d}" / session.name)
    err = tmp_path / "stderr"
    out = subprocess.run(["bash", "-c", f"{CTL} ls --json 2>{err} | head -c 10"],
                         capture_output=True, timeout=120,
                         env={**os.environ, "NEUROTOP_RUNS_DIR": str(root)})
    assert out.returncode == 0 and out.stdout == b'[\n {\n  "ru'
    assert "Traceback" not in err.read_text() and err.read_text() == ""
    full = neurotop("ls", "--json", env={"NEUROTOP_RUNS_DIR": str(root)}, timeout=120)
    assert len(full.stdout) > 1 << 16 and len(json.loads(full.stdout)) == 300


@pytest.mark.parametrize(("argv", "names"), [
    (("ctl",), ("TARGET", "COMMAND")),
    (("ctl", "abc"), ("COMMAND after abc",)),
    (("ctl", "abc", "frob"), ("no ctl command 'frob'",)),
])
def test_ctl_usage_errors_are_one_line_naming_what_is_missing(argv, names):
    line = one_line_error(neurotop(*argv))
    for name in names:
        assert name in line
    assert not re.search(r"\bARG\b", line.split("usage:")[0])  # optional: never missing
    assert "pause, resume, step N, set KNOB VALUE, knobs, snapshot, stop" in line


@pytest.mark.slow
def test_attach_to_an_ended_run_gives_the_replay_command(session):
    run_id = session.parent.name
    env = recorded_env(session)
    for argv in (("attach", run_id), ("attach", run_id[-4:]), ("ctl", run_id, "knobs")):
        line = one_line_error(neurotop(*argv, env=env))
        assert f"run {run_id} has ended" in line, line
        assert line.endswith(f"neurotop replay {run_id}"), line
    line = one_line_error(neurotop("attach", env=env))  # no live run: the newest recording
    assert "no live neurotop run" in line and line.endswith(f"neurotop replay {run_id}")
    suggested = line.split("neurotop replay ")[1].split()
    out = neurotop("plot", *suggested, "--width", "40", "--height", "5", env=env)
    assert out.returncode == 0 and run_id in out.stdout, out.stderr  # the id names it
    line = one_line_error(neurotop("attach", "no-such-run", env=env))
    assert "no live run matches 'no-such-run'" in line and "replay" not in line


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("script"), reason="needs script(1) for a terminal")
def test_ctl_knobs_is_a_table_on_a_terminal_and_json_otherwise(start_run):
    run = start_run("--step-sleep", "0.02")
    listed = json.loads(neurotop("ctl", run.info.run_id, "knobs").stdout)["knobs"]  # a pipe
    knobs = {k["name"]: k for k in listed}
    assert knobs["lr"]["value"] == 0.05 and knobs["lr"]["min"] == 0.0

    table = on_a_terminal(f"{CTL} ctl {run.info.run_id} knobs").splitlines()
    assert table[0].split() == ["KNOB", "VALUE", "BOUNDS", "PINNED", "DOC"]
    assert all(len(ln) < 100 for ln in table), table
    rows = {ln.split()[0]: ln for ln in table[1:] if not ln.startswith(" ")}
    assert set(rows) == {n + (f"[{k['selector']}]" if k["selector"] else "")
                         for n, k in knobs.items()}
    assert rows["lr[group]"].split()[1:4] == ["0.05", "0..1000", "no"]
    assert rows["temperature"].split()[1:4] == ["1", "0.1..10", "-"]  # the script never writes it
    doc_column = table[0].index("DOC")
    text = " ".join(ln[doc_column:].strip() for ln in table[1:])
    assert " ".join(knobs["lr"]["doc"].split()) in text  # wrapped, never cut

    assert neurotop("ctl", run.info.run_id, "set", "lr", "0.02").returncode == 0
    table = on_a_terminal(f"{CTL} ctl {run.info.run_id} knobs").splitlines()
    (lr,) = [ln for ln in table if ln.startswith("lr[group]")]
    assert lr.split()[1:4] == ["0.02", "0..1000", "yes"]  # an operator's set pins it

    ack = json.loads(on_a_terminal(f"{CTL} ctl {run.info.run_id} knobs --json"))
    assert ack["cmd"] == "knobs" and [k["name"] for k in ack["knobs"]] == list(knobs)
    piped = neurotop("ctl", run.info.run_id, "knobs", "--json")
    assert json.loads(piped.stdout).keys() == ack.keys() and "\n" not in piped.stdout.strip()


@pytest.mark.slow
def test_ls_shows_each_runs_duration_and_last_loss(session, recording):
    with SessionReader(session) as r:
        duration = max(rec.t for rec in r.records()) - r.meta["start_time"]
    loss = float(recording.scalar("loss")[-1])
    assert duration > 1 and recording.steps[-1] == 40

    listed = json.loads(neurotop("ls", "--json", env=recorded_env(session)).stdout)
    (row,) = listed
    assert row["duration_s"] == pytest.approx(duration, abs=1e-6)
    assert row["loss"] == pytest.approx(loss, rel=1e-6)

    out = neurotop("ls", env=recorded_env(session))
    header, line = out.stdout.splitlines()[:2]
    assert re.split(r"\s+", header)[:8] == ["RUN", "NAME", "STARTED", "DURATION", "STEPS",
                                            "LOSS", "SIZE", "STATE"]
    cells = line.split()  # RUN NAME DATE TIME DURATION STEPS LOSS SIZE UNIT STATE WHERE
    assert cells[4:7] == [f"{int(duration)}s", "40", f"{loss:.4g}"]
