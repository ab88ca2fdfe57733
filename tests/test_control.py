"""Live control on real training loops: every command lands at a step boundary, is acked with
the step it took effect, and the process itself sees the change at exactly the next step."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import neurotop
from neurotop.protocol import wire
from neurotop.protocol.runs import SESSION_FILE
from neurotop.service.controller import Pending
from neurotop.tui.data.client import CommandError, Endpoints, LiveClient
from tests.helpers.sessions import recorded_headers
from tests.helpers.training import steps_logged, watch_options
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow  # starts training processes

#: The training script's model with Dropout layers (for the dropout knob).
DROPOUT = ("--model", "dropout")


def connect(run) -> LiveClient:
    c = LiveClient(Endpoints(run.info.telemetry, run.info.control, run.info.key_bytes)).start()
    wait_until(lambda: c.store.status.step > 0, what="the first heartbeat")
    return c


def telemetry_scalar(c: LiveClient, name: str, step: int) -> float:
    wait_until(lambda: step in c.store.steps(), what=f"stats of step {step}")
    steps, values = c.store.scalar(name)
    return float(values[list(steps).index(step)])


def test_knobs_land_at_the_next_step_in_process_and_telemetry(start_run, tmp_path):
    log = tmp_path / "steps.jsonl"
    run = start_run("--step-sleep", "0.01", "--log", str(log), *DROPOUT)
    c = connect(run)
    try:
        def apply(knob: str, value, op: str = "set") -> dict:
            args = {"knob": knob, "value": value, **({"op": op} if op == "mul" else {})}
            ack = c.command("set", args).result(10)
            assert ack["ok"] and isinstance(ack["step"], int)
            wait_until(lambda: ack["step"] + 2 in steps_logged(log), what="two more steps")
            return ack

        ack = apply("lr", 0.01)
        assert (ack["old"], ack["new"]) == (0.05, 0.01)
        seen = steps_logged(log)
        assert seen[ack["step"]]["lr"] == [0.05], "the change landed before its boundary"
        assert seen[ack["step"] + 1]["lr"] == [0.01], "the next step did not use the new lr"
        assert telemetry_scalar(c, "lr", ack["step"] + 1) == pytest.approx(0.01)
        assert telemetry_scalar(c, "lr", ack["step"]) == pytest.approx(0.05)

        ack = apply("lr", 0.5, "mul")
        assert ack["new"] == pytest.approx(0.005)
        assert steps_logged(log)[ack["step"] + 1]["lr"] == [pytest.approx(0.005)]

        ack = apply("weight_decay", 0.01)
        assert steps_logged(log)[ack["step"] + 1]["wd"] == [0.01]

        ack = apply("dropout", 0.5)
        assert ack["applied_to"] == ["2", "5"]
        assert steps_logged(log)[ack["step"] + 1]["dropout"] == [0.5, 0.5]
        ack = apply("dropout[5]", 0.2)
        assert ack["applied_to"] == ["5"] and ack["old"] == 0.5
        assert steps_logged(log)[ack["step"] + 1]["dropout"] == [0.5, 0.2]

        ack = apply("temperature", 2.0)
        assert steps_logged(log)[ack["step"] + 1]["temperature"] == 2.0

        ack = apply("grad_clip", 1e-3)
        seen = steps_logged(log)
        assert seen[ack["step"]]["grad_norm"] > 1e-3
        assert seen[ack["step"] + 1]["grad_norm"] <= 1e-3 * 1.001, "not clipped before the step"

        listing = {k["name"]: k for k in c.command("knobs").result(10)["knobs"]}
        assert {"lr", "weight_decay", "grad_clip", "dropout", "l1", "auto_pause",
                "temperature"} <= set(listing)
        assert listing["lr"]["value"] == pytest.approx(0.005)
        assert listing["temperature"]["max"] == 10.0 and listing["temperature"]["type"] == "float"
        assert listing["dropout"]["value"] == [0.5, 0.2]
        wait_until(lambda: c.store.knob_values.get("grad_clip") == 1e-3, what="heartbeat knobs")

        # The audit trail: each command and its ack, with the sender, on the telemetry stream.
        events = c.store.status.events
        cmds = [e for e in events if e.get("event") == "command" and e["cmd"] == "set"]
        acks = {e["id"]: e for e in events if e.get("event") == "ack" and e["cmd"] == "set"}
        assert len(cmds) == 7 and all("@" in e["sender"] and e["client"] for e in cmds)
        assert all(acks[e["id"]]["ok"] and acks[e["id"]]["sender"] == e["sender"] for e in cmds)
    finally:
        c.close()


def test_pause_holds_step_advances_exactly_and_bad_values_are_refused(start_run, tmp_path):
    log = tmp_path / "steps.jsonl"
    run = start_run("--step-sleep", "0.01", "--log", str(log), *DROPOUT)
    c = connect(run)
    try:
        ack = c.command("pause").result(10)
        held = ack["step"]
        wait_until(lambda: held in steps_logged(log), what="the paused step logged")
        time.sleep(1.2)
        assert max(steps_logged(log)) == held, "a step ran while paused"
        assert c.store.status.state == "paused" and c.store.status.step == held

        ack = c.command("step", {"n": 3}).result(10)
        assert ack["new"] == "stepping" and ack["until"] == held + 3
        wait_until(lambda: any(e.get("event") == "paused" for e in c.store.status.events),
                   what="paused again after 3 steps")
        time.sleep(0.8)
        assert max(steps_logged(log)) == held + 3, "step 3 did not advance exactly 3 steps"
        assert c.store.status.state == "paused" and c.store.status.paused_at == held + 3

        refused = {
            ("lr", -1.0): "lr must be >= 0.0, got -1.0",
            ("lr", float("nan")): "lr must be a finite number",
            ("lr", "fast"): "set: value must be bool/int/float, got str",
            ("dropout", 1.5): "dropout must be <= 1.0",
            ("temperature", 100.0): "temperature must be <= 10.0",
            ("auto_pause", 0.5): "auto_pause takes true or false",
            ("lr[3]", 0.1): "the optimizer has 1 param group",
            ("l1", 0.1): "l1 needs a layer glob",
            ("l1[nope*]", 0.1): "matches no module",
            ("momentum", 0.9): "unknown knob 'momentum'; known: lr, weight_decay, grad_clip",
        }
        for (knob, value), reason in refused.items():
            with pytest.raises(CommandError, match=re.escape(reason)):
                c.command("set", {"knob": knob, "value": value}).result(10)
        with pytest.raises(CommandError, match="a factor must be finite and > 0"):
            c.command("set", {"knob": "lr", "value": 0, "op": "mul"}).result(10)
        with pytest.raises(CommandError, match="step n must be between 1 and"):
            c.command("step", {"n": 0}).result(10)
        with pytest.raises(CommandError, match="pause does not take 'force'"):
            c.command("pause", {"force": True}).result(10)
        with pytest.raises(CommandError, match="bytes encoded; the agent takes commands of at"):
            c.command("set", {"knob": "lr", "value": "x" * (2 << 20)}).result(10)
        assert c.command("knobs").result(10)["knobs"][0]["value"] == 0.05, "a refusal changed lr"
        assert max(steps_logged(log)) == held + 3, "a refused command moved the run"

        ack = c.command("resume").result(10)
        assert ack["step"] == held + 3 and ack["new"] == "running"
        wait_until(lambda: max(steps_logged(log)) > held + 10, what="steps after resume")
    finally:
        c.close()


def test_l1_penalty_raises_the_zero_fraction_of_a_relu_layer(start_run, tmp_path):
    logs = {name: tmp_path / f"{name}.jsonl" for name in ("plain", "l1")}
    runs = {name: start_run("--step-sleep", "0.004", "--log", str(p), *DROPOUT)
            for name, p in logs.items()}
    c = connect(runs["l1"])
    try:
        ack = c.command("set", {"knob": "l1[1]", "value": 0.05}).result(10)
        assert ack["ok"] and ack["applied_to"] == ["1"]
    finally:
        c.close()
    # The same steps of both runs (same seed, same data: they differ only by the L1), counted
    # from the step the L1 took effect, so how fast this test sent it does not matter.
    window = range(ack["step"] + 151, ack["step"] + 251)
    for name, p in logs.items():
        wait_until(lambda p=p: window[-1] in steps_logged(p), timeout=120,
                   what=f"the {name} run 250 steps past step {ack['step']}")
        runs[name].stop()
        assert runs[name].proc.returncode == 0
    zero = {name: np.mean([steps_logged(p)[s]["relu_zero"] for s in window])
            for name, p in logs.items()}
    print(f"ReLU zero fraction over steps {window[0]}-{window[-1]}: {zero}"
          f" (L1 set at step {ack['step']})")
    assert zero["l1"] > zero["plain"] + 0.1, f"L1 did not sparsify the ReLU layer: {zero}"


def test_auto_pause_on_nan_loss_shows_why_and_can_be_switched_off(start_run, tmp_path):
    log = tmp_path / "steps.jsonl"
    run = start_run("--step-sleep", "0.01", "--nan-at", "200", "--log", str(log), *DROPOUT)
    c = connect(run)
    try:
        wait_until(lambda: c.store.status.state == "paused", timeout=30, what="auto-pause")
        reason = c.store.status.pause_reason
        assert "auto-pause: non-finite activations in layer '2'" in reason, reason
        assert reason.endswith("at step 200"), "the reason must name the NaN's step"
        auto = [e for e in c.store.status.events if e.get("sender") == "auto-pause"]
        assert auto and auto[0]["ok"] and auto[0]["cmd"] == "pause"
        held = c.store.status.paused_at
        assert held == auto[0]["step"]
        # Where it landed, from the recording (every message in the order published): the
        # agent publishes the reports it has read, then the alerts they raised, and the
        # pause it queued lands at the next boundary of the training thread, which had not
        # handed over the following report yet: at most one step after the last one read.
        session = Path(run.info.run_dir) / SESSION_FILE

        def recorded_pause() -> list[dict] | None:
            headers = recorded_headers(session)
            return headers if any(h.get("sender") == "auto-pause" for h in headers) else None

        headers = wait_until(recorded_pause, what="the auto-pause recorded")
        i = next(i for i, h in enumerate(headers) if h.get("alert") == "nonfinite")
        assert headers[i]["step"] == 200, "the alert must come from the NaN's own report"
        read = max(h["step"] for h in headers[:i] if h["kind"] == wire.STATS)
        assert 200 <= held <= read + 1, f"paused at {held}, the agent had read step {read}"
        time.sleep(1.0)
        assert max(steps_logged(log)) == held

        c.command("set", {"knob": "auto_pause", "value": False}).result(10)
        c.command("resume").result(10)
        wait_until(lambda: max(steps_logged(log)) > held + 30, what="steps with auto-pause off")
        assert c.store.status.state == "running"
    finally:
        c.close()


def test_snapshot_saves_state_and_stop_ends_the_loop_gracefully(start_run, tmp_path):
    snaps = tmp_path / "snaps"
    run = start_run("--step-sleep", "0.01", *DROPOUT,
                    *watch_options(snapshot=str(snaps), raise_on_stop=True))
    c = connect(run)
    try:
        ack = c.command("snapshot").result(20)
        path = Path(ack["new"])
        assert path.parent == snaps and f"step{ack['step']:08d}" in path.name
        state = torch.load(path, weights_only=True)
        assert state["step"] == ack["step"] and "0.weight" in state["model"]
        assert state["optimizer"]["param_groups"][0]["lr"] == 0.05

        ack = c.command("stop").result(10)
        assert ack["new"] == "stopping"
        assert run.proc.wait(20) == 0
        out = run.proc.stdout.read().decode()
        assert "STOPTRAINING stopped by an operator command" in out
        assert f"STOPPED {ack['step']}" in out, out
    finally:
        c.close()


def test_a_snapshot_being_written_when_the_run_ends_is_finished(tmp_path, monkeypatch):
    """``close`` waits for the checkpoint writer: the file is whole and its ack was sent."""
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (time.sleep(0.5), save(*a, **k)))
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = neurotop.watch(model, opt, record=False, snapshot=str(tmp_path))
    acks: list[dict] = []
    mon.controller.submit(Pending("s", "snapshot", {}, "test", acks.append))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # the boundary: the state is copied, the writer thread starts
    mon.close()
    assert [a["ok"] for a in acks] == [True]
    assert torch.load(acks[0]["new"], weights_only=True)["step"] == 1
