"""System metrics per rank (issue 18, item 5): a real training process's heartbeats carry
its host CPU and memory, checked against what /proc says of that process independently;
the UI's store takes them in; the recording keeps them and ``neurotop export --csv``
writes them as the ``system`` table. The GPU path runs only where NVML sees a device."""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import neurotop
from neurotop.protocol import wire
from neurotop.protocol.sessionfile import MESSAGE, SessionReader, decode_message
from neurotop.service.system import NO_PYNVML, SystemSampler
from neurotop.tui.data.store import RunStore
from tests.helpers.cli import neurotop as neurotop_cli
from tests.helpers.telemetry import Subscriber
from tests.helpers.training import watch_options
from tests.helpers.waiting import wait_until

TICK = os.sysconf("SC_CLK_TCK")


def nvml_devices() -> tuple[int, str]:
    """How many GPUs NVML sees, or 0 and why not, found without neurotop."""
    try:
        import pynvml
    except ImportError:
        return 0, NO_PYNVML
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return 0, f"NVML unavailable: {e}"
    try:
        n = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    return n, "" if n else "no NVIDIA device visible"


def proc_rss(pid: int) -> int:
    """``VmRSS`` of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of /proc/PID/stat (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def host_ticks() -> tuple[int, int]:
    """(busy, total) of /proc/stat's ``cpu`` line."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def weighted_mean(beats: list[dict], key: str) -> float:
    """The time-weighted mean of ``key`` over heartbeats 1.. (each value covers the time
    since the previous heartbeat's sample): CPU time over wall time between the ends."""
    pairs = list(zip(beats, beats[1:], strict=False))
    span = beats[-1]["t"] - beats[0]["t"]
    return sum(b["system"][key] * (b["t"] - a["t"]) for a, b in pairs) / span


@pytest.mark.slow
def test_a_training_process_heartbeats_its_own_cpu_and_memory(start_run):
    run = start_run(*watch_options(report_every=50))  # few stats: heartbeats come at once
    pid = run.info.pid
    with Subscriber(run.info.telemetry) as sub:
        sub.ready()
        beats: list[dict] = []
        marks: list[tuple[float, tuple[int, int], int]] = []  # cpu s, host ticks, rss
        store = RunStore()

        def heartbeat() -> bool:
            sub.collect(2.0, until=lambda m: m.kind == wire.HEARTBEAT)
            m = sub.msgs[-1]
            if m.kind != wire.HEARTBEAT:
                return False
            marks.append((proc_cpu_s(pid), host_ticks(), proc_rss(pid)))  # right after it
            beats.append(m.header)
            store.ingest(m)
            return len(beats) >= 9

        wait_until(heartbeat, timeout=60, interval=0, what="nine heartbeats")
    window = beats[2:]  # after the heartbeat the subscription brought forward
    assert all(b["state"] == "running" for b in window) and window[-1]["step"] > window[0]["step"]

    for b, (_, _, rss) in zip(beats, marks, strict=True):
        assert abs(b["system"]["rss"] - rss) <= 0.2 * rss, (b["system"]["rss"], rss)
    cpu_s = (marks[-1][0] - marks[2][0]) / (window[-1]["t"] - window[0]["t"]) * 100
    assert cpu_s > 0 and all(b["system"]["cpu_pct"] > 0 for b in window)
    assert weighted_mean(window, "cpu_pct") == pytest.approx(cpu_s, abs=10)
    (busy0, total0), (busy1, total1) = marks[2][1], marks[-1][1]
    assert weighted_mean(window, "host_cpu_pct") == pytest.approx(
        100 * (busy1 - busy0) / (total1 - total0), abs=15)
    system = beats[-1]["system"]
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    assert system["mem_total"] == int(meminfo["MemTotal"].split()[0]) * 1024
    assert 0 < system["mem_available"] <= system["mem_total"]
    assert system["cpus"] == os.cpu_count()

    devices, why = nvml_devices()
    if devices:  # (CUDA_VISIBLE_DEVICES may show fewer than NVML has)
        assert system["gpus"] and system["no_gpu"] == ""
    else:
        assert system["gpus"] == [] and system["no_gpu"].startswith(why), system["no_gpu"]

    s = store.frame().status  # what a screen reads
    assert s.rss == system["rss"] and s.cpu_pct == system["cpu_pct"]
    assert s.host_cpu_pct == system["host_cpu_pct"] and s.mem_total == system["mem_total"]
    assert len(s.gpus) == len(system["gpus"]) and s.no_gpu == system["no_gpu"]


