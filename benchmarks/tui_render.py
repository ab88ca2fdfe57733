"""The dashboard's speed and memory: frame time, CPU while following a live stream,
resident memory after 1M steps, cold start to the first frame.

    python benchmarks/tui_render.py [--layers 200] [--steps 100000] [--seconds 10]

1. Frame time: the real app (headless ``run_test``) over a live store holding ``--steps``
   steps of ``--layers`` layers x 12 statistics, 8 parameters and histograms; before each
   frame one new report arrives, then the visible screen redraws and Textual paints: the
   UI thread's CPU time from the redraw until the paint. Every screen in turn; median and
   p95 over all frames. The same frames driven by the test pilot are shown apart (its
   ``pause()`` adds a few ms of waiting on every widget's queue to each frame).
2. CPU: a child process runs the real ``LiveClient`` + app (headless) subscribed to a
   synthetic PUB on loopback sending 20 reports/s of that shape (plus heartbeats, like an
   agent); its CPU time over ``--seconds`` of following, from ``os.times`` in the child.
3. Memory: a child ingests 1M steps into a live store (compacted past, bounded) and
   reports its resident set (VmRSS).
4. Cold start: a child process that starts the app and exits after its first frame;
   wall time from spawn to exit, median of 3.
5. ``neurotop demo``'s first frame: the real command in a real terminal (tmux, 120x40),
   from spawn until the pane shows the status bar (``STARTING`` while the demo still
   imports torch, or ``LIVE``), median of 3; needs tmux.

Last line: ``frame_ms_p50=A frame_ms_p95=B cpu_pct=C rss_mb_1m=D cold_start_s=E
demo_first_frame_s=F``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neurotop.protocol import wire

ROOT = Path(__file__).resolve().parent.parent

STATS = ["mean", "std", "rms", "max_abs", "massive_ratio", "kurtosis", "zero_frac",
         "near_zero_frac", "dead_frac", "dead_frac_window", "nonfinite", "grad_rms"]
PARAM_STATS = ["grad_norm", "grad_max_abs", "weight_norm", "update_ratio", "nlm_cos"]
SCALARS = ["loss", "grad_norm", "first_nonfinite", "lr", "steps_per_s", "samples_per_s",
           "mem_host"]
EDGES = (10.0 ** np.arange(-6, 3, 0.5)).tolist()
EDGES = [-e for e in EDGES[::-1]] + EDGES


def schema(layers: int) -> dict:
    names = [f"model.blocks.{i // 4}.{('attn', 'mlp', 'norm', 'proj')[i % 4]}"
             for i in range(layers)]
    return {"kind": "schema", "schema_id": 1, "run_name": "bench", "layers": names,
            "layer_types": ["Linear"] * layers, "blocks": [], "stats": STATS,
            "scalars": SCALARS, "params": [f"p{i}.weight" for i in range(8)],
            "param_stats": PARAM_STATS, "hist_layers": names[:4], "hist_edges": EDGES,
            "hist_every": 10, "run": "bench", "rank": 0}


def report(rng: np.random.Generator, layers: int, step: int) -> list[tuple[dict, list]]:
    """One report as the agent publishes it: the stats message, then the params message."""
    block = rng.random((layers, len(STATS)), np.float32)
    scalars = np.array([3 * np.exp(-step / 3e4) + rng.random() * 0.1, 1.0, np.nan, 1e-3,
                        20.0, 640.0, 1e9], np.float32)
    return [({"kind": "stats", "step": step, "schema_id": 1}, [block, scalars]),
            ({"kind": "params", "step": step, "schema_id": 1},
             [rng.random((8, len(PARAM_STATS)), np.float32) * 2e-3])]


def filled_store(layers: int, steps: int):
    from neurotop.tui.data.store import RunStore
    store = RunStore()
    store.ingest_schema(schema(layers))
    rng = np.random.default_rng(0)
    chunk = 2048
    for a in range(0, steps, chunk):
        n = min(chunk, steps - a)
        store.ingest_stats_bulk(np.arange(a + 1, a + n + 1), rng.random(
            (n, layers, len(STATS)), np.float32), rng.random((n, len(SCALARS)), np.float32))
    hist = rng.random((4, len(EDGES) + 1), np.float32)
    for s in range(0, 256):
        store.ingest(wire.Message({"kind": "hist", "step": steps - 2560 + 10 * s},
                                  [hist, hist]))
    return store


#: Wall seconds a frame is given to be redrawn and painted (a few ms of work; the rest is
#: idle waiting, which costs the thread no CPU).
SETTLE_S = 0.1


def frame_times(layers: int, steps: int, frames: int
                ) -> tuple[list[float], list[float], list[float]]:
    """Per frame: CPU milliseconds of the UI thread from the redraw until Textual has
    painted it (the work a frame costs: the thread's CPU over a ``SETTLE_S`` window, longer
    while the screen still has widgets to paint), and two figures of the same frame driven
    by the test pilot: its CPU and wall time until ``pilot.pause()`` returns. The pilot
    also waits on the message queue of each of the ~45 widgets, a few milliseconds of test
    harness per frame that no terminal pays, so it is shown apart, not as the frame's."""
    from neurotop.tui.data.client import Endpoints, LiveClient
    from neurotop.tui.screens.app import NeurotopApp

    store = filled_store(layers, steps)
    client = LiveClient(Endpoints(telemetry="tcp://127.0.0.1:9"), store=store)  # not started
    app = NeurotopApp(client, read_only=True)
    rng = np.random.default_rng(1)
    times: list[float] = []
    piloted: list[float] = []
    walls: list[float] = []

    def new_report(step: int) -> None:
        for h, arrays in report(rng, layers, step):
            store.ingest(wire.Message(h, arrays))

    async def run() -> None:
        async with app.run_test(size=(200, 60)) as pilot:
            step = steps
            for key in ("1", "2", "3", "4"):
                await pilot.press(key)
                await pilot.pause()
                for _ in range(frames):
                    step += 1
                    new_report(step)
                    t = time.thread_time()
                    app.redraw()
                    await asyncio.sleep(SETTLE_S)
                    for _ in range(20):  # not painted yet (a loaded machine): wait on
                        if not getattr(app.screen, "_dirty_widgets", None):
                            break
                        await asyncio.sleep(SETTLE_S)
                    times.append((time.thread_time() - t) * 1000)
                    step += 1
                    new_report(step)
                    t, w = time.thread_time(), time.perf_counter()
                    app.redraw()
                    await pilot.pause()
                    piloted.append((time.thread_time() - t) * 1000)
                    walls.append((time.perf_counter() - w) * 1000)

    asyncio.run(run())
    return times, piloted, walls


