"""The ``neurotop`` command as a script user runs it."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import neurotop
from tests.helpers.waiting import wait_until


@pytest.mark.slow
def test_ls_lists_a_live_run_and_hides_its_key(start_run):
    run = start_run("--step-sleep", "0.02")
    out = neurotop("ls")
    assert out.returncode == 0 and run.info.run_id in out.stdout and "test-loop" in out.stdout
    listed = json.loads(neurotop("ls", "--json").stdout)
    assert [r["run_id"] for r in listed] == [run.info.run_id]
    assert "key" not in listed[0]


@pytest.mark.slow
def test_ctl_pause_prints_the_ack_and_resume_continues(start_run):
    run = start_run("--step-sleep", "0.02")
    out = neurotop("ctl", run.info.run_id[-6:], "pause")
    assert out.returncode == 0, out.stderr
    ack = json.loads(out.stdout)
    assert ack["ok"] is True and ack["new"] == "paused" and ack["step"] >= 0
    out = neurotop("ctl", run.info.run_id, "resume")
    assert out.returncode == 0 and json.loads(out.stdout)["step"] == ack["step"]


def test_unknown_target_gives_a_clear_error():
    out = neurotop("attach", "no-such-run")
    assert out.returncode == 2
    assert "no live run matches 'no-such-run'" in out.stderr


def test_stale_connection_file_is_ignored_and_cleaned(runtime_dir):
    from neurotop.protocol import connfile

    dead = connfile.ConnectionInfo(run_id="dead", name="x", pid=2**22 + 7, start_time=0,
                                   telemetry="tcp://127.0.0.1:1", control="tcp://127.0.0.1:2",
                                   key="00")
    path = connfile.write(dead)
    out = neurotop("ls")
    assert "no live runs" in out.stdout
    wait_until(lambda: not path.exists(), what="stale file removed")


def test_corrupt_connection_file_is_reported(tmp_path):
    bad = tmp_path / "run-x.json"
    bad.write_text("{not json")
    out = neurotop("attach", str(bad))
    assert out.returncode == 2 and "not a neurotop connection file" in out.stderr
