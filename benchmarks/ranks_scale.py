"""One node relay and the UI side with many simulated ranks: what a viewer of a large job costs.

    python benchmarks/ranks_scale.py [--ranks 64,256] [--rate 2] [--layers 50] [--seconds 10]

For each rank count N, this process plays N ranks: N PUB sockets on loopback, each with its
connection file (one run id, this host) in a private runtime directory, each sending
``--rate`` reports/s shaped like the agent's (``benchmarks/tui_render.py``'s ``report()``:
a stats message of ``--layers`` layers x 12 statistics and 7 scalars, then a params message
of 8 parameters), a heartbeat every 0.5 s and its schema every 5 s, like an agent. It also
hosts the real relay (``neurotop.service.relay.Relay``, as local rank 0's agent does), which
finds the ranks by their connection files. A child process is the UI side: one SUB on the
relay, a socket thread decoding every message into a per-rank map of ``RunStore`` (the
store holds one rank's run: the UI keeps one per rank), and the real ``NeurotopApp``
(headless, 200x60) showing rank 0. Every 1/5 s (the app's redraw rate) the child makes a
frame: the all-ranks aggregate (per layer and statistic, min / median / max across ranks of
each rank's latest report, and the rank holding each extreme), then a forced redraw and
paint of the overview. Frame time: CPU ms of the UI thread for that; CPU: the child's
process CPU over ``--seconds`` (socket thread, ingest, frames), as % of one core. The relay
thread's own CPU is read from /proc. Last line: ``ranks=N frame_ms_p50=A cpu_pct=B`` for
the largest N.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tui_render import report, schema  # noqa: E402  (the agent's message shapes)

from neurotop.protocol import wire  # noqa: E402

RUN_ID = "20260101-000000-bench"
FRAME_S = 0.2  # the app's REDRAW_HZ


def relay_cpu_s(tid: int) -> float:
    """The CPU seconds (user + system) of thread ``tid`` of this process, from /proc."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def aggregate(stores: dict) -> list[np.ndarray]:
    """The all-ranks view's numbers, per layer and statistic: min, median and max across
    ranks of each rank's latest report, and the ranks holding the min and the max."""
    ranks, blocks = zip(*[(r, b) for r, s in stores.items()
                          if (b := s.latest_block()) is not None], strict=True)
    stack = np.stack(blocks)  # [ranks x layers x stats]
    order = np.asarray(ranks)
    return [stack.min(0), np.median(stack, 0), stack.max(0), order[stack.argmin(0)],
            order[stack.argmax(0)]]


def child_ui(endpoint: str, ranks: int, seconds: float) -> None:
    """In the child: the relay's one subscriber, the per-rank stores and the app."""
    from neurotop.tui.data.client import Endpoints, LiveClient
    from neurotop.tui.data.store import RunStore
    from neurotop.tui.screens.app import NeurotopApp

    stores: dict[int, RunStore] = {0: RunStore()}
    counts = {"msgs": 0, "bytes": 0, "gaps": 0}
    last_seq: dict[int, int] = {}
    halt = threading.Event()

    def receive() -> None:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100000)
        sub.subscribe(b"")
        sub.connect(endpoint)
        while not halt.is_set():
            if not sub.poll(50):
                continue
            for _ in range(1000):
                try:
                    frames = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = wire.decode(frames)
                rank = msg.header["rank"]
                seq = msg.header["seq"]
                counts["gaps"] += max(0, seq - last_seq.get(rank, seq - 1) - 1)
                last_seq[rank] = seq
                counts["msgs"] += 1
                counts["bytes"] += sum(len(f) for f in frames)
                stores.setdefault(rank, RunStore()).ingest(msg)
        sub.close(0)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    client = LiveClient(Endpoints(telemetry=endpoint), store=stores[0])  # not started
    app = NeurotopApp(client, read_only=True)
    frames: list[float] = []
    aggs: list[float] = []

    async def run() -> None:
        async with app.run_test(size=(200, 60)) as pilot:
            deadline = time.monotonic() + 60  # every rank's schema and a report
            while time.monotonic() < deadline and (
                    sum(s.latest_block() is not None for s in list(stores.values())) < ranks):
                await asyncio.sleep(0.2)
            c0, w0, m0, b0 = os.times(), time.monotonic(), counts["msgs"], counts["bytes"]
            while time.monotonic() < w0 + seconds:
                await asyncio.sleep(FRAME_S)
                t = time.thread_time()
                aggregate(dict(stores))
                aggs.append((time.thread_time() - t) * 1000)
                app.redraw(force=True)
                await pilot.pause()
                frames.append((time.thread_time() - t) * 1000)
            c1, w1 = os.times(), time.monotonic()
            cpu = 100 * ((c1.user - c0.user) + (c1.system - c0.system)) / (w1 - w0)
            seen = sum(s.latest_block() is not None for s in list(stores.values()))
            print(f"RESULT ranks_seen={seen} frame_p50={statistics.median(frames):.2f}"
                  f" frame_p95={float(np.percentile(frames, 95)):.2f}"
                  f" agg_p50={statistics.median(aggs):.2f} cpu={cpu:.1f}"
                  f" msgs_s={(counts['msgs'] - m0) / (w1 - w0):.0f}"
                  f" bytes_s={(counts['bytes'] - b0) / (w1 - w0):.0f} gaps={counts['gaps']}",
                  flush=True)

    asyncio.run(run())
    halt.set()
    thread.join(2)


