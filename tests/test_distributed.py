"""One job for N ranks under real ``torchrun`` (gloo, a real DDP model on CPU): one run id,
control that lands on every rank at the same step, a NaN on one rank pausing all of them,
and a killed or hung rank that does not leave the others hanging. The fast tests drive the
controller's side of the check through a one-rank link (what an all-reduce over one rank
returns: its own buffer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from neurotop.config import Config, ConfigError
from neurotop.protocol import connfile, wire
from neurotop.service.controller import Controller, Pending
from neurotop.training.distributed import _env_timeout
from neurotop.tui.data.client import CommandError, Endpoints, LiveClient
from tests.helpers.cli import neurotop
from tests.helpers.package import ROOT
from tests.helpers.telemetry import Subscriber
from tests.helpers.waiting import wait_until

slow = pytest.mark.slow  # starts torchrun and its ranks

SCRIPT = ROOT / "tests" / "scripts" / "ddp_train.py"


class OneRank:
    """The job link of a job of one: the all-reduce of one rank's buffer is that buffer."""

    def __init__(self, rank: int = 0, world_size: int = 1, capacity: int = 512) -> None:
        self.rank, self.world_size, self.capacity = rank, world_size, capacity
        self.checks: list[bytes] = []
        self._sent: tuple[bytes, list[int], int] | None = None

    def start(self, step: int, payload: bytes, flag: bool) -> None:
        assert self._sent is None, "a check started while one is in flight"
        self.checks.append(payload)
        self._sent = payload, [self.rank] if flag else [], step

    @property
    def in_flight(self) -> bool:
        return self._sent is not None

    def finish(self) -> tuple[bytes, list[int], int]:
        sent, self._sent = self._sent, None
        assert sent is not None, "no check in flight"
        return sent


def pending(cmd: str, args: dict | None = None, acks: list | None = None,
            internal: bool = False) -> Pending:
    return Pending(f"id-{cmd}", cmd, args or {}, "test", (acks if acks is not None
                                                         else []).append, internal=internal)


def test_control_every_and_the_job_timeout_refuse_bad_values(monkeypatch):
    with pytest.raises(ConfigError, match="control_every must be an integer >= 1, got 0"):
        Config(control_every=0)
    monkeypatch.setenv("NEUROTOP_JOB_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="NEUROTOP_JOB_TIMEOUT_S must be a number of seconds"):
        _env_timeout()


def test_a_rank_other_than_0_refuses_commands_and_names_rank_0():
    c = Controller(job=OneRank(rank=1, world_size=2))
    c.leader = "tcp://127.0.0.1:5555"
    acks: list[dict] = []
    c.submit(pending("pause", acks=acks))
    assert not acks[0]["ok"] and "rank 0 takes them for the whole job (tcp://127.0.0.1:5555)" \
        in acks[0]["error"]
    c.submit(pending("pause", {"reason": "nan"}, acks, internal=True))  # its own auto-pause
    assert len(acks) == 1 and c.queue.empty()  # held as a flag for the next check


def test_commands_wait_for_the_check_and_what_does_not_fit_waits_for_the_next():
    link = OneRank(capacity=120)
    c = Controller(job=link, control_every=3)
    acks: list[dict] = []
    c.submit(pending("set", {"knob": "x" * 200, "value": 1}, acks))  # never fits
    for n in (1, 2):  # one of these fills a check of 120 bytes
        c.submit(Pending(f"resume-{n}", "resume", {}, "t" * 40, acks.append))
    c.at_boundary(1)
    c.at_boundary(2)
    assert acks == [] and link.checks == []  # not applied on arrival: no check yet
    c.at_boundary(3)  # the check starts: what cannot travel is refused now
    assert link.in_flight and len(acks) == 1
    assert "too large to send to every rank" in acks[0]["error"]
    c.at_boundary(4)  # and what it carried is applied at the next boundary
    assert [a["id"] for a in acks[1:]] == ["resume-1"] and acks[1]["ranks"] == [0]
    assert acks[1]["step"] == 4 and not link.in_flight
    for step in (5, 6, 7):
        c.at_boundary(step)
    assert [a["id"] for a in acks[1:]] == ["resume-1", "resume-2"] and acks[2]["step"] == 7


def test_a_check_in_flight_at_close_is_finished_and_its_commands_refused():
    link = OneRank()
    c = Controller(job=link, control_every=1)
    acks: list[dict] = []
    c.submit(pending("pause", acks=acks))
    c.at_boundary(1)  # started, carrying the pause
    assert link.in_flight and acks == []
    c.close()
    assert not link.in_flight and not c.paused
    assert acks[0]["error"] == "the run has ended"


class Job:
    """``torchrun`` running ``ddp_train.py`` on N ranks, and its ranks' connection files."""

    def __init__(self, proc: subprocess.Popen, out: Path, ranks: list[connfile.ConnectionInfo],
                 log_dir: Path) -> None:
        self.proc, self.out, self.ranks, self.log_dir = proc, out, ranks, log_dir

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def logged(self, rank: int) -> list[dict]:
        """What rank ``rank``'s own step pre-hook wrote: one dict per step started."""
        p = self.log_dir / f"rank{rank}.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.endswith("}")]

    def client(self, rank: int) -> LiveClient:
        info = self.ranks[rank]
        c = LiveClient(Endpoints(info.telemetry, info.control, info.key_bytes)).start()
        wait_until(lambda: c.store.status.step > 0, timeout=60, what=f"rank {rank} training")
        return c