@pytest.mark.slow
def test_the_recording_keeps_them_and_export_writes_the_system_table(start_run, tmp_path):
    run = start_run("--steps", "200", "--step-sleep", "0.01", *watch_options(heartbeat_s=0.2))
    assert run.proc.wait(120) == 0, run.proc.stderr.read().decode()[-2000:]
    [session] = (tmp_path / "runs").glob("*/session.ntop")
    with SessionReader(session) as r:
        recorded = [h for rec in r.records() if rec.type == MESSAGE
                    and (h := decode_message(rec.body).header)["kind"] == wire.HEARTBEAT]
    assert len(recorded) >= 5 and all("system" in h for h in recorded)

    out = neurotop_cli("export", str(session), "--csv", str(tmp_path / "csv"))
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "csv" / "system.csv") in out.stdout.split()
    with open(tmp_path / "csv" / "system.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    devices, why = nvml_devices()
    shown = max(len(h["system"]["gpus"]) for h in recorded)
    assert bool(shown) == bool(devices)
    gpu = [f"gpu{i}_{c}" for i in range(shown)
           for c in ("name", "util", "mem_used", "mem_total", "power_w", "temp_c")]
    assert list(rows[0]) == ["step", "time", "state", "cpu_pct", "host_cpu_pct", "cpus", "rss",
                             "mem_total", "mem_available", "no_gpu", *gpu]
    assert len(rows) == len(recorded)
    assert [float(r["rss"]) for r in rows] == [h["system"]["rss"] for h in recorded]
    assert [int(r["step"]) for r in rows] == [h["step"] for h in recorded]
    assert rows[-1]["state"] == "ended" and int(rows[-1]["step"]) == 200
    assert rows[0]["cpu_pct"] == "nan"  # the first sample has no interval yet
    assert all(float(r["cpu_pct"]) > 0 for r in rows[1:-1])
    if not devices:
        assert all(r["no_gpu"].startswith(why) for r in rows)


def test_the_store_counts_a_malformed_system_field_and_keeps_the_rest():
    store = RunStore()
    base = {"kind": wire.HEARTBEAT, "run": "r", "rank": 0, "seq": 0, "step": 3,
            "state": "running", "steps_per_s": 1.0}
    store.ingest(wire.Message({**base, "system": {"rss": 5e8, "gpus": [], "no_gpu": "why"}}))
    store.ingest(wire.Message({**base, "seq": 1, "step": 4, "system": {"rss": "big"}}))
    s = store.frame().status
    assert s.bad_messages == 1 and "rss" in s.last_error
    assert s.step == 4 and s.rss == 5e8 and s.no_gpu == "why"
    store.ingest(wire.Message({**base, "seq": 2, "step": 5}))  # an agent without metrics
    assert store.frame().status.rss == 5e8


@pytest.mark.slow
def test_they_are_sampled_on_the_agent_thread_only(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    threads: list[str] = []
    with neurotop.watch(model, opt, record=False, heartbeat_s=0.05) as mon:
        sample = mon.service.system.sample
        mon.service.system.sample = lambda: (threads.append(threading.current_thread().name),
                                             sample())[1]
        deadline = time.monotonic() + 30
        while len(threads) < 5 and time.monotonic() < deadline:
            loss = model(torch.randn(4, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
            time.sleep(0.01)
    assert len(threads) >= 5 and set(threads) == {"neurotop-agent"}


DEVICES = nvml_devices()
gpu = pytest.mark.skipif(not DEVICES[0], reason=f"no GPU: {DEVICES[1]}")


@gpu
def test_each_visible_gpu_as_nvml_reports_it(monkeypatch):
    import pynvml

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sampler = SystemSampler()
    try:
        first = sampler.sample()
    finally:
        sampler.close()
    pynvml.nvmlInit()
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                   for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [u.decode() if isinstance(u, bytes) else u
                 for u in map(pynvml.nvmlDeviceGetUUID, handles)]
        totals = [pynvml.nvmlDeviceGetMemoryInfo(h).total for h in handles]
    finally:
        pynvml.nvmlShutdown()
    gpus = first["gpus"]
    assert first["no_gpu"] == "" and [g["uuid"] for g in gpus] == uuids
    assert [g["index"] for g in gpus] == list(range(len(uuids)))
    for g, total in zip(gpus, totals, strict=True):
        assert g["mem_total"] == total and 0 <= g["mem_used"] <= total
        assert 0 <= g["util"] <= 100 and 10 <= g["temp_c"] <= 110 and g["power_w"] > 0
        assert g["name"]

    one, none = SystemSampler(), SystemSampler()
    try:  # NVML is opened at the first sample, which reads CUDA_VISIBLE_DEVICES
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuids[-1][:12])  # a prefix, as CUDA takes
        assert [(g["index"], g["uuid"]) for g in one.sample()["gpus"]] == [(0, uuids[-1])]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        hidden = none.sample()
        assert hidden["gpus"] == []
        assert hidden["no_gpu"] == "no NVIDIA device visible (CUDA_VISIBLE_DEVICES='')"
    finally:
        one.close()
        none.close()
