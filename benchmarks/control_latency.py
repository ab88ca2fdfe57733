"""How long from sending ``pause`` to its ack, on a running training loop?

Starts ``demos/mlp.py`` (a real training loop with the agent) in a child process,
then repeatedly: lets it run, sends a signed ``pause`` on a DEALER socket, waits
for the ack, sends ``resume``. A pause can only land at the next optimizer step
boundary, so the budget is one step + 50 ms. The step time is the median gap
between consecutive steps' ``stats`` messages while running.

    python benchmarks/control_latency.py [--rounds 30] [-- demo options]

The last line is exactly ``pause_ack_ms=X step_ms=Y`` (medians).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from neurotop.protocol import connfile, wire

ROOT = Path(__file__).resolve().parent.parent


def wait_for_run(proc: subprocess.Popen, run_id: str) -> connfile.ConnectionInfo:
    path = connfile.conn_path(run_id)
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the training loop did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    return connfile.read(path)


def command(dealer: zmq.Socket, key: bytes, cmd: str) -> tuple[dict, float]:
    """Send one signed command; return its ack and the seconds until it came."""
    req = wire.new_request(cmd, sender="benchmark")
    t0 = time.perf_counter()
    dealer.send_multipart(wire.encode_signed(key, req))
    while True:
        if not dealer.poll(10_000):
            sys.exit(f"no ack for {cmd} within 10 s")
        reply, signed = wire.decode_signed(dealer.recv_multipart(), key)
        if reply.get("id") == req["id"]:
            if not (signed and reply.get("ok")):
                sys.exit(f"{cmd} refused: {reply.get('error')}")
            return reply, time.perf_counter() - t0


def step_gaps(sub: zmq.Socket, seconds: float) -> list[float]:
    """Wall-clock gaps between consecutive steps' stats messages, read for ``seconds``."""
    last: tuple[int, float] | None = None
    gaps = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not sub.poll(20):
            continue
        m = wire.decode(sub.recv_multipart())
        if m.kind == wire.STATS:
            step, wall = m.header["step"], m.header["wall"]
            if last is not None and step == last[0] + 1:
                gaps.append(wall - last[1])
            last = (step, wall)
    return gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("demo_args", nargs="*", help="passed to demos/mlp.py")
    args = p.parse_args()
    os.environ.setdefault("NEUROTOP_RUNTIME_DIR", tempfile.mkdtemp(prefix="neurotop-bench-"))
    run_id = connfile.new_run_id()
    env = dict(os.environ, NEUROTOP_RUN_ID=run_id)
    proc = subprocess.Popen([sys.executable, str(ROOT / "demos" / "mlp.py"), "--report-every",
                             "1", *args.demo_args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ctx = zmq.Context()
    try:
        info = wait_for_run(proc, run_id)
        key = info.key_bytes
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(info.control)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.subscribe(b"")
        sub.connect(info.telemetry)
        step_gaps(sub, 1.0)  # warm up
        acks, gaps = [], []
        for i in range(args.rounds):
            gaps += step_gaps(sub, 0.4)  # running: a pause can come at any point of a step
            ack, dt = command(dealer, key, "pause")
            acks.append(dt)
            command(dealer, key, "resume")
            print(f"round {i + 1}: pause acked in {dt * 1e3:.1f} ms at step {ack['step']}",
                  flush=True)
        ack_ms, step_ms = np.median(acks) * 1e3, np.median(gaps) * 1e3
        print(f"pause ack: median {ack_ms:.1f} ms, p90 {np.percentile(acks, 90) * 1e3:.1f} ms,"
              f" max {max(acks) * 1e3:.1f} ms over {len(acks)} pauses; step: median"
              f" {step_ms:.1f} ms over {len(gaps)} steps; budget one step + 50 ms ="
              f" {step_ms + 50:.1f} ms")
        print(f"pause_ack_ms={ack_ms:.1f} step_ms={step_ms:.1f}")
    finally:
        proc.terminate()
        proc.wait(10)
        ctx.destroy(0)


if __name__ == "__main__":
    main()
