"""Issue 14's control-plane attacks, sent again: nobody without the key can slow a run or
fill its disk, a signed but pathological argument is refused at once, a future-stamped
request cannot be replayed, and a subscription storm adds few schemas to the recording."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from neurotop.protocol import wire
from neurotop.protocol.commands import MAX_ARG_CHARS, check_args, split_knob
from neurotop.protocol.runs import SESSION_FILE
from neurotop.protocol.sessionfile import MESSAGE, SessionReader, split_frames
from neurotop.service.controller import Controller
from neurotop.service.gate import (
    MAX_ID_CHARS,
    NONCE_WINDOW_S,
    PEER_REFUSAL_BURST,
    Gate,
    Refusal,
    Request,
)
from neurotop.service.loop import AgentService
from neurotop.service.wakeup import Wakeup
from neurotop.tui.data.client import Endpoints, LiveClient
from tests.helpers.telemetry import Subscriber
from tests.helpers.training import Run
from tests.helpers.waiting import wait_until

KEY = b"k" * 32


def slow_body(size: int) -> bytes:
    """msgpack that decodes slowly: one array of ``size - 5`` empty arrays (1 MiB of it
    held the GIL for about 0.5 s)."""
    n = size - 5
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def dealer(endpoint: str, ident: bytes | None = None) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if ident:
        s.setsockopt(zmq.IDENTITY, ident)
    s.connect(endpoint)
    return s


def ask(sock: zmq.Socket, frames: list[bytes], timeout_ms: int = 10_000) -> dict:
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), "no reply from the run"
    return wire.decode_signed(sock.recv_multipart(), None)[0]


def recorded(path: Path) -> list[tuple[dict, int]]:
    """Every message a run recorded: its header and the bytes its record takes."""
    with SessionReader(path) as r:
        return [(wire.decode(split_frames(rec.body)).header, len(rec.body))
                for rec in r.records() if rec.type == MESSAGE]


def step_rate(client: LiveClient, seconds: float) -> float:
    s0, t0 = client.store.status.step, time.monotonic()
    time.sleep(seconds)
    return (client.store.status.step - s0) / (time.monotonic() - t0)


# --- the gate, alone -----------------------------------------------------------------------

def test_an_unsigned_body_is_refused_without_being_decoded():
    gate = Gate(KEY)
    crafted = [slow_body(1 << 20), slow_body(wire.MAX_REQUEST_BYTES),
               b"\x82\xa2id\xa1x\xa4args" + slow_body(wire.MAX_REQUEST_BYTES - 11)]
    for body, why in zip(crafted, ["exceeds", "not signed", "not signed"], strict=True):
        t = time.perf_counter()
        verdict = gate.admit([b"peer", body, b"0" * 64])
        took = time.perf_counter() - t
        assert isinstance(verdict, Refusal) and why in verdict.reply["error"]
        assert took < 0.02, f"refusing a crafted body took {took * 1000:.1f} ms"
    assert verdict.reply["id"] == "x"  # named for its sender: read, not decoded
    req = wire.new_request("pause")
    verdict = gate.admit([b"peer", *wire.encode_signed(b"another key", req)])
    assert (verdict.reply["id"], verdict.reply["cmd"]) == (req["id"], "pause")
    signed = wire.encode_signed(KEY, wire.new_request("schema"))
    assert isinstance(gate.admit([b"peer", *signed]), Request)


def test_refusal_replies_are_rate_limited_per_peer_but_all_counted():
    gate = Gate(KEY)
    unsigned = wire.encode_signed(None, wire.new_request("pause"))
    flood = [gate.admit([b"flooder", *unsigned]) for _ in range(500)]
    answered = [v for v in flood if v.reply is not None]
    assert len(answered) <= PEER_REFUSAL_BURST + 5, "a flooding peer got every refusal answered"
    assert gate.rejected == 500
    assert gate.admit([b"someone else", *unsigned]).reply is not None, "another peer starved"
    assert isinstance(gate.admit([b"flooder", *wire.encode_signed(KEY, wire.new_request(
        "schema"))]), Request), "a rate-limited peer's authentic request must still pass"
    (event,) = gate.refusal_events(final=True)
    assert event["refusal"] == "unsigned" and event["count"] == 501
    assert event["error"] == "not signed with this run's key (and 500 more refused so that" \
        " second)"


def test_every_peer_provided_field_of_a_refusal_is_bounded():
    gate = Gate(KEY)
    req = wire.new_request("p" * 5000, sender="s" * 5000, req_id="i" * 5000)
    req["kind"] = "reply"  # signed, so decoded, but refused: it is not a request
    verdict = gate.admit([b"x" * 255, *wire.encode_signed(KEY, req)])
    (event,) = gate.refusal_events(final=True)
    assert len(msgpack.packb(event)) < 1000 and len(msgpack.packb(verdict.reply)) < 1000
    too_long = wire.new_request("schema", req_id="i" * (MAX_ID_CHARS + 1))
    verdict = gate.admit([b"x", *wire.encode_signed(KEY, too_long)])
    assert isinstance(verdict, Refusal) and "id is longer" in verdict.reply["error"]


def test_a_future_stamped_request_is_refused_when_resent_after_the_window():
    now = [1_000_000.0]
    gate = Gate(KEY, clock=lambda: now[0])
    req = wire.new_request("pause")
    req["ts"] = now[0] + 115  # a clock 115 s ahead: within the window
    frames = [b"c", *wire.encode_signed(KEY, req)]
    assert isinstance(gate.admit(frames), Request)
    now[0] += 123  # its timestamp is 8 s old now: fresh again, so only the nonce refuses it
    verdict = gate.admit(frames)
    assert isinstance(verdict, Refusal) and "replayed" in verdict.reply["error"]
    now[0] += NONCE_WINDOW_S  # its timestamp has left the window: stale, and forgotten
    verdict = gate.admit(frames)
    assert isinstance(verdict, Refusal) and "stale" in verdict.reply["error"]
    assert not gate._nonces, "nonces whose timestamps left the window are still remembered"


def test_argument_lengths_are_bounded_and_a_huge_glob_refused_at_once():
    for knob in ["lr[" + "*a" * 200_000 + "]", "lr[" + "*" * 200_000 + "]"]:
        t = time.perf_counter()
        error = check_args("set", {"knob": knob, "value": 0.1})
        assert error and f"longer than {MAX_ARG_CHARS}" in error
        assert time.perf_counter() - t < 0.05
        with pytest.raises(ValueError, match=f"at most {MAX_ARG_CHARS}"):
            split_knob(knob)  # the UI and the CLI refuse it before sending
    assert "2 more" in check_args("knobs", {f"k{i}" * 1000: 1 for i in range(5)})


# --- real sockets, real training ------------------------------------------------------------

@pytest.mark.slow
def test_a_slow_decode_flood_costs_the_run_little_of_its_step_rate(start_run):
    run = start_run("--step-sleep", "0.01")
    client = LiveClient(Endpoints(run.info.telemetry, run.info.control,
                                  run.info.key_bytes)).start()
    peers = [dealer(run.info.control) for _ in range(20)]
    # Oversized (refused by length) and just under the limit (refused by signature); the
    # old agent decoded both before checking the signature: 0.5 s and 8 ms of GIL each.
    bodies = [[slow_body((1 << 20) - 16), b"0" * 64], [slow_body(wire.MAX_REQUEST_BYTES),
                                                       b"0" * 64]]
    for p in peers:
        p.setsockopt(zmq.SNDHWM, 4)
    stop, sent = threading.Event(), [0]

    def flood() -> None:
        while not stop.is_set():
            for i, p in enumerate(peers):
                try:  # never queue up more than SNDHWM: a stalled agent would not read them
                    p.send_multipart(bodies[i % 2], flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                sent[0] += 1
                while p.poll(0):
                    p.recv_multipart()
            stop.wait(0.1)  # 200 messages (100 MiB) a second

    flooder = threading.Thread(target=flood)
    try:
        wait_until(lambda: client.store.status.step > 20, timeout=60, what="training")
        before = step_rate(client, 6)
        flooder.start()
        wait_until(lambda: client.store.status.rejected > 100, timeout=30,
                   what="the run refusing the flood")
        during = step_rate(client, 6)
        assert client.store.status.rejected > 1000
        stop.set()
        flooder.join()
        # 10 % is the target (on an idle machine it costs about 0 %); the bound is looser
        # for a loaded test machine, and the old agent fell from 56 steps/s to 0.38.
        assert during > 0.8 * before, f"{before:.1f} steps/s before the flood, {during:.1f}"
        owner = dealer(run.info.control)  # the flooders' sockets may still hold refusals
        peers.append(owner)
        assert ask(owner, wire.encode_signed(run.info.key_bytes, wire.new_request(
            "schema")))["ok"], "the run no longer answers its key holder"
    finally:
        stop.set()
        if flooder.is_alive():
            flooder.join()
        for p in peers:
            p.close()
        client.close()


#: The huge-id flood's pairs of requests: 460 refusals, as many as the 12 s flood the fix
#: was measured with (454), so that one event per refusal (240 B each even with every peer
#: field cut) would outgrow the 100 kB bound; counted, not timed: a slow machine sends all.
FLOOD_PAIRS = 230


@pytest.mark.slow
def test_a_flood_of_huge_ids_barely_grows_the_session_file(start_run):
    run = start_run("--step-sleep", "0.01")
    session = Path(run.info.run_dir) / SESSION_FILE
    sock = dealer(run.info.control)
    n = 0
    try:
        wait_until(lambda: session.exists() and session.stat().st_size > 0, timeout=60,
                   what="the recording")
        first = ask(sock, wire.encode_signed(None, wire.new_request("pause",
                                                                     req_id="i" * 1_000_000)))
        assert "exceeds" in first["error"] and first["id"] is None  # read by the sender
        under = wire.new_request("pause", req_id="i" * 15_000, sender="s" * 1000)
        for _ in range(FLOOD_PAIRS):  # 1 MB ids, and ids just under the size limit
            sock.send_multipart(wire.encode_signed(None, wire.new_request(
                "pause", req_id="i" * 1_000_000)))
            sock.send_multipart(wire.encode_signed(None, under))
            n += 2
            while sock.poll(0):
                sock.recv_multipart()
            time.sleep(0.01)  # up to 100 MB a second, the slow-decode flood's rate
        # A key holder's long id is cut too (asked on a connection of its own: the flood's
        # replies may still be coming in on the other).
        owner = dealer(run.info.control)
        long_id = ask(owner, wire.encode_signed(run.info.key_bytes, wire.new_request(
            "schema", req_id="i" * 10_000)))
        owner.close()
        assert "id is longer" in long_id["error"] and len(long_id["id"]) == MAX_ID_CHARS
    finally:
        sock.close()
    run.stop()
    refused = [(h, size) for h, size in recorded(session) if h.get("event") == "refused"]
    assert sum(h["count"] for h, _ in refused) == n + 2, "a refusal went uncounted"
    grown = sum(size for _, size in refused)
    assert grown < 100_000, f"{n} refused requests recorded {grown} bytes"


def _timed_refusal(sock: zmq.Socket, key: bytes, knob: str) -> tuple[dict, float]:
    frames = wire.encode_signed(key, wire.new_request("set", {"knob": knob, "value": 0.1}))
    t = time.perf_counter()
    reply = ask(sock, frames)
    return reply, time.perf_counter() - t


@pytest.mark.slow
def test_pathological_globs_are_refused_promptly(start_run):
    run: Run = start_run("--model", "dropout", "--step-sleep", "0.01")
    sock = dealer(run.info.control)
    key = run.info.key_bytes
    try:
        assert ask(sock, wire.encode_signed(key, wire.new_request("schema")))["ok"]
        cases = {"dropout[" + "*a" * 200_000 + "]": "exceeds",  # 400 kB
                 "dropout[" + "*" * 200_000 + "]": "exceeds",
                 "dropout[" + "*a" * 2_000 + "]": f"longer than {MAX_ARG_CHARS}",
                 "dropout[" + "*a" * 120 + "]": "matches no module"}
        for knob, why in cases.items():
            # Best of three: the bound is on the agent, not on a loaded machine's scheduler.
            answers = [_timed_refusal(sock, key, knob) for _ in range(3)]
            assert all(why in r["error"] and not r["ok"] for r, _ in answers), answers[0][0]
            best = min(t for _, t in answers)
            assert best < 0.05, f"a {len(knob)}-character glob took {best * 1000:.0f} ms"
        assert run.proc.poll() is None
    finally:
        sock.close()


@pytest.mark.slow
def test_a_future_stamped_pause_over_a_real_socket_is_accepted_once(start_run):
    run = start_run("--step-sleep", "0.01")
    sock = dealer(run.info.control)
    key = run.info.key_bytes
    try:
        req = wire.new_request("pause", sender="skewed clock")
        req["ts"] += 115  # the sender's clock runs 115 s ahead: accepted
        frames = wire.encode_signed(key, req)
        assert ask(sock, frames)["ok"]
        assert "replayed" in ask(sock, frames)["error"]
        req = {**wire.new_request("pause"), "ts": time.time() + NONCE_WINDOW_S + 10}
        assert "stale" in ask(sock, wire.encode_signed(key, req))["error"]
        assert ask(sock, wire.encode_signed(key, wire.new_request("resume")))["ok"]
    finally:
        sock.close()


@pytest.mark.slow
def test_a_future_stamped_request_resent_123_s_later_over_a_real_socket_is_refused():
    now = [time.time()]
    service = AgentService(run_id="r", key=KEY, controller=Controller(), wakeup=Wakeup(),
                           schema=lambda: {"layers": []}, status=lambda: {"step": 0})
    service.gate = Gate(KEY, clock=lambda: now[0])  # the run's clock, moved by the test
    service.start()
    sock = dealer(service.control_endpoint)
    try:
        req = wire.new_request("schema", sender="skewed clock")
        req["ts"] += 115
        frames = wire.encode_signed(KEY, req)
        assert ask(sock, frames)["ok"]
        now[0] += 123
        assert "replayed" in ask(sock, frames)["error"]
    finally:
        sock.close()
        service.stop()


@pytest.mark.slow
def test_a_subscription_storm_adds_few_schemas_and_a_new_viewer_still_gets_one(start_run):
    began = time.monotonic()
    run = start_run("--step-sleep", "0.01")
    session = Path(run.info.run_dir) / SESSION_FILE
    storm = zmq.Context.instance().socket(zmq.SUB)
    storm.setsockopt(zmq.LINGER, 0)
    storm.connect(run.info.telemetry)
    try:
        Subscriber(run.info.telemetry).ready().close()
        for i in range(10_000):
            storm.subscribe(f"storm-{i}".encode())
        with Subscriber(run.info.telemetry) as viewer:  # a new viewer, right after
            viewer.collect(3, until=lambda m: m.kind == wire.SCHEMA)
            assert viewer.msgs[-1].kind == wire.SCHEMA, "no schema for a new viewer within 3 s"
    finally:
        storm.close()
    lasted = time.monotonic() - began
    run.stop()
    schemas = [h for h, _ in recorded(session) if h["kind"] == wire.SCHEMA]
    # The periodic resend (every 5 s over the whole run) and a few for the storm; the old
    # agent recorded one per subscription that found it idle (1,002 for 10,000).
    assert len(schemas) <= 12 + lasted / 5, f"{len(schemas)} schemas in {lasted:.0f} s"
