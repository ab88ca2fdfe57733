"""Who may reach a run: loopback unless CURVE, CURVE clients only with the run's public
key, and signed, fresh requests only (the rest refused, counted and audited)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from neurotop.protocol import connfile, wire
from neurotop.protocol.binding import UnsafeBindError, check_bind, is_loopback
from neurotop.service.controller import Controller
from neurotop.service.loop import AgentService
from neurotop.service.wakeup import Wakeup
from neurotop.tui.data.client import CommandError, Endpoints, LiveClient
from neurotop.tui.data.targets import resolve
from tests.helpers.training import TRAIN, watch_options
from tests.helpers.waiting import wait_until


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_binds_need_no_curve(host):
    assert is_loopback(host)
    check_bind(host, curve=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "::", "10.1.2.3", "eth0", "gpu-box.example"])
def test_binds_beyond_loopback_without_curve_are_refused(host):
    assert not is_loopback(host)
    with pytest.raises(UnsafeBindError, match="without CURVE"):
        check_bind(host, curve=False)
    check_bind(host, curve=True)  # allowed with CURVE (nothing is bound here)
    with pytest.raises(UnsafeBindError, match="without CURVE"):
        AgentService(run_id="r", key=b"k", controller=Controller(), wakeup=Wakeup(),
                     schema=dict, status=dict, bind_host=host)


@pytest.mark.slow
def test_training_refuses_to_bind_beyond_loopback_without_curve(runtime_dir):
    out = subprocess.run([sys.executable, str(TRAIN), "--steps", "5",
                          *watch_options(bind_host="0.0.0.0")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "refusing to bind '0.0.0.0' without CURVE" in out.stderr
    assert not list(runtime_dir.glob("run-*.json")), "a refused run must not advertise itself"


def _messages(sock: zmq.Socket, seconds: float) -> int:
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(50):
            sock.recv_multipart()
            n += 1
    return n


@pytest.mark.slow
def test_curve_agent_serves_only_clients_with_its_public_key(start_run):
    run = start_run("--step-sleep", "0.02", *watch_options(curve=True))
    saved = json.loads(connfile.conn_path(run.info.run_id).read_text())
    assert len(saved["curve_server_key"]) == 40  # Z85 public key
    assert set(saved) == set(connfile.ConnectionInfo.__dataclass_fields__), "no secret key"

    ctx = zmq.Context.instance()
    plain, wrong_key = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
    wrong_key.curve_serverkey = zmq.curve_keypair()[0]  # some other server's public key
    wrong_key.curve_publickey, wrong_key.curve_secretkey = zmq.curve_keypair()
    for s in (plain, wrong_key):
        s.setsockopt(zmq.LINGER, 0)
        s.subscribe(b"")
        s.connect(run.info.telemetry)
    # Even with the run's HMAC key, a request over a non-CURVE connection gets no answer.
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(run.info.control)
    try:  # with its handshake refused, the dealer may have no pipe to queue the request on
        dealer.send_multipart(wire.encode_signed(run.info.key_bytes, wire.new_request("schema")),
                              flags=zmq.NOBLOCK)
    except zmq.Again:
        pass
    owner = LiveClient(resolve(run.info.run_id)).start()
    try:
        assert _messages(plain, 2.0) == 0
        assert _messages(wrong_key, 0.5) == 0
        assert dealer.poll(100) == 0
        wait_until(lambda: owner.store.status.step > 0, what="telemetry for the key holder")
        ack = owner.command("pause").result(10)
        assert ack["ok"] and ack["new"] == "paused"
        assert owner.command("resume").result(10)["ok"]
    finally:
        owner.close()
        for s in (plain, wrong_key, dealer):
            s.close()


@pytest.mark.slow
@pytest.mark.parametrize("server_key", ["wrong", "none"])
def test_a_client_without_the_runs_curve_key_gets_errors_not_a_frozen_ui(start_run,
                                                                         server_key):
    """With no CURVE at all, libzmq drops the control connection for good after the
    refused handshake, and a blocking send would then wait forever on the socket thread."""
    run = start_run("--step-sleep", "0.02", *watch_options(curve=True))
    key = zmq.curve_keypair()[0].decode() if server_key == "wrong" else ""
    client = LiveClient(Endpoints(run.info.telemetry, run.info.control, run.info.key_bytes,
                                  curve_server_key=key)).start()
    try:
        for cmd in ("pause", "resume", "knobs"):  # queued or refused, each one ends in an error
            with pytest.raises(CommandError):
                client.command(cmd, timeout=1.0).result(30)
        assert client.store.status.step == 0, "no telemetry without the run's key"
    finally:
        client.close()
    assert not client._thread.is_alive(), "the socket thread stopped when asked"


def _ask(dealer: zmq.Socket, frames: list[bytes]) -> dict:
    dealer.send_multipart(frames)
    assert dealer.poll(10_000), "no reply from the run"
    return wire.decode_signed(dealer.recv_multipart(), None)[0]


@pytest.mark.slow
def test_unsigned_forged_replayed_and_stale_requests_are_refused_counted_audited(start_run):
    run = start_run("--step-sleep", "0.02")
    key = run.info.key_bytes
    owner = LiveClient(Endpoints(run.info.telemetry, run.info.control, key)).start()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(run.info.control)
    try:
        good = wire.encode_signed(key, wire.new_request("schema", sender="tester"))
        assert _ask(dealer, good)["ok"] is True
        stale = wire.new_request("pause", sender="tester")
        stale["ts"] -= 3600
        reply = {**wire.new_request("pause", sender="tester"), "kind": "reply"}
        attempts = [
            ("replayed request", good),  # the very same frames again
            ("stale request: its timestamp is +3600 s off", wire.encode_signed(key, stale)),
            ("not signed with this run's key", wire.encode_signed(None, wire.new_request("pause"))),
            ("not signed with this run's key", [msgpack.packb(wire.new_request("pause")),
                                                wire.sign(b"guess", b"something else")]),
            ("is not a request", wire.encode_signed(key, reply)),
        ]
        for why, frames in attempts:
            answer = _ask(dealer, frames)
            assert answer["ok"] is False and why in answer["error"], answer
        wait_until(lambda: owner.store.status.rejected == len(attempts),
                   what="the heartbeat to count every refusal")

        def refusals() -> list[dict]:
            return [e for e in list(owner.store.status.events) if e.get("event") == "refused"]

        # Audited as one event per reason per second, each with its count.
        wait_until(lambda: sum(e["count"] for e in refusals()) == len(attempts),
                   what="every refusal audited")
        assert all(e["error"] for e in refusals())
        assert {e["refusal"] for e in refusals()} == {"replayed", "stale", "unsigned",
                                                      "not a request"}
        assert "tester" in {e["sender"] for e in refusals()}
        s = owner.store.status.step
        wait_until(lambda: owner.store.status.step > s + 5, what="training going on")
        assert owner.store.status.state == "running"
    finally:
        dealer.close()
        owner.close()
    run.stop()  # and the training's own log names every refusal
    logged = re.findall(r"refused (\d+) control message", run.proc.stderr.read().decode())
    assert sum(map(int, logged)) == len(attempts)
