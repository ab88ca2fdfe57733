"""A job's rank rules and every node's relay: stragglers, diverged replicas, and the
connection file of a two-node job. The fast tests drive the torch-free rules
(``neurotop.service.rank_rules``) with tables of real per-rank figures; the slow ones run
real DDP jobs under ``torchrun`` (gloo, CPU): 4 ranks with rank 2 sleeping, their healthy
twin, a replica perturbed outside DDP, and two torchruns as two "nodes" on this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurotop.protocol import connfile, wire
from neurotop.protocol.sessionfile import KIND_CODES, MESSAGE, SessionReader, split_frames
from neurotop.service.rank_rules import (
    UNMEASURED,
    RankJudge,
    RankRules,
    RankRulesError,
    others_median,
    rank_rules,
)
from neurotop.training.distributed import PARAMS_EVERY, node_id
from neurotop.tui.data.client import Endpoints, LiveClient
from neurotop.tui.data.targets import resolve
from tests.helpers.package import ROOT
from tests.helpers.telemetry import Subscriber
from tests.helpers.waiting import wait_until
from tests.test_remote_ssh import SSHD, sshd  # noqa: F401  (the fixture: a real sshd)

slow = pytest.mark.slow  # starts torchrun and its ranks
SCRIPT = ROOT / "tests" / "scripts" / "ddp_health.py"


def table(ready: list[float], step: float = 0.05, loss: list[float] | None = None,
          params: list[float] | None = None) -> np.ndarray:
    """A check's vitals table: one row per rank (ready_s, step_s, loss, params)."""
    n = len(ready)
    return np.column_stack([ready, [step] * n, loss or [1.0] * n, params or [UNMEASURED] * n])


# -- the rules, torch-free -------------------------------------------------------------------

def test_others_median_is_the_median_of_every_other_rank():
    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 7, 10):
        x = rng.random(n)
        want = [np.median(np.delete(x, i)) for i in range(n)]
        assert np.allclose(others_median(x), want)


def test_a_persistently_slow_rank_is_a_straggler_and_a_noisy_healthy_job_is_not():
    judge = RankJudge()
    rng = np.random.default_rng(1)
    fired = []
    for check in range(1, 8):  # rank 2 spends 60 ms before its forward, the others ~10
        ready = list(0.010 + 0.002 * rng.random(4))
        ready[2] = 0.060
        fired += [(check, a) for a in judge.check(check * 10, table(ready, step=0.075))]
    assert [(c, a.name, a.level, a.ranks) for c, a in fired] == [(5, "straggler", "warn", [2])]
    assert "rank 2 takes 60.0 ms per step before its forward" in fired[0][1].message
    assert fired[0][1].event()["ranks"] == [2] and fired[0][1].value > 4

    healthy = RankJudge()  # jitter of 3x on fast steps, and a one-check hiccup
    for check in range(1, 60):
        ready = list(0.0005 + 0.001 * rng.random(4))
        if check == 30:
            ready[1] = 0.05
        assert healthy.check(check, table(ready, step=0.02)) == []


def test_a_straggler_fires_once_per_incident_and_again_after_it_re_armed():
    judge = RankJudge(RankRules(straggler_persist=2, rearm=3))
    slow, fine = table([0.01, 0.05]), table([0.01, 0.011])
    seq = [slow, slow, slow, fine, fine, slow, slow, fine, fine, fine, slow, slow]
    fired = [i for i, t in enumerate(seq) if judge.check(i, t)]
    assert fired == [1, 11]  # the gap of 2 did not re-arm it; the gap of 3 did
    held = table([np.nan, np.nan], step=np.nan)  # checks of a hold: no step, no information
    assert [judge.check(i, t) for i, t in enumerate([held] * 5 + [slow])] == [[]] * 6


