"""The last gaps between a job's agents and the UI: every rank's own ready time as a report
scalar (``ready_ms``) that the all-ranks view's strip shows (under DDP the step times are
equal, the ready times are not); a viewer subscribed to every node relay reachable from this
host; ``neurotop ls`` counting nodes by (host, node id). Real ``torchrun`` jobs (gloo, CPU,
a real DDP model, ``tests/scripts/ddp_health.py``): 4 ranks with rank 2 sleeping before its
forward, recorded and replayed with Pilot; and two torchruns as two "nodes" on this host,
attached live."""

from __future__ import annotations

import csv
import dataclasses
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from neurotop.protocol import connfile, runs, wire
from neurotop.protocol.sessionfile import MESSAGE, SessionReader, split_frames
from neurotop.tui import cli
from neurotop.tui.data.ranks import JobClient, Ranks, ReplayRanks, StepTimes
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.data.targets import reachable, resolve
from neurotop.tui.screens.app import NeurotopApp
from neurotop.tui.screens.replay_app import ReplayApp
from tests.helpers.pilot import status_text, until
from tests.helpers.waiting import wait_until
from tests.test_distributed_health import finish, free_port, stop, torchrun

slow = pytest.mark.slow  # starts torchrun and its ranks


def ready_by_step(path: Path) -> dict[int, float]:
    """A rank's recorded ``ready_ms`` per report, read on its own (not by the UI's loader)."""
    names: list[str] = []
    out = {}
    with SessionReader(path) as r:
        for rec in r.records():
            if rec.type != MESSAGE:
                continue
            m = wire.decode(list(split_frames(rec.body)))
            if m.kind == "schema":
                names = m.header["scalars"]
            elif m.kind == "stats" and "ready_ms" in names:
                out[m.header["step"]] = float(m.arrays[1][names.index("ready_ms")])
    return out


def strip_medians(text: str) -> dict[str, float]:
    """The strip's per-rank lines as drawn: ``r2  90.1 ▆▆▆``."""
    return {x.split()[0]: float(x.split()[1]) for x in text.splitlines()
            if x.startswith("r") and not x.startswith("ready")}


# -- 1. ready_ms: published, recorded, exported, and what the strip shows ---------------------

@slow
async def test_rank_2_sleeping_before_its_forward_has_the_longest_ready_ms_in_the_strip(
        tmp_path):
    proc, out = torchrun(tmp_path, 4, "--steps", "24", "--step-sleep", "0.01",
                         "--slow-rank", "2", "--slow-sleep", "0.06",
                         "--config", json.dumps({"report_every": 2}))
    finish(proc, out)
    (run_dir,) = (tmp_path / "runs").iterdir()
    files = runs.rank_sessions(run_dir / runs.SESSION_FILE)
    assert sorted(files) == [0, 1, 2, 3]
    recorded = {r: ready_by_step(p) for r, p in files.items()}
    for r, by_step in recorded.items():  # every report of every rank
        assert sorted(by_step) == list(range(1, 24, 2)), (r, by_step)
        assert np.isnan(by_step[1]), by_step  # step 1: no boundary before its forward
        assert all(np.isfinite(v) and v > 0 for s, v in by_step.items() if s > 1), (r, by_step)
    med = {r: float(np.nanmedian(list(v.values()))) for r, v in recorded.items()}
    assert med[2] > 50, med  # it sleeps 70 ms between its optimizer step and its forward
    assert all(10 <= med[r] < 35 for r in (0, 1, 3)), med  # 10 ms sleep, and the wait
    # exported like every other scalar: the job's scalars table has a column of it
    cli.main(["export", str(run_dir / runs.SESSION_FILE), "--csv", str(tmp_path / "csv")])
    (table,) = (tmp_path / "csv").glob("scalars*.csv")
    with table.open() as f:
        rows = list(csv.DictReader(f))
    exported = {(int(row["rank"]), int(row["step"])): float(row["ready_ms"]) for row in rows}
    assert exported[(2, 11)] == pytest.approx(recorded[2][11], rel=1e-6)

    source = ReplaySource(files[0]).start()
    ranks = ReplayRanks.beside(source)
    assert ranks is not None
    app = ReplayApp(source, ranks=ranks)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: all(s.store.status.step >= 23
                                           for s in ranks.sources.values()), what="every rank")
            assert ranks.step_times().source == "ready_ms"
            await pilot.press("R")
            await until(pilot, lambda: app.screen_name == "ranks", what="the all-ranks view")
            await until(pilot, lambda: "longest: r2" in app.query_one("#ranks-heat").text,
                        what="the strip naming rank 2")
            text = app.query_one("#ranks-heat").text
            head = text.splitlines()[0]
            assert head.startswith("ready ms  longest: r2 (")
            assert "time before each forward; a straggler's is longer" in head
            shown = strip_medians(text)
            assert set(shown) == {"r0", "r1", "r2", "r3"}
            assert max(shown, key=shown.get) == "r2"
            assert shown["r2"] > 2 * max(shown[r] for r in ("r0", "r1", "r3")), shown
            # the strip's medians are the recorded figures' (3 significant digits)
            assert shown["r2"] == pytest.approx(med[2], rel=0.01)
    finally:
        ranks.close()
        source.close()