def child_follow(endpoint: str, seconds: float) -> None:
    """In the child: the real client and app, headless, following the stream."""
    from neurotop.tui.data.client import Endpoints, LiveClient
    from neurotop.tui.screens.app import NeurotopApp

    client = LiveClient(Endpoints(telemetry=endpoint)).start()
    app = NeurotopApp(client, read_only=True)

    async def run() -> None:
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause(3.0)  # connect, get the schema, first frames
            await pilot.press("1")
            c0, w0 = os.times(), time.monotonic()
            await asyncio.sleep(seconds)
            c1, w1 = os.times(), time.monotonic()
            cpu = (c1.user - c0.user) + (c1.system - c0.system)
            print(f"CPU {100 * cpu / (w1 - w0):.1f} rows {len(client.store.steps())}",
                  flush=True)

    asyncio.run(run())
    client.close()


def cpu_following(layers: int, seconds: float) -> float:
    import zmq
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    child = subprocess.Popen([sys.executable, __file__, "--child-follow",
                              f"tcp://127.0.0.1:{port}", "--seconds", str(seconds)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    rng = np.random.default_rng(2)
    seq, step, sch = 0, 0, schema(layers)
    next_t = time.monotonic()
    try:
        while child.poll() is None:
            step += 1
            msgs = report(rng, layers, step)
            if step % 10 == 1:
                msgs.append((dict(sch), []))
                msgs.append(({"kind": "heartbeat", "step": step, "state": "running",
                              "paused_at": None, "steps_per_s": 20.0, "dropped": 0}, []))
            for h, arrays in msgs:
                h.update(run="bench", rank=0, seq=seq, t=time.time())
                seq += 1
                pub.send_multipart(wire.encode(h, arrays))
            next_t += 1 / 20
            time.sleep(max(0.0, next_t - time.monotonic()))
        out = child.stdout.read()
    finally:
        pub.close(0)
        ctx.term()
    line = next((ln for ln in out.splitlines() if ln.startswith("CPU ")), "")
    if not line:
        raise SystemExit(f"the following child printed no CPU figure: {out!r}")
    print(f"  following 20 reports/s: {line}")
    return float(line.split()[1])


def child_memory(layers: int, steps: int) -> None:
    store = filled_store(layers, steps)
    rss = next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
               if ln.startswith("VmRSS:"))
    print(f"RSS {rss / 1024:.1f} store {store.memory_bytes() / 2**20:.1f} "
          f"res {store.summary.res}", flush=True)


def child_cold() -> None:
    from neurotop.tui.data.client import Endpoints, LiveClient
    from neurotop.tui.screens.app import NeurotopApp

    app = NeurotopApp(LiveClient(Endpoints(telemetry="tcp://127.0.0.1:9")), read_only=True)
    app.call_after_refresh(app.exit)
    app.run(headless=True)


def demo_first_frame() -> float:
    """Seconds from starting ``neurotop demo`` in tmux to its first drawn status bar."""
    if shutil.which("tmux") is None or shutil.which("neurotop") is None:
        print("  demo first frame: skipped (needs tmux and the neurotop command)")
        return float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NEUROTOP_RUNTIME_DIR=f"{tmp}/rt", NEUROTOP_RUNS_DIR=f"{tmp}/runs")
        sock = f"neurotop-bench-{os.getpid()}"

        def tmux(*args: str) -> str:
            return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                                  env=env, timeout=20).stdout
        try:
            t = time.perf_counter()
            tmux("new-session", "-d", "-s", "ui", "-x", "120", "-y", "40", "neurotop", "demo")
            while time.perf_counter() - t < 60:
                screen = tmux("capture-pane", "-p", "-t", "ui")
                if " STARTING " in screen or " LIVE " in screen:
                    return time.perf_counter() - t
                time.sleep(0.02)
            return float("nan")
        finally:
            tmux("send-keys", "-t", "ui", "q")
            time.sleep(1)
            tmux("kill-server")


