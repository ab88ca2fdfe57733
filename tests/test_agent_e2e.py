"""The agent in a real training process, read over real ZeroMQ sockets."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from neurotop.config import Config
from neurotop.protocol import connfile, wire
from neurotop.tui.data.client import CommandError, Endpoints, LiveClient
from tests import numpy_reference as ref
from tests.conftest import wait_until


def collect(endpoint: str, seconds: float, until_step: int | None = None,
            until=None) -> list[wire.Message]:
    """Messages a fresh subscriber receives within ``seconds``, stopping early at a stats
    message of ``until_step`` or at the first message ``until`` accepts."""
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.subscribe(b"")
    sub.connect(endpoint)
    msgs = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sub.poll(50):
                m = wire.decode(sub.recv_multipart())
                msgs.append(m)
                if until_step and m.kind == wire.STATS and m.header["step"] >= until_step:
                    break
                if until is not None and until(m):
                    break
    finally:
        sub.close()
    return msgs


def heartbeat_step(endpoint: str) -> int:
    """The step of the next heartbeat (a fresh subscriber; waits up to 10 s)."""
    for m in collect(endpoint, 10.0, until=lambda m: m.kind == wire.HEARTBEAT):
        if m.kind == wire.HEARTBEAT:
            return m.header["step"]
    raise AssertionError("no heartbeat within 10 s")


def test_schema_and_stat_blocks_match_numpy(start_run, tmp_path):
    dump = tmp_path / "dump"
    run = start_run("--steps", "120", "--step-sleep", "0.03", "--dump", str(dump))
    msgs = collect(run.info.telemetry, 20, until_step=40)
    schemas = [m for m in msgs if m.kind == wire.SCHEMA]
    stats = {m.header["step"]: m for m in msgs if m.kind == wire.STATS}
    assert schemas, "no schema message received"
    schema = schemas[0].header
    assert schema["layers"] == ["0", "1", "2", "3", "4"]
    assert schema["stats"] == list(Config().stats)
    assert schema["scalars"][:2] == ["loss", "grad_norm"] and "lr" in schema["scalars"]
    cfg = Config()
    compared = 0
    window: dict[str, list[np.ndarray]] = {n: [] for n in schema["layers"]}
    for step in range(1, 31):
        d = np.load(dump / f"step{step}.npz")
        for n in window:
            window[n] = (window[n] + [d[n].max(axis=0)])[-cfg.dead_window:]
        if step not in stats:
            continue  # published before the subscription was up
        m = stats[step]
        block, scalars = m.arrays
        # Default settings: these activations are smaller than the sample, so all is exact.
        expected = np.array([[ref.layer_stats(d[n], None, sample=cfg.sample, eps=cfg.eps,
                                              units_max_window=np.max(window[n], axis=0))[s]
                              for s in schema["stats"]] for n in schema["layers"]])
        grad_col = schema["stats"].index("grad_rms")
        expected[:, grad_col] = block[:, grad_col]  # the dump has no output gradients
        np.testing.assert_allclose(block, expected, rtol=1e-4, atol=1e-5)
        sc = dict(zip(schema["scalars"], scalars, strict=True))
        assert sc["loss"] == pytest.approx(float(d["loss"]), rel=1e-5)
        assert sc["grad_norm"] == pytest.approx(float(d["grad_norm"]), rel=1e-4)
        assert sc["lr"] == pytest.approx(0.05)
        compared += 1
    assert compared >= 15, f"only {compared} steps compared"
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
        assert owner.store.status.state == "running"
    finally:
        intruder.close()
        owner.close()


def test_stalled_viewer_does_not_stall_training(start_run):
    run = start_run("--step-sleep", "0.0")
    ctx = zmq.Context.instance()
    stalled = ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.subscribe(b"")
    stalled.connect(run.info.telemetry)  # connected, never read
    try:
        first = heartbeat_step(run.info.telemetry)
        time.sleep(2.0)
        later = heartbeat_step(run.info.telemetry)
        assert later - first > 100, "training slowed to a crawl behind a stalled viewer"
    finally:
        stalled.close()


def test_connection_file_removed_on_clean_exit(start_run):
    run = start_run("--steps", "40", "--step-sleep", "0.05")
    path = connfile.conn_path(run.info.run_id)
    assert path.stat().st_mode & 0o777 == 0o600
    assert run.proc.wait(30) == 0
    assert not path.exists()