@pytest.fixture
def start_job(tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """``start_job(nproc, *script_args)``; every job still running at the end is stopped."""
    jobs: list[Job] = []

    def start(nproc: int, *args: str) -> Job:
        out = tmp_path / f"torchrun-{len(jobs)}.out"
        log_dir = tmp_path / f"steps-{len(jobs)}"
        # --monitor-interval: torchrun's own check of its workers, which ends the job on a
        # lost rank, comes after neurotop's report of it (torchrun's default is 0.1 s)
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", "--monitor-interval=2", str(SCRIPT),
                "--log-dir", str(log_dir), *args]
        with out.open("wb") as f:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        job = Job(proc, out, [], log_dir)
        jobs.append(job)

        def all_ranks() -> list[connfile.ConnectionInfo] | None:
            assert proc.poll() is None, f"torchrun exited early:\n{job.output()[-3000:]}"
            runs = sorted(connfile.live_runs(), key=lambda r: r.rank)
            return runs if len(runs) == nproc else None
        job.ranks = wait_until(all_ranks, timeout=180, interval=0.2, what=f"{nproc} ranks")
        return job

    yield start
    for job in jobs:  # torchrun starts each rank in a session of its own: kill them too
        for pid in [r.pid for r in job.ranks] + [job.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.proc.wait()


def paused_at(c: LiveClient) -> int | None:
    s = c.store.status
    return s.paused_at if s.state == "paused" else None


def scalar_at(c: LiveClient, name: str, step: int) -> float:
    wait_until(lambda: step in c.store.steps(), timeout=60, what=f"stats of step {step}")
    steps, values = c.store.scalar(name)
    return float(values[list(steps).index(step)])


@slow
def test_one_job_pause_set_resume_and_stop_land_on_every_rank_at_one_step(start_job):
    job = start_job(2, "--step-sleep", "0.02",
                    "--config", json.dumps({"report_every": 1, "control_every": 3}))
    r0, r1 = job.ranks
    # one job: rank 0's run id on every rank, each rank's own endpoints, rank 0's control
    assert r0.run_id == r1.run_id and (r0.rank, r1.rank) == (0, 1)
    assert r0.world_size == r1.world_size == 2 and r1.local_rank == 1
    assert r1.telemetry != r0.telemetry and r1.job_control == r0.job_control == r0.control
    listed = json.loads(neurotop("ls", "--json").stdout)
    assert [r["ranks"] for r in listed if r["run_id"] == r0.run_id] == [[0, 1]]  # one row
    with Subscriber(r1.telemetry) as sub:  # every message names its rank in the job
        h = sub.ready(60).msgs[0].header
    assert (h["run"], h["rank"], h["world_size"], h["local_rank"]) == (r0.run_id, 1, 2, 1)
    assert h["host"] == r0.host

    c0, c1 = job.client(0), job.client(1)
    try:
        with pytest.raises(CommandError, match="rank 1 takes no control commands: rank 0"):
            c1.command("pause").result(30)

        ack = c0.command("pause").result(30)
        held = ack["step"]
        assert ack["ok"] and ack["ranks"] == [0, 1] and held % 3 == 1  # the boundary after a check
        wait_until(lambda: paused_at(c0) == held and paused_at(c1) == held, timeout=30,
                   what="both ranks paused at the acked step")
        time.sleep(0.5)  # held: neither rank starts another step
        assert [job.logged(r)[-1]["step"] for r in (0, 1)] == [held, held]

        assert c0.command("resume").result(30)["ok"]
        wait_until(lambda: min(c0.store.status.step, c1.store.status.step) > held + 3,
                   timeout=60, what="both ranks training again")

        ack = c0.command("set", {"knob": "lr", "value": 0.01}).result(30)
        at = ack["step"]
        assert ack["ok"] and ack["ranks"] == [0, 1] and (ack["old"], ack["new"]) == (0.05, 0.01)
        for rank, c in ((0, c0), (1, c1)):  # the same first step with it, in every rank
            lrs = wait_until(lambda r=rank: (d := {s["step"]: s["lr"] for s in job.logged(r)})
                             and at + 1 in d and d, timeout=30, what=f"rank {rank}'s step log")
            assert (lrs[at], lrs[at + 1]) == (0.05, 0.01), rank
            telemetry = (scalar_at(c, "lr", at), scalar_at(c, "lr", at + 1))  # float32
            assert telemetry == (pytest.approx(0.05), pytest.approx(0.01)), rank
        # gradient statistics are the all-reduced gradient's: the same on every rank
        assert scalar_at(c0, "grad_norm", at) == pytest.approx(scalar_at(c1, "grad_norm", at))

        # snapshot: rank 0 saves the whole (replicated) state; rank 1 acks at the same step
        ack = c0.command("snapshot").result(60)
        assert ack["ok"] and ack["ranks"] == [0, 1] and Path(ack["new"]).is_file()
        theirs = wait_until(lambda: [e for e in c1.store.status.events if e.get("event") == "ack"
                                     and e.get("cmd") == "snapshot"], timeout=30,
                            what="rank 1's snapshot ack")
        assert theirs[0]["step"] == ack["step"] and theirs[0]["saved_by"] == 0

        ack = c0.command("stop").result(30)
        assert ack["ok"] and ack["ranks"] == [0, 1]
    finally:
        c0.close()
        c1.close()
    assert job.proc.wait(60) == 0, job.output()[-3000:]
    stopped = {line for line in job.output().splitlines() if line.startswith("STOPPED")}
    assert stopped == {f"STOPPED 0 {ack['step']}", f"STOPPED 1 {ack['step']}"}
    run_dir = Path(r0.run_dir)
    assert {p.name for p in run_dir.glob("*.ntop")} == {"session.ntop", "session-r1.ntop"}


@slow
def test_a_nan_on_rank_1_pauses_all_four_ranks_at_one_step(start_job):
    job = start_job(4, "--step-sleep", "0.02", "--nan-at", "12", "--nan-rank", "1",
                    "--config", json.dumps({"report_every": 1, "control_every": 2}))
    clients = [job.client(r) for r in range(4)]
    try:
        wait_until(lambda: all(paused_at(c) is not None for c in clients), timeout=90,
                   what="every rank auto-paused")
        steps = {paused_at(c) for c in clients}
        assert len(steps) == 1 and steps.pop() >= 12
        for c in clients:
            assert c.store.status.pause_reason.startswith("auto-pause on rank 1")
        assert "non-finite loss" in clients[1].store.status.pause_reason
        assert clients[0].command("stop").result(30)["ranks"] == [0, 1, 2, 3]
    finally:
        for c in clients:
            c.close()
    assert job.proc.wait(60) == 0, job.output()[-3000:]


def job_lost_after(job, c0, sig: int, seconds: float) -> tuple[int, list[dict], float]:
    """Pause the job, send ``sig`` to rank 1, and collect rank 0's ``job_lost`` events:
    (the paused step, the events, seconds from the signal to the first)."""
    held = c0.command("pause").result(30)["step"]
    wait_until(lambda: paused_at(c0) == held, timeout=30, what="rank 0 paused")
    with Subscriber(job.ranks[0].telemetry) as sub:
        sub.ready(30)
        os.kill(job.ranks[1].pid, sig)
        t0 = time.monotonic()
        lost = sub.collect(seconds, until=lambda m: m.kind == wire.EVENT
                           and m.header.get("event") == "job_lost")
    waited = time.monotonic() - t0
    return held, [m.header for m in lost if m.header.get("event") == "job_lost"], waited


@slow
def test_a_killed_rank_is_reported_and_the_others_do_not_hang(start_job):
    job = start_job(2, "--step-sleep", "0.02", "--config", json.dumps({"control_every": 1}))
    c0 = job.client(0)
    try:
        held, events, _ = job_lost_after(job, c0, signal.SIGKILL, 30)
        assert events and events[0]["step"] == held, "rank 0 did not report the lost rank"
        assert "rank 0 of 2 lost the job" in events[0]["error"]
    finally:
        c0.close()
    assert job.proc.wait(60) != 0  # torchrun ends the job, and says it failed
    assert "lost the job" in job.output()


@slow
def test_the_ddp_demo_runs_one_job_on_the_ranks_asked_for(tmp_path):
    out = neurotop("demo", "--name", "ddp", "--no-ui", "--nproc", "2", "--steps", "15",
                   "--step-sleep", "0", timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "2 ranks" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert {p.name for p in run_dir.glob("*.ntop")} == {"session.ntop", "session-r1.ntop"}


@slow
def test_a_hung_rank_is_reported_after_the_job_timeout(start_job, monkeypatch):
    monkeypatch.setenv("NEUROTOP_JOB_TIMEOUT_S", "5")
    job = start_job(2, "--step-sleep", "0.02", "--config", json.dumps({"control_every": 1}))
    c0 = job.client(0)
    try:  # SIGSTOP: alive, but never joins the check
        _, events, waited = job_lost_after(job, c0, signal.SIGSTOP, 60)
        assert events and "hung for over 5 s" in events[0]["error"]
        assert 4 < waited < 40
    finally:
        c0.close()


def test_an_auto_pause_flag_pauses_at_the_check_and_the_hold_keeps_checking():
    link = OneRank()
    c = Controller(job=link, control_every=2)
    acks: list[dict] = []
    c.submit(pending("pause", {"reason": "auto-pause: non-finite loss"}, acks, internal=True))
    c.at_boundary(1)
    c.at_boundary(2)  # the check carrying the flag starts
    assert not c.paused  # the flag waits for the check
    resume = threading.Timer(0.5, lambda: c.submit(pending("resume", acks=acks)))
    resume.start()
    c.at_boundary(3)  # paused here, held until the resume came through a check
    resume.join()
    pause, resumed = acks
    assert pause["step"] == resumed["step"] == 3 and resumed["new"] == "running"
    assert pause["pause_reason"] == "auto-pause on rank 0: non-finite loss"
    assert len(link.checks) > 3  # the hold checked again and again, every HOLD_S