def simulate(n: int, rate: float, layers: int, seconds: float) -> dict[str, float]:
    """N ranks and the relay here, the UI in a child; the child's figures and the relay's."""
    from neurotop.protocol import connfile
    from neurotop.service.relay import Relay

    ctx = zmq.Context.instance()
    host = socket.gethostname()
    socks = []
    for rank in range(n):
        s = ctx.socket(zmq.PUB)
        s.setsockopt(zmq.SNDHWM, 10000)
        s.setsockopt(zmq.LINGER, 0)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        connfile.write(connfile.ConnectionInfo(
            run_id=RUN_ID, name="bench", pid=os.getpid(), start_time=time.time(),
            telemetry=f"tcp://127.0.0.1:{port}", control="tcp://127.0.0.1:1", key="",
            host=host, rank=rank, world_size=n, local_rank=rank))
        socks.append(s)
    relay = Relay(RUN_ID, host=host)
    relay.start()
    child = subprocess.Popen([sys.executable, __file__, "--child-ui", relay.endpoint,
                              "--ranks", str(n), "--seconds", str(seconds)],
                             stdout=subprocess.PIPE, text=True)
    rng = np.random.default_rng(0)
    sch = schema(layers)
    seq = [0] * n
    sample = report(rng, layers, 1)
    report_bytes = sum(len(f) for h, a in sample for f in wire.encode(dict(h), a))
    tick = 0.25  # s: heartbeats every 2 ticks (0.5 s), reports every 1/rate s
    every = max(1, round(1 / (rate * tick)))
    t0 = time.monotonic()
    ticks = 0
    cpu0 = None
    try:
        while child.poll() is None:
            # every rank in one burst per tick: burstier than real ranks, whose steps spread
            for rank, s in enumerate(socks):
                msgs = []
                if ticks % 20 == 0:  # the schema every 5 s
                    msgs.append((dict(sch), []))
                if ticks % every == 0:
                    msgs += report(rng, layers, ticks // every + 1)
                if ticks % 2 == 0:
                    msgs.append(({"kind": "heartbeat", "step": ticks // every,
                                  "state": "running", "paused_at": None, "steps_per_s": rate,
                                  "dropped": 0}, []))
                for h, arrays in msgs:
                    h.update(run=RUN_ID, rank=rank, seq=seq[rank], t=time.time())
                    seq[rank] += 1
                    s.send_multipart(wire.encode(h, arrays))
            ticks += 1
            if cpu0 is None and ticks * tick > 8:  # past the child's start
                cpu0, w0 = relay_cpu_s(relay.native_id), time.monotonic()
            time.sleep(max(0.0, t0 + ticks * tick - time.monotonic()))
        out = child.stdout.read()
        relay_pct = (100 * (relay_cpu_s(relay.native_id) - cpu0) / (time.monotonic() - w0)
                     if cpu0 is not None else float("nan"))
    finally:
        relay.stop()
        for s in socks:
            s.close(0)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), "")
    if not line:
        raise SystemExit(f"the UI child printed no result: {out!r}")
    got = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    lag = time.monotonic() - t0 - ticks * tick
    got.update(relay_cpu=relay_pct, report_bytes=report_bytes, sender_lag_s=max(0.0, lag))
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="64,256")
    ap.add_argument("--rate", type=float, default=2.0, help="reports/s per rank")
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--child-ui")
    a = ap.parse_args()
    if a.child_ui:
        return child_ui(a.child_ui, int(a.ranks), a.seconds)
    results = {}
    for n in (int(x) for x in a.ranks.split(",")):
        with tempfile.TemporaryDirectory(prefix="ntop-bench-") as d:
            os.environ["NEUROTOP_RUNTIME_DIR"] = d
            r = results[n] = simulate(n, a.rate, a.layers, a.seconds)
        print(f"ranks={n}: {r['msgs_s']:.0f} msgs/s, {r['bytes_s'] / 1e6:.2f} MB/s into the UI"
              f" ({r['report_bytes']:.0f} B per report per rank, {a.layers} layers);"
              f" frame CPU p50 {r['frame_p50']:.1f} ms, p95 {r['frame_p95']:.1f} ms"
              f" (all-ranks aggregate {r['agg_p50']:.2f} ms over {r['ranks_seen']:.0f} ranks);"
              f" UI CPU {r['cpu']:.1f} % of a core; relay thread {r['relay_cpu']:.1f} %;"
              f" seq gaps {r['gaps']:.0f}; the simulator ran {r['sender_lag_s']:.1f} s late",
              flush=True)
    n = max(results)
    print(f"ranks={n} frame_ms_p50={results[n]['frame_p50']:.1f} cpu_pct={results[n]['cpu']:.1f}")


if __name__ == "__main__":
    main()
