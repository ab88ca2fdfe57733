"""A headless run whose weights turn NaN: it auto-pauses, and with
``watch(auto_pause_timeout=S)`` nobody resuming within S seconds makes it take a snapshot
and stop (``StopTraining`` out of ``optimizer.step()``) instead of waiting forever, with
the reason in the log and the recording."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import neurotop
from neurotop.service.controller import Controller, Pending
from tests.helpers.sessions import recorded_headers

TIMEOUT, POISON = 1.0, 12


def test_an_auto_pause_nobody_resumes_snapshots_and_stops(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = neurotop.watch(model, opt, name="headless", report_every=1, record=tmp_path,
                         snapshot=tmp_path / "snaps", auto_pause_timeout=TIMEOUT)
    gen = torch.Generator().manual_seed(0)
    steps = 0
    caplog.set_level(logging.WARNING, logger="neurotop.agent")
    t0 = time.monotonic()
    with pytest.raises(neurotop.StopTraining, match="auto-pause timeout") as stopped:
        for it in range(500):
            if it == POISON:
                with torch.no_grad():
                    model[0].weight.fill_(float("nan"))
            x = torch.randn(16, 8, generator=gen)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
            steps += 1
            time.sleep(0.005)
    held = time.monotonic() - t0
    assert mon.should_stop and POISON < mon.step < POISON + 20
    assert TIMEOUT <= held < TIMEOUT + 15
    mon.close()  # joins the snapshot writer, flushes the recording

    reason = str(stopped.value)
    assert "nobody resumed within 1 s" in reason and "non-finite" in reason
    assert any("auto-pause timeout" in r.getMessage() for r in caplog.records)
    acks = [h for h in recorded_headers(mon.recorder.path)
            if h["kind"] == "event" and h.get("event") == "ack"
            and h.get("sender") == "auto-pause"]
    assert [a["cmd"] for a in acks] == ["pause", "stop", "snapshot"]
    assert acks[1]["reason"] == reason and acks[1]["new"] == "stopping"
    snap = Path(acks[2]["new"])
    assert acks[2]["ok"] and snap.parent == tmp_path / "snaps" and snap.is_file()
    state = torch.load(snap, weights_only=True)
    assert state["step"] == mon.step and torch.isnan(state["model"]["0.weight"]).all()


def test_a_resume_in_time_keeps_the_run_going():
    """The operator came back: the timeout is off for this incident."""
    c = Controller(auto_pause_timeout=0.2)
    acks: list[dict] = []
    c.submit(Pending("a", "pause", {"reason": "auto-pause: x"}, "auto-pause", acks.append))
    c.submit(Pending("b", "resume", {}, "me@host", acks.append))
    c.at_boundary(1)  # applies both: paused, then resumed, at once
    time.sleep(0.3)
    c.at_boundary(2)
    assert not c.stop_requested and [a["new"] for a in acks] == ["paused", "running"]
    with pytest.raises(ValueError, match="auto_pause_timeout"):
        Controller(auto_pause_timeout=0)
