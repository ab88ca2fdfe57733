"""`neurotop ls`, `replay` and `export` with recorded sessions, as a script user runs them."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from tests.helpers.cli import neurotop
from tests.helpers.sessions import write_run
from tests.helpers.training import watch_options


@pytest.mark.slow
def test_ls_lists_live_runs_and_recorded_sessions_and_export_finds_them(start_run, tmp_path):
    ended = start_run("--steps", "30", "--step-sleep", "0.05")
    assert ended.proc.wait(30) == 0
    live = start_run("--step-sleep", "0.02", *watch_options(record=False))
    out = neurotop("ls")
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines()[1:] if ln.strip()}
    assert "test-loop" in lines[ended.info.run_id] and " 30 " in lines[ended.info.run_id]
    assert " ended " in lines[ended.info.run_id] and "kB" in lines[ended.info.run_id]
    assert " live " in lines[live.info.run_id] and live.info.telemetry in lines[live.info.run_id]
    listed = {r["run_id"]: r for r in json.loads(neurotop("ls", "--json").stdout)}
    assert listed[ended.info.run_id]["state"] == "ended"
    assert listed[ended.info.run_id]["steps"] == 30
    assert listed[live.info.run_id]["state"] == "live" and listed[live.info.run_id]["steps"] is None
    assert all("key" not in r for r in listed.values())

    out = neurotop("export", ended.info.run_id[-4:], "--csv", str(tmp_path / "csv"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "csv" / f) for f in
                                  ("scalars.csv", "layers.csv", "events.csv", "system.csv")]
    scalars = (tmp_path / "csv" / "scalars.csv").read_text().splitlines()
    assert scalars[0] == ("step,time,loss,grad_norm,first_nonfinite,loss_max,loss_max_step,"
                          "loss_nonfinite_step,grad_norm_max,grad_norm_max_step,"
                          "grad_norm_nonfinite_step,lr,steps_per_s,"
                          "samples_per_s,mem_device,mem_device_peak,mem_host")
    assert len(scalars) == 31


def test_replay_and_export_explain_bad_input(tmp_path):
    newer = tmp_path / "newer.ntop"
    write_run(newer, 5)
    buf = bytearray(newer.read_bytes())
    head = buf[:8] + struct.pack("<HH", 7, 0)
    buf[:16] = head + struct.pack("<I", zlib.crc32(head))
    newer.write_bytes(bytes(buf))
    out = neurotop("replay", str(newer))
    assert out.returncode == 2
    assert "session format version 7, newer than this neurotop reads" in out.stderr
    out = neurotop("export", "no-such-run", "--csv", str(tmp_path / "x"))
    assert out.returncode == 2 and "no session file or recorded run matches" in out.stderr
    out = neurotop("replay", str(tmp_path / "missing.ntop"))
    assert out.returncode == 2 and "no session file" in out.stderr
