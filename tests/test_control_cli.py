"""``neurotop ctl`` as a script uses it: prints the ack, exits non-zero on refusal or timeout."""

from __future__ import annotations

import json
import signal

import pytest

from tests.helpers.cli import neurotop

pytestmark = pytest.mark.slow  # starts training processes


def ctl(run, *words: str, timeout: float = 30):
    return neurotop("ctl", run.info.run_id, *words, timeout=timeout)


def test_ctl_commands_print_acks_and_exit_codes(start_run):
    run = start_run("--step-sleep", "0.01", "--model", "dropout")
    out = ctl(run, "pause")
    assert out.returncode == 0, out.stderr
    held = json.loads(out.stdout)["step"]

    out = ctl(run, "step", "2")
    ack = json.loads(out.stdout)
    assert out.returncode == 0 and ack["step"] == held and ack["until"] == held + 2

    out = ctl(run, "set", "lr", "0.02")
    ack = json.loads(out.stdout)
    assert out.returncode == 0 and (ack["old"], ack["new"]) == (0.05, 0.02)
    out = ctl(run, "set", "lr", "x0.5")
    assert json.loads(out.stdout)["new"] == 0.01
    out = ctl(run, "set", "temperature", "3")
    assert json.loads(out.stdout)["new"] == 3.0

    out = ctl(run, "knobs")
    listing = {k["name"]: k for k in json.loads(out.stdout)["knobs"]}
    assert out.returncode == 0 and listing["lr"]["value"] == 0.01
    assert listing["temperature"]["min"] == 0.1

    out = ctl(run, "set", "lr", "-1")
    assert out.returncode == 1 and "set rejected: lr must be >= 0.0, got -1" in out.stderr
    out = ctl(run, "set", "nope", "1")
    assert out.returncode == 1 and "unknown knob 'nope'; known: lr" in out.stderr
    out = ctl(run, "set", "lr", "fast")
    assert out.returncode == 2 and "'fast' is not a value" in out.stderr
    out = ctl(run, "step", "many")
    assert out.returncode == 2 and "usage: neurotop ctl TARGET step N" in out.stderr
    out = ctl(run, "pause", "now")
    assert out.returncode == 2 and "pause takes no arguments" in out.stderr

    run.proc.send_signal(signal.SIGSTOP)  # a hung run: no ack can come
    try:
        out = ctl(run, "resume", "--timeout", "1")
        assert out.returncode == 1 and "no acknowledgement" in out.stderr
    finally:
        run.proc.send_signal(signal.SIGCONT)

    out = ctl(run, "stop")
    assert out.returncode == 0 and json.loads(out.stdout)["new"] == "stopping"
    assert run.proc.wait(20) == 0, "stop must end the loop through mon.should_stop"
    assert b"STOPPED" in run.proc.stdout.read()
