"""Alerts to the outside (issue 18, item 8): ``watch(on_alert=fn)`` and the JSON Lines alert
log beside the session file, from real training runs with a planted NaN. A script tailing
``alerts.jsonl`` sees each alert while the run goes on; ``fn`` runs on the agent thread, and
one that raises is logged once and stops nothing."""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from neurotop.service.recorder import open_recording
from tests.helpers.alerts import recorded
from tests.helpers.training import watch_options
from tests.helpers.waiting import wait_until

FIELDS = ("alert", "rule", "level", "message", "step", "layer")


def lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON Lines file, parsed."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def same(alerts: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(a[k] for k in FIELDS) for a in alerts]


def train(mon: neurotop.Monitor, model: nn.Module, opt: torch.optim.Optimizer, steps: int,
          nan_at: tuple[int, ...] = (), until: Any = None) -> None:
    """A real loop; at the steps ``nan_at`` it observes a NaN loss (the update itself is
    finite), and it goes on past ``steps`` until ``until()`` holds (at most 2,000 steps)."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 4, generator=gen)
    while mon.step < steps or (until is not None and not until() and mon.step < 2000):
        x = torch.randn(64, 16, generator=gen)
        loss = F.cross_entropy(model(x), (x @ teacher).argmax(1))
        opt.zero_grad()
        loss.backward()
        mon.observe(loss=float("nan") if mon.step + 1 in nan_at else loss)
        opt.step()


def model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


@pytest.mark.slow
def test_a_script_tailing_alerts_jsonl_sees_the_nan_while_the_run_goes_on(start_run, tmp_path):
    run = start_run("--nan-at", "30", "--step-sleep", "0.01", *watch_options(auto_pause=False))
    log = tmp_path / "runs" / run.info.run_id / "alerts.jsonl"
    wait_until(log.exists, timeout=30, what="the alert log")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600  # as private as the session file
    [nan] = wait_until(lambda: [a for a in lines(log) if a["alert"] == "nonfinite"],
                       timeout=60, what="the nonfinite alert in alerts.jsonl")
    assert run.proc.poll() is None  # read while the run is still going
    assert nan["step"] == 30 and nan["level"] == "critical"
    assert nan["run"] == run.info.run_id and nan["rank"] == 0 and nan["t"] > 0
    run.stop()
    alerts, _ = recorded(tmp_path / "runs")
    assert alerts and same(lines(log)) == same(alerts)  # line by line, what it recorded


@pytest.mark.slow
def test_on_alert_gets_each_alert_on_the_agent_thread(tmp_path):
    model, opt = model_and_opt()
    got: list[tuple[str, dict[str, Any]]] = []
    log = tmp_path / "runs"
    with neurotop.watch(model, opt, record=log, report_every=1, auto_pause=False,
                        on_alert=lambda a: got.append((threading.current_thread().name, a))
                        ) as mon:
        train(mon, model, opt, 40, nan_at=(25,), until=lambda: got)
        assert got and got[0][1]["alert"] == "nonfinite"  # while the run goes on
        path = mon.recorder.path.parent / "alerts.jsonl"
        assert same(lines(path)) == same(a for _, a in got)
    alerts, _ = recorded(log)
    assert {name for name, _ in got} == {"neurotop-agent"}
    assert same(a for _, a in got) == same(alerts) == same(lines(path))
    first = got[0][1]
    assert (first["step"], first["run"], first["rank"]) == (25, mon.run_id, 0)
    assert math.isnan(first["value"]) or math.isinf(first["value"])
    assert lines(path)[0]["value"] is None  # JSON has no NaN: jq reads every line


@pytest.mark.slow
def test_an_on_alert_that_raises_is_logged_once_and_stops_nothing(tmp_path, caplog):
    model, opt = model_and_opt()
    calls: list[int] = []

    def fail(alert: dict[str, Any]) -> None:
        calls.append(alert["step"])
        raise SystemExit if len(calls) == 3 else RuntimeError("the pager is down")

    with caplog.at_level(logging.ERROR, logger="neurotop.agent"):
        with neurotop.watch(model, opt, record=tmp_path / "runs", report_every=1,
                            auto_pause=False, on_alert=fail) as mon:
            # three incidents: each NaN comes 30 reports after the last (rearm: 20)
            train(mon, model, opt, 100, nan_at=(20, 50, 80), until=lambda: len(calls) == 3)
            assert mon.service.is_alive()
    alerts, steps = recorded(tmp_path / "runs")
    assert calls == [20, 50, 80] == [a["step"] for a in alerts if a["alert"] == "nonfinite"]
    assert steps[-1] >= 100  # reports went on after each raise
    failures = [r.getMessage() for r in caplog.records if "on_alert raised" in r.getMessage()]
    assert [m.split(" on a ")[0] for m in failures] == [
        "neurotop: on_alert raised RuntimeError", "neurotop: on_alert raised SystemExit"]


def test_on_alert_must_be_a_function():
    model, opt = model_and_opt()
    with pytest.raises(TypeError, match="on_alert= takes a function"):
        neurotop.watch(model, opt, record=False, on_alert="page-me")


@pytest.mark.slow
def test_private_files_false_leaves_the_alert_log_to_the_umask(tmp_path):
    model, opt = model_and_opt()
    umask = os.umask(0o022)
    try:
        with neurotop.watch(model, opt, record=tmp_path / "runs", private_files=False) as mon:
            log = mon.recorder.path.parent / "alerts.jsonl"
            assert log.exists() and log.read_text() == ""  # there to follow from the start
    finally:
        os.umask(umask)
    assert stat.S_IMODE(log.stat().st_mode) == 0o644


def test_each_rank_of_a_job_logs_its_alerts_beside_its_own_session_file(tmp_path):
    rec = open_recording(tmp_path, "job-1", "ddp", 0.0, job={"rank": 1, "world_size": 2})
    rec.start()
    try:
        assert rec.path.name == "session-r1.ntop"
        assert rec.alerts.path == rec.path.parent / "alerts-r1.jsonl"
        rec.alerts.write({"alert": "nonfinite", "value": math.inf, "rank": 1})
        assert lines(rec.alerts.path) == [{"alert": "nonfinite", "value": None, "rank": 1}]
    finally:
        rec.close()