def test_parameters_that_differ_from_the_job_are_critical_at_once():
    judge = RankJudge()
    same = [1234.5678] * 4
    assert judge.check(1, table([0.01] * 4, params=same)) == []
    odd = [1234.5678, 1234.5678, 1234.5678 * (1 + 1e-4), 1234.5678]
    (a,) = judge.check(2, table([0.01] * 4, params=odd))
    assert (a.name, a.level, a.ranks) == ("rank_divergence", "critical", [2])
    assert "relative difference 0.0001 > 1e-06" in a.message
    # rank 0 itself the odd one: the median is the reference, so rank 0 is named
    (a,) = RankJudge().check(1, table([0.01] * 3, params=[2.0, 1.0, 1.0]))
    assert a.ranks == [0]
    # two ranks: rank 0 is the reference; a non-finite replica differs too
    (a,) = RankJudge().check(1, table([0.01] * 2, params=[1.0, float("nan")]))
    assert a.ranks == [1]
    # not measured (no DDP model, or a CUDA copy not landed yet): nothing compared
    assert RankJudge().check(1, table([0.01] * 3, params=[1.0, UNMEASURED, 1.0])) == []
    # float32 sums that differ in the last bits are one model
    assert RankJudge().check(1, table([0.01] * 2, params=[1.0, 1.0 + 1e-8])) == []


def test_a_loss_far_from_the_other_ranks_is_a_warning_after_it_persisted():
    judge = RankJudge()
    rng = np.random.default_rng(2)
    fired = []
    for check in range(1, 7):
        loss = list(0.8 + 0.05 * rng.random(4))
        loss[3] = 2.5
        fired += [(check, a) for a in judge.check(check, table([0.01] * 4, loss=loss))]
    assert [(c, a.name, a.level, a.ranks) for c, a in fired] == [
        (5, "rank_divergence", "warn", [3])]
    assert "rank 3's loss 2.5 vs the median" in fired[0][1].message
    healthy = RankJudge()  # per-batch noise of 30 %, and only two ranks: never an outlier
    for check in range(1, 60):
        loss = list(0.5 * (1 + 0.3 * rng.standard_normal(4)))
        assert healthy.check(check, table([0.01] * 4, loss=loss)) == []
        assert healthy.check(check, table([0.01] * 2, loss=[0.5, 5.0])) == []


def test_rank_rules_refuse_bad_values_and_can_be_turned_off(monkeypatch):
    with pytest.raises(RankRulesError, match="straggler_ratio must be > 1"):
        RankRules(straggler_ratio=1.0)
    with pytest.raises(RankRulesError, match="straggler_persist must be an integer"):
        RankRules(straggler_persist=2.5)
    with pytest.raises(RankRulesError, match=r"unknown rank rule\(s\) \['ratio'\]"):
        rank_rules({"ratio": 2})
    with pytest.raises(RankRulesError, match=r"unknown alert\(s\) \['stragler'\]"):
        RankRules(off=("stragler",))
    off = RankJudge(off=("straggler", "rank_divergence"))
    for i in range(10):
        assert off.check(i, table([0.01, 0.5], params=[1.0, 2.0])) == []
    monkeypatch.setenv("NEUROTOP_NODE_ID", "../evil")
    with pytest.raises(ValueError, match="NEUROTOP_NODE_ID must be 1-32 letters"):
        node_id()
    monkeypatch.setenv("NEUROTOP_NODE_ID", "")
    monkeypatch.setenv("GROUP_RANK", "3")
    assert node_id() == "3"


# -- real jobs under torchrun ----------------------------------------------------------------

