"""Bad local files never crash, hang or exhaust the ``neurotop`` command (issue 14, item 8).

Each input is what a careless or hostile local user leaves where the CLI looks: a device, a
FIFO, a directory, a huge file, a connection file with one bad field, a runtime directory
of another user's. The answer is always one line on stderr and a non-zero exit; ``ls``
skips a bad connection file with one warning naming it and lists the good runs beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from neurotop.protocol import connfile
from tests.helpers.cli import neurotop

#: Every command that opens a file its user names; ``{}`` is the path.
COMMANDS = {
    "replay": ("replay", "{}"),
    "export": ("export", "{}", "--csv", "OUT"),
    "attach": ("attach", "{}"),
    "ctl": ("ctl", "{}", "knobs", "--timeout", "1"),
}

#: One bad field each, as ``json.dumps`` writes it (a float too big for a double is text).
BAD_FIELDS = {
    "non-hex key": '"key": "zz-not-hex"',
    "string pid": '"pid": "12345"',
    "huge pid": f'"pid": {2**70}',
    "pid -1": '"pid": -1',
    "pid 0": '"pid": 0',
    "boolean pid": '"pid": true',
    "string start_time": '"start_time": "yesterday"',
    "infinite start_time": '"start_time": 1e999',
    "integer telemetry": '"telemetry": 5',
    "list control": '"control": ["tcp://127.0.0.1:2"]',
    "string rank": '"rank": "0"',
}


def good_info(run_id: str = "20260101-000000-good", pid: int | None = None) -> dict:
    """A valid connection file's fields; its pid is alive (this test's process)."""
    return {"run_id": run_id, "name": "good-run", "pid": pid or os.getpid(),
            "start_time": 1.7e9, "telemetry": "tcp://127.0.0.1:1",
            "control": "tcp://127.0.0.1:2", "key": "ab" * 32}


def bad_file(path: Path, field: str) -> Path:
    """A connection file whose ``field`` (a ``BAD_FIELDS`` value) replaces the good one."""
    d = good_info("20260101-000000-bad0")
    name = field.split(":")[0].strip('"')
    body = json.dumps({k: v for k, v in d.items() if k != name})
    path.write_text(body[:-1] + ", " + field + "}")
    return path


def assert_one_line_error(out: subprocess.CompletedProcess, *, naming: str = "") -> str:
    """One line on stderr (``neurotop: ...``), a non-zero exit, no traceback."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0, f"exit 0 for bad input; stdout {out.stdout!r}"
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("neurotop: "), out.stderr
    assert naming in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bad_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    fifo = d / "fifo.json"
    os.mkfifo(fifo)
    (d / "directory").mkdir()
    huge = d / "huge.ntop"
    with huge.open("wb") as f:  # sparse: 8 GB that take no disk
        f.truncate(8 << 30)
    return {"/dev/zero": Path("/dev/zero"), "a FIFO": fifo, "a directory": d / "directory",
            "a huge file": huge}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("what", ["/dev/zero", "a FIFO", "a directory", "a huge file"])
def test_a_file_that_is_not_one_gets_a_one_line_error(command, what, bad_paths, tmp_path):
    path = bad_paths[what]
    argv = [str(path) if a == "{}" else str(tmp_path / "csv") if a == "OUT" else a
            for a in COMMANDS[command]]
    out = neurotop(*argv, timeout=20)  # a FIFO's open() or /dev/zero's read would hang
    assert_one_line_error(out, naming=str(path))


