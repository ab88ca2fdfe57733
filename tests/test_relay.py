"""The node relay: one telemetry endpoint per node for every rank of a job, and the job as one
target for ``ls``, ``attach``, ``ctl`` and ``export``. The fast test drives the relay with
real XPUB sockets standing in for ranks (each with its connection file, as a rank writes it);
the slow one runs a real 2-rank DDP job under ``torchrun`` (gloo, CPU)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import zmq

from neurotop.protocol import connfile, wire
from neurotop.service.relay import Relay
from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.targets import resolve
from tests.helpers.cli import neurotop
from tests.helpers.telemetry import Subscriber
from tests.helpers.waiting import wait_until
from tests.test_distributed import start_job  # noqa: F401  (the fixture)

slow = pytest.mark.slow  # starts torchrun and its ranks


class FakeRank:
    """A rank's telemetry socket as the agent binds it (XPUB, verbose), with its file."""

    def __init__(self, run_id: str, rank: int) -> None:
        self.sock = zmq.Context.instance().socket(zmq.XPUB)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.rank, self.run_id = rank, run_id
        self.subscriptions = 0
        connfile.write(connfile.ConnectionInfo(
            run_id=run_id, name="fake", pid=os.getpid(), start_time=0.0,
            telemetry=self.endpoint, control="tcp://127.0.0.1:1", key="", rank=rank,
            world_size=2, local_rank=rank))

    def pump(self, seq: int) -> None:
        """Count the subscriptions that came, and publish one heartbeat."""
        while self.sock.poll(0):
            self.subscriptions += self.sock.recv()[:1] == b"\x01"
        self.sock.send_multipart(wire.encode({"kind": wire.HEARTBEAT, "run": self.run_id,
                                              "rank": self.rank, "seq": seq}, []))


def test_the_relay_forwards_every_local_rank_and_each_new_viewer_reaches_all_ranks():
    ranks = [FakeRank("20260101-000000-abcd", r) for r in (0, 1)]
    relay = Relay("20260101-000000-abcd", own=ranks[0].endpoint)
    relay.start()
    seq = 0

    def seen(sub: Subscriber) -> set[int]:
        nonlocal seq
        seq += 1
        for r in ranks:
            r.pump(seq)
        sub.collect(0.05)
        return {m.header["rank"] for m in sub.msgs} == {0, 1}

    try:
        assert relay.endpoint.startswith("ipc://")
        first = Subscriber(relay.endpoint)
        wait_until(lambda: seen(first), timeout=30, what="both ranks through the relay")
        # A second viewer's subscription reaches every rank (each resends its schema) ...
        before = [r.subscriptions for r in ranks]
        with Subscriber(relay.endpoint) as second:
            wait_until(lambda: seen(second) and all(
                r.subscriptions > b for r, b in zip(ranks, before, strict=True)),
                timeout=30, what="the new viewer's subscription at both ranks")
        # ... and its leaving cuts no one else off
        first.msgs.clear()
        wait_until(lambda: seen(first), timeout=30, what="the first viewer still served")
        first.close()
    finally:
        relay.stop()
        for r in ranks:
            r.sock.close()
    assert not relay.is_alive()
    assert not Path(relay.endpoint[len("ipc://"):]).exists()  # its socket file is removed


def test_a_runtime_dir_too_long_for_a_unix_socket_gets_a_private_temporary_one(
        tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("NEUROTOP_RUNTIME_DIR", str(deep))
    relay = Relay("20260101-000000-abcd")
    relay.start()
    path = Path(relay.endpoint[len("ipc://"):])
    try:
        assert path.exists() and deep not in path.parents
        assert (path.parent.stat().st_mode & 0o777) == 0o700
    finally:
        relay.stop()
    assert not path.parent.exists()  # removed with the socket


@slow
def test_a_job_is_one_target_watched_through_its_node_relay(start_job, tmp_path):  # noqa: F811
    job = start_job(2, "--step-sleep", "0.05", "--config", json.dumps({"report_every": 1}))
    r0, r1 = job.ranks
    # rank 0's file (the job's) names the relay; the relay is what a viewer is given
    assert r0.relays and r0.relays[0].startswith("ipc://") and r1.relays == []
    target = resolve(r0.run_id)
    assert (target.telemetry, target.control, target.rank) == (r0.relays[0], r0.control, 0)

    with Subscriber(r0.relays[0]) as sub:  # one connection, every rank's messages
        sub.collect(60, until=lambda m: {x.header.get("rank") for x in sub.msgs} == {0, 1})
        assert {m.header["rank"] for m in sub.msgs} == {0, 1}
        assert {m.header["run"] for m in sub.msgs} == {r0.run_id}

    listed = [r for r in json.loads(neurotop("ls", "--json").stdout)
              if r["run_id"] == r0.run_id]
    assert len(listed) == 1 and listed[0]["ranks"] == [0, 1]
    assert listed[0]["telemetry"] == r0.relays[0]
    assert "(job: 2 ranks, 1 node)" in neurotop("ls").stdout

    client = LiveClient(target, backfill=True).start()  # what attach opens: rank 0 stored
    try:
        wait_until(lambda: client.ranks_seen == {0, 1} and client.store.status.step > 2,
                   timeout=60, what="both ranks seen, rank 0's steps stored")
        assert client.store.status.rank == 0
    finally:
        client.close()

    out = neurotop("ctl", r0.run_id, "pause", "--json", timeout=60)
    ack = json.loads(out.stdout)
    assert ack["ok"] and ack["ranks"] == [0, 1], out.stderr
    ack = json.loads(neurotop("ctl", r0.run_id[-4:], "stop", "--json", timeout=60).stdout)
    assert ack["ok"] and ack["ranks"] == [0, 1]
    assert job.proc.wait(60) == 0, job.output()[-3000:]

    out = neurotop("export", r0.run_dir, "--csv", str(tmp_path / "csv"), timeout=120)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "csv" / "scalars.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["rank", "step", "time"]
    assert {r["rank"] for r in rows} == {"0", "1"}
    for table in ("layers", "events", "system"):
        with open(tmp_path / "csv" / f"{table}.csv", newline="") as f:
            assert next(csv.reader(f))[0] == "rank", table