def torchrun(tmp_path: Path, nproc: int, *args: str, name: str = "job",
             nodes: tuple[int, int, int] | None = None,
             env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """``ddp_health.py`` under torchrun; ``nodes``: (nnodes, node rank, master port)."""
    out = tmp_path / f"{name}.out"
    where = ["--standalone"] if nodes is None else [
        f"--nnodes={nodes[0]}", f"--node-rank={nodes[1]}", "--master-addr=127.0.0.1",
        f"--master-port={nodes[2]}"]
    argv = [sys.executable, "-m", "torch.distributed.run", *where,
            f"--nproc-per-node={nproc}", "--monitor-interval=1", str(SCRIPT), *args]
    with out.open("wb") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return proc, out


def stop(proc: subprocess.Popen) -> None:
    """Kill torchrun and its ranks (each in a session of its own: this test's runtime
    directory lists their pids)."""
    for pid in [r.pid for r in connfile.live_runs(clean=False)] + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def finish(proc: subprocess.Popen, out: Path, timeout: float = 240) -> str:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"torchrun did not finish:\n{out.read_text()[-3000:]}") from None
    text = out.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    return text


def run_to_end(tmp_path: Path, nproc: int, *args: str) -> tuple[Path, list[list[dict]]]:
    """Run a job to its last step: its run directory and each rank's alert log."""
    proc, out = torchrun(tmp_path, nproc, *args)
    finish(proc, out)
    (run_dir,) = (tmp_path / "runs").iterdir()
    logs = []
    for r in range(nproc):
        p = run_dir / ("alerts.jsonl" if r == 0 else f"alerts-r{r}.jsonl")
        logs.append([json.loads(ln) for ln in p.read_text().splitlines()] if p.exists() else [])
    return run_dir, logs


def recorded_alerts(session: Path) -> list[dict]:
    with SessionReader(session) as r:
        events = [wire.decode(split_frames(rec.body)).header for rec in r.records()
                  if rec.type == MESSAGE and rec.kind == KIND_CODES["event"]]
    return [e for e in events if e.get("event") == "alert"]


RANK_ALERTS = ("straggler", "rank_divergence")
FAST_CHECKS = json.dumps({"control_every": 2, "report_every": 5})


@slow
def test_a_sleeping_rank_2_of_4_is_flagged_as_the_straggler_in_every_rank(tmp_path):
    run_dir, logs = run_to_end(tmp_path, 4, "--steps", "30", "--step-sleep", "0.01",
                               "--slow-rank", "2", "--slow-sleep", "0.08",
                               "--config", FAST_CHECKS)
    for rank, log in enumerate(logs):  # every rank judged the same table: the same alert
        found = [a for a in log if a["alert"] in RANK_ALERTS]
        assert [(a["alert"], a["ranks"], a["rank"]) for a in found] == [
            ("straggler", [2], rank)], (rank, log)
        assert found[0]["step"] == 10  # the 5th check, every 2 steps: the default persistence
        assert "rank 2 takes" in found[0]["message"]
    (rec,) = [a for a in recorded_alerts(run_dir / "session-r3.ntop") if a["alert"] in RANK_ALERTS]
    assert rec["ranks"] == [2] and rec["rule"] == "ranks"  # published, so recorded


@slow
def test_a_healthy_4_rank_job_flags_no_straggler_and_no_divergence(tmp_path):
    run_dir, logs = run_to_end(tmp_path, 4, "--steps", "60", "--step-sleep", "0.01",
                               "--config", FAST_CHECKS)
    for rank, log in enumerate(logs):
        assert not [a for a in log if a["alert"] in RANK_ALERTS], (rank, log)
    assert (run_dir / "session-r3.ntop").is_file()  # it ran, recorded, and said nothing


