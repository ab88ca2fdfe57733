"""The agent in a real training process, read over real ZeroMQ sockets."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from neurotop.config import Config
from neurotop.protocol import connfile, wire
from neurotop.tui.data.client import CommandError, Endpoints, LiveClient
from tests.helpers import numpy_reference as ref
from tests.helpers.telemetry import Subscriber, next_heartbeat
from tests.helpers.training import watch_options
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow  # starts training processes


def test_schema_and_stat_blocks_match_numpy(start_run, tmp_path):
    dump = tmp_path / "dump"
    run = start_run("--steps", "120", "--step-sleep", "0.03", "--dump", str(dump), held=True)
    with Subscriber(run.info.telemetry).ready() as sub:
        run.go()  # subscribed first: every step's report arrives
        msgs = sub.collect(60, until_step=40)
    schemas = [m for m in msgs if m.kind == wire.SCHEMA]
    stats = {m.header["step"]: m for m in msgs if m.kind == wire.STATS}
    assert schemas, "no schema message received"
    schema = schemas[0].header
    assert schema["layers"] == ["0", "1", "2", "3", "4"]
    assert schema["stats"] == list(Config().stats)
    assert schema["scalars"][:2] == ["loss", "grad_norm"] and "lr" in schema["scalars"]
    assert set(range(1, 41)) <= set(stats), "a step's report was not received"
    cfg = Config()
    window: dict[str, list[np.ndarray]] = {n: [] for n in schema["layers"]}
    for step in range(1, 31):
        d = np.load(dump / f"step{step}.npz")
        for n in window:
            window[n] = (window[n] + [d[f"out:{n}"].max(axis=0)])[-cfg.dead_window:]
        block, scalars = stats[step].arrays
        # Default settings: these activations are smaller than the sample, so all is exact.
        expected = np.array([[ref.layer_stats(d[f"out:{n}"], d[f"grad:{n}"], sample=cfg.sample,
                                              eps=cfg.eps,
                                              units_max_window=np.max(window[n], axis=0))[s]
                              for s in schema["stats"]] for n in schema["layers"]])
        np.testing.assert_allclose(block, expected, rtol=1e-4, atol=1e-5,
                                   err_msg=f"step {step}")
        sc = dict(zip(schema["scalars"], scalars, strict=True))
        grad_norm = np.sqrt(sum(np.sum(d[f"pgrad:{p}"].astype(np.float64) ** 2)
                                for p in schema["params"]))
        assert sc["loss"] == pytest.approx(float(d["loss"]), rel=1e-5)
        assert sc["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
        assert sc["lr"] == pytest.approx(0.05)
    # The planted dead units show: 5 of 32 ReLU units are never positive.
    assert stats[max(stats)].arrays[0][1, schema["stats"].index("dead_frac")] == 5 / 32
    # Sequence numbers are per sender and increase by one: no gaps on loopback.
    seqs = [m.header["seq"] for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_pause_holds_the_step_and_resume_continues(start_run):
    run = start_run("--step-sleep", "0.01")
    client = LiveClient(Endpoints(run.info.telemetry, run.info.control, run.info.key_bytes))
    client.start()
    try:
        wait_until(lambda: client.store.status.step > 5, what="steps to advance")
        ack = client.command("pause").result(5)
        assert ack["ok"] and ack["new"] == "paused" and isinstance(ack["step"], int)
        wait_until(lambda: client.store.status.state == "paused", what="heartbeat: paused")
        held = client.store.status.step
        time.sleep(1.5)
        assert client.store.status.step == held == ack["step"], "a step ran while paused"
        assert client.store.status.paused_at == ack["step"]
        ack2 = client.command("resume").result(5)
        assert ack2["ok"] and ack2["step"] == held
        wait_until(lambda: client.store.status.step > held + 5, what="steps after resume")
        assert client.store.status.state == "running"
    finally:
        client.close()


def test_control_refuses_wrong_key_and_unknown_commands(start_run):
    run = start_run("--step-sleep", "0.01")
    intruder = LiveClient(Endpoints(run.info.telemetry, run.info.control, b"wrong key")).start()
    owner = LiveClient(Endpoints(run.info.telemetry, run.info.control, run.info.key_bytes))
    owner.start()
    try:
        with pytest.raises(CommandError, match="not signed with this run's key"):
            intruder.command("pause").result(5)
        with pytest.raises(CommandError, match="unknown command 'explode'"):
            owner.command("explode").result(5)
        wait_until(lambda: owner.store.status.step > 3, what="steps")
        s = owner.store.status.step
        wait_until(lambda: owner.store.status.step > s + 3, what="training still running")
        # a heartbeat says so within SUBSCRIBE_RESEND_S of subscribing (coalesced)
        wait_until(lambda: owner.store.status.state == "running", what="state running")
    finally:
        intruder.close()
        owner.close()


def test_stalled_viewer_does_not_stall_training(start_run):
    # Every histogram at every step, over every bin: some 20 kB a step, so a viewer that
    # does not read fills its buffers (ZeroMQ's 1,000 messages and the kernel's) within a
    # few hundred steps, and the agent must drop its messages or wait.
    run = start_run(*watch_options(record=False, hist_every=1, hist_exponents=[-126, 127]))
    stalled = zmq.Context.instance().socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.subscribe(b"")
    stalled.connect(run.info.telemetry)  # connected, not read until the end
    try:
        first = next_heartbeat(run.info.telemetry)["step"]
        # Steps go on, and so do the agent thread's heartbeats, to a fresh viewer.
        later = wait_until(lambda: (h := next_heartbeat(run.info.telemetry))["step"]
                           > first + 1000 and h, timeout=120,
                           what="1,000 steps with a stalled viewer")
        seqs: list[int] = []
        while not seqs or seqs[-1] < later["seq"]:
            assert stalled.poll(10_000), "the stalled viewer gets nothing once it reads"
            seqs.append(wire.decode(stalled.recv_multipart()).header["seq"])
        assert (np.diff(seqs) > 1).any(), "the viewer missed nothing: it never stalled the agent"
    finally:
        stalled.close()


def test_connection_file_removed_on_clean_exit(start_run):
    run = start_run("--steps", "40", "--step-sleep", "0.05")
    path = connfile.conn_path(run.info.run_id)
    assert path.stat().st_mode & 0o777 == 0o600
    assert run.proc.wait(30) == 0
    assert not path.exists()
