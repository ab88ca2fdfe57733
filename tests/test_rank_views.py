"""The UI of a distributed job: the rank selector (``r``), the all-ranks view (``R``) and
the status bar's job, driven with Pilot over a real 4-rank ``torchrun`` recording (gloo,
CPU, a real DDP model; recorded once for the module) whose session files the tests also
read on their own; snapshots of the all-ranks view over a seeded 4-rank recording; and a
live 2-rank job attached through its node relay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neurotop.protocol import connfile, runs, wire
from neurotop.protocol.sessionfile import MESSAGE, SessionReader, SessionWriter, split_frames
from neurotop.tui.data.client import Endpoints
from neurotop.tui.data.ranks import JobClient, Ranks, ReplayRanks, across, align, job_text
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.data.store import RunStore
from neurotop.tui.data.targets import resolve
from neurotop.tui.screens.app import NeurotopApp
from neurotop.tui.screens.ranks_view import RanksPane, fmt_ms
from neurotop.tui.screens.replay_app import ReplayApp
from neurotop.tui.screens.widgets import LayerTable, fmt
from tests.helpers.package import ROOT
from tests.helpers.pilot import status_text, until
from tests.helpers.sessions import write_run
from tests.helpers.waiting import wait_until

SCRIPT = ROOT / "tests" / "scripts" / "ddp_train.py"
STEPS = 30


def torchrun(nproc: int, where: Path, *args: str, env: dict | None = None,
             out: Path | None = None) -> subprocess.Popen:
    """``ddp_train.py`` on ``nproc`` gloo ranks under real ``torchrun`` (its default
    ``--monitor-interval``, 0.1 s: the job ends as soon as its ranks have)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", str(SCRIPT), *args]
    log = (out or where / "torchrun.out").open("wb")
    return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)


@pytest.fixture(scope="session")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-rank job's run directory (every rank reporting every step), recorded once."""
    where = tmp_path_factory.mktemp("job4")
    env = {**os.environ, "NEUROTOP_RUNTIME_DIR": str(where / "runtime"),
           "NEUROTOP_RUNS_DIR": str(where / "runs"),
           "NEUROTOP_SESSIONS_DIR": str(where / "sessions")}
    proc = torchrun(4, where, "--steps", str(STEPS), "--config",
                    json.dumps({"report_every": 1}), env=env)
    try:
        rc = proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, (where / "torchrun.out").read_text(errors="replace")[-3000:]
    (run_dir,) = (where / "runs").iterdir()
    assert sorted(p.name for p in run_dir.glob("*.ntop")) == [
        "session-r1.ntop", "session-r2.ntop", "session-r3.ntop", "session.ntop"]
    return run_dir


def recorded(path: Path) -> tuple[dict, np.ndarray, dict[int, np.ndarray]]:
    """Read on its own (not through the UI's loader): a rank's schema, its last stats
    block, and every report's scalars by step."""
    schema, block, scalars = {}, None, {}
    with SessionReader(path) as r:
        for rec in r.records():
            if rec.type != MESSAGE:
                continue
            m = wire.decode(list(split_frames(rec.body)))
            if m.kind == "schema":
                schema = m.header
            elif m.kind == "stats":
                block = m.arrays[0]
                scalars[m.header["step"]] = m.arrays[1]
    assert block is not None
    return schema, block, scalars


def open_job(run_dir: Path) -> tuple[ReplayApp, ReplaySource, ReplayRanks]:
    """What ``neurotop replay RUN_DIR`` opens: rank 0's source, the others beside it."""
    source = ReplaySource(runs.find_session(str(run_dir))).start()
    ranks = ReplayRanks.beside(source)
    assert ranks is not None
    return ReplayApp(source, ranks=ranks), source, ranks


def row_values(table: LayerTable) -> list[list[str]]:
    """The statistics cells of every row as drawn (after the name and the type)."""
    k = len(table.column_names()) - 2  # not the layer, not the trend
    rows = []
    for r in range(table.row_count):
        cells = "".join(s.text for s in table.render_line(r + 1 - table.scroll_offset.y))
        rows.append(cells.split()[2:2 + k])
    return rows


