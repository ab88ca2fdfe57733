"""Hostile control input: 1,000 fuzzed messages leave a real run healthy, training all along."""

from __future__ import annotations

import os
import time
from itertools import pairwise

import msgpack
import numpy as np
import pytest
import zmq

from neurotop.protocol import wire
from neurotop.tui.data.client import Endpoints, LiveClient
from tests.helpers.telemetry import Subscriber
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow  # starts training processes

# Signed with the run's key, but wrong: each must be refused (ok False), never applied.
BAD_SIGNED = [
    (5, {}), ("explode", {}), ("pause", []), ("pause", {"force": 1}), ("step", {}),
    ("step", {"n": "3"}), ("step", {"n": 0}), ("step", {"n": 10**12}), ("step", {"n": 2.5}),
    ("step", {"n": True}), ("set", {"knob": "lr"}), ("set", {"value": 1.0}),
    ("set", {"knob": 5, "value": 1.0}), ("set", {"knob": "lr", "value": [1]}),
    ("set", {"knob": "lr", "value": -5.0}), ("set", {"knob": "lr", "value": float("inf")}),
    ("set", {"knob": "lr", "value": float("nan")}), ("set", {"knob": "lr", "value": "0.1"}),
    ("set", {"knob": "lr", "value": 0.1, "op": "pow"}), ("set", {"knob": "lr[[", "value": 1.0}),
    ("set", {"knob": "lr[9]", "value": 0.1}), ("set", {"knob": "l1", "value": 0.1}),
    ("set", {"knob": "x" * 5000, "value": 0.1}), ("set", {"knob": "lr", "value": 0, "op": "mul"}),
    ("knobs", {"all": True}), ("snapshot", {"path": "/etc/passwd"}), ("stop", {"now": 1}),
]


def fuzz_messages(rng: np.random.Generator, key: bytes, n: int):
    """``n`` messages as frame lists, with whether each is signed with the right key."""
    for i in range(n):
        kind = i % 8
        if kind == 0:  # random bytes, 1-3 frames
            yield [rng.bytes(int(rng.integers(0, 2048))) for _ in range(rng.integers(1, 4))], 0
        elif kind == 1:  # msgpack that is not a request
            junk = [None, 1, "x", [1, 2], {"v": "1"}, {"kind": 3}, {"v": 1, "kind": "request"}]
            body = msgpack.packb(junk[int(rng.integers(len(junk)))])
            yield [body, rng.bytes(64)], 0
        elif kind == 2:  # a well-formed request, unsigned or signed with another key
            req = wire.new_request("pause", sender="intruder")
            yield wire.encode_signed(os.urandom(32) if rng.random() < 0.5 else None, req), 0
        elif kind == 3:  # too many frames
            yield [b"x"] * int(rng.integers(3, 60)), 0
        elif kind == 4:  # replay: a signed request whose nonce was already used
            req = wire.new_request("set", {"knob": "lr", "value": -1.0})
            frames = wire.encode_signed(key, req)
            yield frames, 1
            yield frames, 1
        elif kind == 5:  # stale or nonsense timestamps
            req = wire.new_request("pause")
            req["ts"] = [0.0, float("nan"), 1e300, time.time() - 3600][int(rng.integers(4))]
            yield wire.encode_signed(key, req), 1
        else:  # signed, authentic, and invalid
            cmd, args = BAD_SIGNED[int(rng.integers(len(BAD_SIGNED)))]
            req = wire.new_request("x", sender="fuzz")
            req["cmd"], req["args"] = cmd, args
            yield wire.encode_signed(key, req), 1


def replies_until_answered(dealer: zmq.Socket, key: bytes) -> list[dict]:
    """Send one valid request, then read replies until its answer: the agent answers a
    connection in order, so every reply to what was sent before it is in."""
    req = wire.new_request("schema", sender="fuzz-check")
    dealer.send_multipart(wire.encode_signed(key, req))
    replies: list[dict] = []
    while not replies or replies[-1].get("id") != req["id"]:
        assert dealer.poll(10_000), "the agent stopped answering"
        replies.append(wire.decode_signed(dealer.recv_multipart(), key)[0])
    return replies[:-1]


def test_fuzzed_control_leaves_the_run_healthy(start_run):
    run = start_run("--step-sleep", "0.005")
    key = run.info.key_bytes
    client = LiveClient(Endpoints(run.info.telemetry, run.info.control, key)).start()
    sub = Subscriber(run.info.telemetry).ready()  # the heartbeats all through the flood
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(run.info.control)
    try:
        wait_until(lambda: client.store.status.step > 20, what="steps")
        rng = np.random.default_rng(1)
        sent, replies = 0, []
        for frames, _signed in fuzz_messages(rng, key, 1000):
            dealer.send_multipart(frames)
            sent += 1
            if sent % 200 == 100:  # frames above the 1 MiB limit: ZeroMQ cuts that connection
                dealer.send(b"\0" * (2 << 20))
            if sent % 10 == 0:
                sub.collect(0.02)  # spread the flood over a couple of seconds
            while dealer.poll(0):
                replies.append(wire.decode_signed(dealer.recv_multipart(), key)[0])
        assert sent >= 1000
        replies += replies_until_answered(dealer, key)
        assert replies and not [r for r in replies if r.get("ok")], \
            "a fuzzed control message was accepted"
        wait_until(lambda: client.store.status.rejected >= 800, what="refusals counted")
        sub.collect(10, until=lambda m: m.kind == wire.HEARTBEAT
                    and m.header["rejected"] >= client.store.status.rejected)

        # Training went on all through the flood: between any two heartbeats in which the
        # agent refused more, the run took steps too, and nothing paused it.
        beats = [m.header for m in sub.msgs if m.kind == wire.HEARTBEAT]
        assert {b["state"] for b in beats} == {"running"}, "a fuzzed message paused the run"
        busy = [(a, b) for a, b in pairwise(beats) if b["rejected"] > a["rejected"]]
        assert busy, "no heartbeat came while the agent refused the flood"
        stalled = [(a["step"], b["step"]) for a, b in busy if b["step"] <= a["step"]]
        assert not stalled, f"no step while the agent refused fuzzed messages: {stalled}"

        # Healthy: the agent still answers, applies commands, and counted what it refused.
        s = client.store.status.step
        wait_until(lambda: client.store.status.step > s + 20, what="steps after the flood")
        ack = client.command("pause").result(10)
        assert ack["ok"] and client.command("resume").result(10)["step"] == ack["step"]
        knobs = {k["name"]: k["value"] for k in client.command("knobs").result(10)["knobs"]}
        assert knobs["lr"] == 0.05 and knobs["grad_clip"] == 0.0
        assert run.proc.poll() is None
    finally:
        dealer.close()
        sub.close()
        client.close()
    run.stop()
    assert b"Traceback" not in run.proc.stderr.read()