@pytest.mark.parametrize("field", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
@pytest.mark.parametrize("command", ["attach", "ctl"])
def test_a_bad_connection_file_field_gets_a_one_line_error(command, field, tmp_path):
    path = bad_file(tmp_path / "run-bad.json", field)
    argv = [str(path) if a == "{}" else a for a in COMMANDS[command]]
    line = assert_one_line_error(neurotop(*argv), naming=str(path))
    assert field.split(":")[0].strip('"') in line  # names the field
    assert "ab" * 32 not in line and "zz-not-hex" not in line  # never shows a key


@pytest.mark.parametrize("field", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_ls_skips_a_bad_connection_file_and_lists_the_good_run(field, runtime_dir):
    runtime_dir.mkdir(mode=0o700)
    (runtime_dir / "run-20260101-000000-good.json").write_text(json.dumps(good_info()))
    bad = bad_file(runtime_dir / "run-20260101-000000-bad0.json", field)
    out = neurotop("ls", "--json")
    assert out.returncode == 0, out.stderr
    assert [r["run_id"] for r in json.loads(out.stdout)] == ["20260101-000000-good"]
    warnings = out.stderr.strip().splitlines()
    assert len(warnings) == 1 and str(bad) in warnings[0], out.stderr
    assert bad.exists()  # not ours to delete: it may be a newer neurotop's


@pytest.mark.parametrize("what", ["/dev/zero", "a FIFO", "a directory", "a huge file"])
def test_ls_and_ctl_skip_a_runtime_entry_that_is_not_a_file(what, bad_paths, runtime_dir):
    runtime_dir.mkdir(mode=0o700)
    (runtime_dir / "run-20260101-000000-good.json").write_text(json.dumps(good_info()))
    bad = runtime_dir / "run-20260101-000000-bad0.json"
    bad.symlink_to(bad_paths[what])
    out = neurotop("ls", timeout=20)
    assert out.returncode == 0 and "20260101-000000-good" in out.stdout, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and str(bad) in out.stderr, out.stderr
    # ctl still finds the good run beside it (whose endpoint nobody answers on)
    out = neurotop("ctl", "good", "knobs", "--timeout", "0.5", timeout=20)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 2 and str(bad) in lines[0] and "no acknowledgement" in lines[1], lines


def test_a_dead_pid_file_beside_a_bad_one_is_still_cleaned(runtime_dir):
    runtime_dir.mkdir(mode=0o700)
    dead = runtime_dir / "run-20260101-000000-dead.json"
    dead.write_text(json.dumps(good_info("20260101-000000-dead", pid=2**22 + 7)))
    bad_file(runtime_dir / "run-20260101-000000-bad0.json", BAD_FIELDS["pid -1"])
    out = neurotop("ls")
    assert out.returncode == 0 and "no live runs" in out.stdout, out.stderr
    assert not dead.exists()


@pytest.mark.parametrize("argv", [("ls",), ("ls", "--json"), ("attach",), ("ctl", "x", "knobs"),
                                  ("replay", "some-run"), ("export", "some-run", "--csv", "d")])
def test_a_runtime_directory_of_another_user_is_refused(argv, runtime_dir):
    runtime_dir.mkdir(mode=0o700)
    os.chown(runtime_dir, 4242, 4242)  # the tests run as root; as a user, chmod would fail
    (runtime_dir / "run-20260101-000000-good.json").write_text(json.dumps(good_info()))
    if argv[0] in ("replay", "export"):  # recordings: no live run is looked up for these
        assert_one_line_error(neurotop(*argv), naming="some-run")
        return
    line = assert_one_line_error(neurotop(*argv), naming=str(runtime_dir))
    assert "uid 4242" in line and "NEUROTOP_RUNTIME_DIR" in line


def test_a_huge_connection_file_is_not_read(tmp_path):
    """``ctl /dev/zero`` read 1.84 GB; a valid-looking file padded to 1 GB is refused too."""
    path = tmp_path / "run-padded.json"
    body = json.dumps(good_info())
    with path.open("w") as f:
        f.write(body[:-1] + ', "pad": "')
        f.truncate(1 << 30)
    line = assert_one_line_error(neurotop("ctl", str(path), "knobs"), naming=str(path))
    assert f"larger than {connfile.MAX_SIZE} bytes" in line


@pytest.mark.parametrize("what", ["/dev/zero", "a FIFO", "a directory", "a huge file"])
def test_ls_skips_bad_session_pointers_and_session_files(what, bad_paths, tmp_path):
    """The per-user list of recordings and the runs root hold bad entries too."""
    pointers = tmp_path / "sessions"  # beside the runtime directory
    pointers.mkdir()
    bad = pointers / "20260101-000000-bad0.json"
    bad.symlink_to(bad_paths[what])
    run_dir = tmp_path / "runs" / "20260101-000000-bad1"
    run_dir.mkdir(parents=True)
    (run_dir / "session.ntop").symlink_to(bad_paths[what])
    out = neurotop("ls", timeout=20)
    assert out.returncode == 0 and "no live runs or recorded sessions" in out.stdout, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], out.stderr