def expected_cells(table: LayerTable, schema: dict, block: np.ndarray) -> list[list[str]]:
    cols = table.column_names()[1:-1]
    return [[fmt(float(block[i, schema["stats"].index(c)])) for c in cols]
            for i in range(len(schema["layers"]))]


#: The tests that replay the recorded 4-rank job run on one xdist worker: recorded once.
JOB4 = "rank_views_job4"


@pytest.mark.slow
@pytest.mark.xdist_group(JOB4)
async def test_r_cycles_the_ranks_and_the_layers_table_shows_each_ranks_values(job_dir):
    files = runs.rank_sessions(job_dir / "session.ntop")
    mine = {r: recorded(p) for r, p in files.items()}
    app, source, ranks = open_job(job_dir)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: all(s.store.status.step == STEPS
                                           for s in ranks.sources.values()),
                        what="every rank's recording")
            await pilot.press("2")
            table = app.query_one(LayerTable)
            await until(pilot, lambda: table.row_count == 3, what="the layer rows")
            seen = []
            for rank in (0, 1, 2, 3, 0):
                schema, block, _ = mine[rank]
                want = expected_cells(table, schema, block)
                await until(pilot, lambda w=want: row_values(table) == w,
                            what=f"rank {rank}'s recorded values")
                assert f"4 ranks, 1 node · rank {rank}" in status_text(app)
                seen.append(row_values(table))
                await pilot.press("r")
            assert seen[0] == seen[4] and seen[0] != seen[1] != seen[2] != seen[3]
    finally:
        ranks.close()
        source.close()


@pytest.mark.slow
@pytest.mark.xdist_group(JOB4)
async def test_the_all_ranks_view_is_numpy_over_the_four_recordings(job_dir):
    files = runs.rank_sessions(job_dir / "session.ntop")
    mine = {r: recorded(p) for r, p in files.items()}
    schema = mine[0][0]
    stack = np.stack([mine[r][1] for r in range(4)]).astype(np.float64)  # ranks x layers x stats
    app, source, ranks = open_job(job_dir)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: all(s.store.status.step == STEPS
                                           for s in ranks.sources.values()),
                        what="every rank's recording")
            await pilot.press("R")
            await until(pilot, lambda: app.screen_name == "ranks"
                        and "4 ranks, 1 node · all ranks" in status_text(app),
                        what="the all-ranks view")
            while app.view.stat != "mean":
                await pilot.press("s")
            j = schema["stats"].index("mean")
            v = stack[:, :, j]
            sp = ranks.spread("mean")
            assert sp.ranks == (0, 1, 2, 3) and list(sp.steps) == [STEPS] * 4
            np.testing.assert_array_equal(sp.lo, v.min(0))
            np.testing.assert_array_equal(sp.median, np.median(v, 0))
            np.testing.assert_array_equal(sp.hi, v.max(0))
            np.testing.assert_array_equal(sp.lo_rank, v.argmin(0))
            np.testing.assert_array_equal(sp.hi_rank, v.argmax(0))
            table = app.query_one("#ranks-table")
            want = [" ".join([name, fmt(v[:, i].min()), f"r{v[:, i].argmin()}",
                              fmt(float(np.median(v[:, i]))), fmt(v[:, i].max()),
                              f"r{v[:, i].argmax()}", fmt(v[:, i].max() - v[:, i].min())])
                    for i, name in enumerate(schema["layers"])]
            await until(pilot, lambda: [" ".join(line.split())
                                        for line in table.text.splitlines()[1:]] == want,
                        what="the spread table of mean")
            # Step time: each rank's own ``ready_ms`` (the agent's straggler signal) per
            # report, its median; a recording without it: 1000 / steps_per_s.
            ready = "ready_ms" in schema["scalars"]
            k = schema["scalars"].index("ready_ms" if ready else "steps_per_s")
            heat = app.query_one("#ranks-heat").text.splitlines()
            for r in range(4):
                v = np.array([s[k] for s in mine[r][2].values()], np.float64)
                ms = v[np.isfinite(v)] if ready else 1000 / v[v > 0]
                line = next(x for x in heat if x.startswith(f"r{r} "))
                assert line.split()[1] == fmt_ms(float(np.median(ms))), (r, line)
            st = ranks.step_times()
            assert st.ranks == (0, 1, 2, 3) and list(st.steps) == list(range(1, STEPS + 1))
            await pilot.press("R")  # back where it came from
            await until(pilot, lambda: app.screen_name == "overview"
                        and "4 ranks, 1 node · rank 0" in status_text(app), what="back")
    finally:
        ranks.close()
        source.close()