def test_the_longest_rank_is_named_only_when_it_stands_out():
    rng = np.random.default_rng(0)
    jitter = 10 + 3 * rng.random((4, 50))  # a healthy job: 30 % jitter, no rank named
    st = StepTimes(ranks=(0, 1, 2, 3), steps=np.arange(50), ms=jitter, source="ready_ms")
    assert st.longest() is None
    slow = jitter.copy()
    slow[2] += 60
    rank, ratio = StepTimes((0, 1, 2, 3), np.arange(50), slow, "ready_ms").longest()
    assert rank == 2 and 5 < ratio < 7.5
    spike = jitter.copy()
    spike[1, 10] = 500  # one hiccup: the median does not move
    assert StepTimes((0, 1, 2, 3), np.arange(50), spike).longest() is None
    one = np.full((2, 5), np.nan)
    one[0] = 10
    assert StepTimes((0, 1), np.arange(5), one).longest() is None  # one rank: no others
    assert StepTimes((), np.arange(0), np.empty((0, 0))).longest() is None


# -- 2 and 3. two torchruns, two "nodes" on one host: one viewer of both, and ls ---------------

@slow
async def test_a_viewer_subscribes_to_both_nodes_relays_and_ls_counts_two_nodes(
        tmp_path, capsys):
    port = free_port()
    args = ("--steps", "100000", "--step-sleep", "0.02", "--config",
            json.dumps({"report_every": 1}))
    jobs = [torchrun(tmp_path, 1, *args, name="node0", nodes=(2, 0, port),
                     env={"NEUROTOP_NODE_ID": "head"}),
            torchrun(tmp_path, 1, *args, name="node1", nodes=(2, 1, port))]
    client = None
    try:
        def both() -> list[connfile.ConnectionInfo] | None:
            for proc, out in jobs:
                assert proc.poll() is None, out.read_text()[-3000:]
            live = sorted(connfile.live_runs(), key=lambda r: r.rank)
            ok = len(live) == 2 and len(live[0].relays) == 2 and all(
                Path(e.removeprefix("ipc://")).is_socket() for e in live[0].relays)
            return live if ok else None
        r0, r1 = wait_until(both, timeout=180, interval=0.2, what="both nodes' relays")

        # 3. ls: one job, two nodes (one host, two node ids)
        host = socket.gethostname()
        (row,) = cli.job_rows(connfile.live_runs())
        assert row["ranks"] == [0, 1] and row["nodes"] == sorted([f"{host}/head", f"{host}/1"])
        capsys.readouterr()
        cli.main(["ls"])
        assert "(job: 2 ranks, 2 nodes)" in capsys.readouterr().out

        # 2. the job's target: its own relay, and the other node's (reachable here)
        endpoints = resolve(None)
        assert endpoints.telemetry == r0.relays[0] and endpoints.more == r0.relays[1:]
        assert endpoints.relays == 2 and endpoints.rank == 0
        # a relay on another host (its socket is not here) is left out
        assert reachable([*r0.relays, "ipc:///nonexistent/relay-x-n9.sock"]) == r0.relays
        client = JobClient(endpoints).start()
        app = NeurotopApp(client)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: "2 ranks, 2 nodes · rank 0" in status_text(app),
                        timeout=60, what="the job in the status bar")
            await until(pilot, lambda: len(client.ranks.stores) == 2 and all(
                s.status.step > 0 for s in client.ranks.stores.values()), timeout=60,
                what="both nodes' ranks")
            await pilot.press("r")
            await until(pilot, lambda: "2 ranks, 2 nodes · rank 1" in status_text(app)
                        and app.frame.status.rank == 1 and app.frame.latest is not None,
                        what="rank 1's data, through node 1's relay")
            await pilot.press("R")
            await until(pilot, lambda: app.screen_name == "ranks", what="the all-ranks view")
            await until(pilot, lambda: {"r0", "r1"} <= set(strip_medians(
                app.query_one("#ranks-heat").text)), timeout=30, what="both ranks' strip")
            heat = app.query_one("#ranks-heat").text
            assert heat.startswith("ready ms: time before each forward")
            assert "longest" not in heat  # a healthy job: no rank named
        # a viewer that reaches the head node's relay only says how much it sees
        half = JobClient(dataclasses.replace(endpoints, more=[])).start()
        try:
            wait_until(lambda: half.ranks.is_job and half.store.status.step > 0, timeout=60,
                       what="rank 0 through the head relay")
            assert half.ranks.describe() == (
                "2 ranks, 2 nodes (1 of 2 reporting: 1 of 2 nodes reachable)")
            assert list(half.ranks.stores) == [0]
        finally:
            half.close()
        assert client.command("stop").result(60)["ranks"] == [0, 1]
        for proc, out in jobs:
            assert "STOPPED" in finish(proc, out, 120)
    finally:
        if client is not None:
            client.close()
        for proc, _ in jobs:
            if proc.poll() is None:
                stop(proc)


def test_the_status_says_every_node_when_every_relay_is_reached():
    ranks = Ranks()
    for r in range(4):
        ranks.store_for(r)
        ranks.note({"rank": r, "world_size": 4, "host": "a", "node": str(r // 2)})
    ranks.reach = (2, 2)
    assert ranks.describe() == "4 ranks, 2 nodes"
    ranks.reach = None  # a recording, or a client without relays
    assert ranks.describe() == "4 ranks, 2 nodes"