def run_child(*args: str) -> str:
    return subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--frames", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--child-follow")
    ap.add_argument("--child-memory", action="store_true")
    ap.add_argument("--child-cold", action="store_true")
    a = ap.parse_args()
    if a.child_follow:
        return child_follow(a.child_follow, a.seconds)
    if a.child_memory:
        return child_memory(a.layers, 1_000_000)
    if a.child_cold:
        return child_cold()

    times, piloted, walls = frame_times(a.layers, a.steps, a.frames)
    p50, p95 = statistics.median(times), float(np.percentile(times, 95))
    print(f"frames: {len(times)} over 4 screens at 200x60, {a.layers} layers x {len(STATS)}"
          f" stats, {a.steps:,} steps: CPU p50 {p50:.1f} ms, p95 {p95:.1f} ms, max "
          f"{max(times):.1f} ms")
    print(f"  driven by the test pilot (+ its waits on every widget): CPU p50 "
          f"{statistics.median(piloted):.1f} ms, p95 {np.percentile(piloted, 95):.1f} ms;"
          f" wall until idle p50 {statistics.median(walls):.1f} ms")
    for i, name in enumerate(("overview", "layers", "detail", "gradients")):
        part = slice(i * a.frames, (i + 1) * a.frames)
        print(f"  {name:<10} CPU p50 {statistics.median(times[part]):.1f} ms, p95 "
              f"{np.percentile(times[part], 95):.1f} ms (with the pilot "
              f"{statistics.median(piloted[part]):.1f} ms)")
    cpu = cpu_following(a.layers, a.seconds)
    mem = run_child("--child-memory", "--layers", str(a.layers)).split()
    print(f"  1M steps, {a.layers} layers: RSS {mem[1]} MB (series {mem[3]} MB, oldest "
          f"buckets cover {mem[5]} steps)")
    colds = []
    for _ in range(3):
        t = time.perf_counter()
        run_child("--child-cold")
        colds.append(time.perf_counter() - t)
    cold = statistics.median(colds)
    print(f"  cold start to first frame: {', '.join(f'{c:.2f}' for c in colds)} s")
    demos = [demo_first_frame() for _ in range(3)]
    demo = statistics.median(demos)
    print(f"  neurotop demo to its first frame: {', '.join(f'{d:.2f}' for d in demos)} s")
    print(f"frame_ms_p50={p50:.1f} frame_ms_p95={p95:.1f} cpu_pct={cpu:.1f} "
          f"rss_mb_1m={float(mem[1]):.0f} cold_start_s={cold:.2f} demo_first_frame_s={demo:.2f}")


if __name__ == "__main__":
    main()