@slow
def test_a_replica_perturbed_outside_ddp_is_a_critical_rank_divergence(tmp_path):
    _, logs = run_to_end(tmp_path, 3, "--steps", "24", "--step-sleep", "0.01",
                         "--perturb-rank", "1", "--perturb-at", "10", "--config", FAST_CHECKS)
    for rank, log in enumerate(logs):
        found = [a for a in log if a["alert"] in RANK_ALERTS]
        assert [(a["alert"], a["level"], a["ranks"]) for a in found] == [
            ("rank_divergence", "critical", [1])], (rank, log)
        # the first fingerprint after the perturbation (before step 10): every 5th check
        assert 10 <= found[0]["step"] <= 10 + 2 * PARAMS_EVERY
        assert "DDP keeps replicas identical" in found[0]["message"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@slow
def test_two_nodes_connection_file_lists_both_relays_and_a_viewer_of_both_sees_every_rank(
        tmp_path):
    port = free_port()
    args = ("--steps", "100000", "--step-sleep", "0.02", "--config",
            json.dumps({"report_every": 1}))
    # node 0 names itself; node 1 goes by torchrun's node rank (GROUP_RANK=1)
    jobs = [torchrun(tmp_path, 1, *args, name="node0", nodes=(2, 0, port),
                     env={"NEUROTOP_NODE_ID": "head"}),
            torchrun(tmp_path, 1, *args, name="node1", nodes=(2, 1, port))]
    try:
        def both() -> list[connfile.ConnectionInfo] | None:
            for proc, out in jobs:
                assert proc.poll() is None, out.read_text()[-3000:]
            runs = sorted(connfile.live_runs(), key=lambda r: r.rank)
            return runs if len(runs) == 2 else None
        r0, r1 = wait_until(both, timeout=180, interval=0.2, what="the two nodes' ranks")
        assert r0.run_id == r1.run_id and (r0.node, r1.node) == ("head", "1")
        names = [[Path(e.removeprefix("ipc://")).name for e in r.relays] for r in (r0, r1)]
        head, other = f"relay-{r0.run_id}-nhead.sock", f"relay-{r0.run_id}-n1.sock"
        assert names[0] == [head, other]  # the job's file: every node's relay, its own first
        assert names[1] == [other, head]  # node 1's local rank 0: its own first
        with Subscriber(r0.relays[0]) as sub:  # one viewer, one socket on both relays
            for endpoint in r0.relays[1:]:
                sub.sock.connect(endpoint)
            sub.collect(60, until=lambda m: {x.header.get("rank") for x in sub.msgs} == {0, 1})
            ranks = {m.header["rank"]: m.header["node"] for m in sub.msgs}
        assert ranks == {0: "head", 1: "1"}
        c0 = LiveClient(Endpoints(r0.telemetry, r0.job_control, r0.key_bytes)).start()
        try:  # the job's control reaches the other node's rank through the check
            assert c0.command("stop").result(60)["ranks"] == [0, 1]
        finally:
            c0.close()
        for proc, out in jobs:
            assert "STOPPED" in finish(proc, out, 120)
    finally:
        for proc, _ in jobs:
            if proc.poll() is None:
                stop(proc)


@slow
@pytest.mark.skipif(not SSHD.exists(), reason="OpenSSH's sshd is not installed")
def test_attach_over_ssh_watches_the_job_through_the_head_nodes_relay(tmp_path, sshd):  # noqa: F811
    proc, out = torchrun(tmp_path, 2, "--steps", "100000", "--step-sleep", "0.02",
                         "--config", json.dumps({"report_every": 1}))
    try:
        def ranks() -> list[connfile.ConnectionInfo] | None:
            assert proc.poll() is None, out.read_text()[-3000:]
            runs = connfile.live_runs()
            return runs if len(runs) == 2 else None
        wait_until(ranks, timeout=180, interval=0.2, what="2 ranks")
        endpoints = resolve(sshd.url())
        assert endpoints.link is not None and endpoints.link.relay.endswith(".sock")
        c = LiveClient(endpoints).start()
        try:  # one tunnel to the relay: every rank's messages, rank 0's in the store
            wait_until(lambda: c.ranks_seen == {0, 1} and c.store.status.step > 0, timeout=60,
                       what="both ranks through the ssh tunnel to the relay")
            ack = c.command("stop").result(60)  # the job's control, through the same tunnel
            assert ack["ok"] and ack["ranks"] == [0, 1]
        finally:
            c.close()
        assert "STOPPED 1" in finish(proc, out, 120)
    finally:
        if proc.poll() is None:
            stop(proc)