def test_across_and_align_leave_out_what_a_rank_lacks():
    v = np.array([[1.0, np.nan, 5.0], [3.0, np.nan, np.inf], [2.0, np.nan, -1.0]])
    lo, med, hi, lo_r, hi_r = across(v, [4, 7, 9])
    np.testing.assert_array_equal(lo, [1.0, np.nan, -1.0])
    np.testing.assert_array_equal(med, [2.0, np.nan, 5.0])
    np.testing.assert_array_equal(hi, [3.0, np.nan, np.inf])
    assert lo_r.tolist() == [4, -1, 9] and hi_r.tolist() == [7, -1, 7]
    steps, out = align({0: (np.array([1, 2, 3]), np.array([1.0, 2, 3])),
                        1: (np.array([2, 4]), np.array([20.0, 40]))})
    assert steps.tolist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(out, [[1, 2, 3, np.nan], [np.nan, 20, np.nan, 40]])


def test_the_job_is_its_world_size_and_its_nodes_by_host_and_node_id():
    two_hosts = Ranks()
    for r in range(8):
        two_hosts.note({"rank": r, "world_size": 8, "host": "a" if r < 4 else "b"})
    assert two_hosts.describe() == "8 ranks, 2 nodes"
    one_host = Ranks()  # two torchruns on one host: two node ids, two relays
    for r in range(4):
        one_host.note({"rank": r, "world_size": 4, "host": "h", "node": str(r // 2)})
    assert one_host.describe() == "4 ranks, 2 nodes"
    assert Ranks().describe() == "" and not Ranks().is_job and job_text(1, 1) == "1 rank, 1 node"


def test_a_relays_messages_go_each_to_its_ranks_store_and_a_bad_rank_is_refused():
    client = JobClient(Endpoints(telemetry="ipc:///nonexistent", rank=0))  # not started
    for r in (0, 1, 2):
        h = {"run": "job", "rank": r, "world_size": 3, "local_rank": r, "host": "h"}
        client._on_telemetry(wire.encode({"kind": "schema", **h, "layers": ["a"],
                                          "stats": ["mean"], "scalars": ["loss"]}))
        client._on_telemetry(wire.encode({"kind": "stats", **h, "step": 7}, (
            np.full((1, 1), r, np.float32), np.array([10.0 + r], np.float32))))
    stores = client.ranks.stores
    assert list(stores) == [0, 1, 2] and stores[0] is client.store
    assert [float(s.latest_block()[0, 0]) for s in stores.values()] == [0.0, 1.0, 2.0]
    assert client.ranks.describe() == "3 ranks, 1 node" and client.ranks_seen == {0, 1, 2}
    client._on_telemetry(wire.encode({"kind": "stats", "rank": "two", "step": 8}))
    assert client.store.status.bad_messages == 1
    assert client.store.status.last_error == "telemetry of rank 'two': not a rank (0 to 1048576)"
    assert client.ranks.spread("mean").hi_rank.tolist() == [2]


def test_a_rank_whose_messages_stopped_is_silent():
    ranks = Ranks({0: RunStore(), 1: RunStore()})
    for r, ago in ((0, 0.1), (1, RunStore.STALE_AFTER_S + 1)):  # rank 1: none for a while
        ranks.stores[r].ingest(wire.Message({"kind": "heartbeat", "rank": r, "world_size": 2,
                                             "step": 5, "state": "running"}))
        ranks.stores[r].status.last_message = time.time() - ago
    assert ranks.silent() == [1] and ranks.describe() == "2 ranks, 1 node"


async def test_a_single_process_run_says_it_is_not_a_job(tmp_path):
    path = tmp_path / "one.ntop"
    write_run(path, 40)
    source = ReplaySource(path).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.store.status.step == 40, what="the recording")
            before = status_text(app)
            await pilot.press("r")
            await until(pilot, lambda: "not a distributed job" in status_text(app),
                        what="the word in the status line")
            assert app.frame.status.rank == 0 and "ranks" not in status_text(app)
            assert app.screen_name == "overview"
            await pilot.press("R")  # no ranks: R reverses the layers' order, as it did
            await until(pilot, lambda: app.screen_name == "layers", what="the layers")
            assert not app.view.descending
            app.note = ""
            app.redraw(force=True)
            await until(pilot, lambda: status_text(app).split("steps/s")[0]
                        == before.split("steps/s")[0], what="the status line as before")
    finally:
        source.close()


# -- snapshots: a seeded 4-rank recording (fixed times, rank 2 slow from step 30) ----------

T0 = 1_700_000_000.0
SNAP_STATS = ["mean", "std", "max_abs", "dead_frac"]
SNAP_SCALARS = ["loss", "grad_norm", "lr", "steps_per_s"]
SYSTEM = {"cpu_pct": 50.0, "host_cpu_pct": 60.0, "cpus": 2, "rss": 300 << 20,
          "mem_total": 16 << 30, "mem_available": 8 << 30, "gpus": [],
          "no_gpu": "no pynvml (pip install 'neurotop[gpu]' for GPU metrics)"}


def write_job(run_dir: Path, world: int = 4, steps: int = 60, layers: int = 6) -> None:
    """One session file per rank, as a job records them: rank, world size and host in
    every message; activations differ per rank (each its own data), rank 2 slows down."""
    run_dir.mkdir(parents=True)
    for rank in range(world):
        name = "session.ntop" if rank == 0 else f"session-r{rank}.ntop"
        write_rank(run_dir / name, rank, world, steps, layers)


def write_rank(path: Path, rank: int, world: int, steps: int, layers: int) -> None:
    names = [f"net.{i}" for i in range(layers)]
    types = ["Linear", "ReLU"] * (layers // 2)
    rng = np.random.default_rng(100 + rank)
    w = SessionWriter(path, {"run_id": "job-test", "name": "ddp", "start_time": T0,
                             "host": "node-a", "rank": rank, "world_size": world,
                             "local_rank": rank})
    seq = 0

    def put(h: dict, arrays: tuple = (), *, step: int, t: float) -> None:
        nonlocal seq
        h.update(run="job-test", rank=rank, world_size=world, local_rank=rank,
                 host="node-a", seq=seq, t=t)
        seq += 1
        w.write_message(wire.encode(h, arrays), kind=h["kind"], step=step, t=t)

    for s in range(1, steps + 1):
        t = T0 + s / 20
        if s == 1 or s % 25 == 0:
            put({"kind": "schema", "schema_id": 1, "run_name": "ddp", "layers": names,
                 "layer_types": types, "stats": SNAP_STATS, "scalars": SNAP_SCALARS},
                step=-1, t=t)
        block = np.abs(rng.normal(0.5, 0.1, (layers, len(SNAP_STATS)))).astype(np.float32)
        block[:, 3] = 0.05 + 0.01 * rank
        rate = 20.0 if rank != 2 or s < 30 else 8.0
        vec = np.array([2.0 * np.exp(-s / 30), 1.5, 0.05, rate], np.float32)
        put({"kind": "stats", "step": s, "wall": t, "schema_id": 1, "dropped": 0},
            (block, vec), step=s, t=t)
        if s % 5 == 0:
            put({"kind": "heartbeat", "step": s, "state": "running", "paused_at": None,
                 "steps_per_s": rate, "dropped": 0, "rec_dropped": 0, "system": SYSTEM,
                 "control": "tcp://127.0.0.1:1"}, step=s, t=t)
        if rank == 0 and s == 45:
            put({"kind": "event", "event": "alert", "alert": "straggler", "level": "warn",
                 "rank": 2, "message": "rank 2's steps take 2.5x the median of the"
                 " ranks' over the last 3 checks", "step": s}, step=s, t=t)
    w.close({"dropped": 0}, t=T0 + steps / 20)


@pytest.fixture(scope="module")
def seeded_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("seeded") / "job-test"
    write_job(run_dir)
    return run_dir


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
def test_all_ranks_view_snapshot(snap_compare, seeded_job, utc, size):
    app, source, ranks = open_job(seeded_job)

    async def loaded(pilot) -> None:
        await until(pilot, lambda: all(s.store.status.step == 60
                                       for s in ranks.sources.values()), what="every rank")
        await pilot.press("R")
        await until(pilot, lambda: app.screen_name == "ranks", what="the all-ranks view")
        while app.view.stat != "mean":
            await pilot.press("s")
        await until(pilot, lambda: "r2" in app.query_one(RanksPane).query_one(
            "#ranks-heat").text, what="the step-time strip")

    try:
        assert snap_compare(app, terminal_size=size, run_before=loaded)
    finally:
        ranks.close()
        source.close()


async def test_a_job_alert_shows_in_the_feed_and_the_slow_rank_in_the_strip(seeded_job):
    app, source, ranks = open_job(seeded_job)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: all(s.store.status.step == 60
                                           for s in ranks.sources.values()), what="every rank")
            feed = app.query_one("#alerts")
            await until(pilot, lambda: "straggler" in feed.text, what="the straggler alert")
            await pilot.press("R")
            await until(pilot, lambda: app.screen_name == "ranks", what="the all-ranks view")
            heat = app.query_one("#ranks-heat").text.splitlines()
            medians = {x.split()[0]: x.split()[1] for x in heat if x.startswith("r")}
            assert medians == {"r0": "50", "r1": "50", "r2": "125", "r3": "50"}
    finally:
        ranks.close()
        source.close()


# -- live: a 2-rank job through its node relay ----------------------------------------------

@pytest.mark.slow
async def test_attached_to_a_live_two_rank_job_through_its_relay(tmp_path):
    proc = torchrun(2, tmp_path, "--step-sleep", "0.02", "--config",
                    json.dumps({"report_every": 1}))
    client = None
    try:
        def both() -> list | None:
            assert proc.poll() is None, (tmp_path / "torchrun.out").read_text()[-3000:]
            live = connfile.live_runs()
            return live if len(live) == 2 and all(r.relays or r.rank for r in live) else None
        wait_until(both, timeout=180, interval=0.2, what="2 ranks")
        endpoints = resolve(None)
        assert endpoints.rank == 0 and endpoints.telemetry.startswith("ipc://")  # the relay
        client = JobClient(endpoints).start()
        app = NeurotopApp(client)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: "2 ranks, 1 node · rank 0" in status_text(app),
                        timeout=60, what="the job in the status bar")
            await until(pilot, lambda: all(s.status.step > 0 for s in
                                           client.ranks.stores.values())
                        and len(client.ranks.stores) == 2, timeout=60, what="both ranks")
            await pilot.press("r")
            await until(pilot, lambda: "2 ranks, 1 node · rank 1" in status_text(app)
                        and app.frame.status.rank == 1 and app.frame.latest is not None,
                        what="rank 1's data")
        client.command("stop").result(30)
        assert proc.wait(60) == 0
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:  # torchrun starts each rank in a session of its own
            for pid in [r.pid for r in connfile.live_runs()] + [proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
