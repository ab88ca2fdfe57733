"""What overlaying recorded runs costs the live frame (``neurotop attach --compare``).

    python benchmarks/late_attach.py [--layers 100] [--steps 10000] [--runs 2] [--frames 15]

Writes ``--runs`` recordings of ``--steps`` steps (the real ``SessionWriter`` and wire
encoding; the schema and reports of ``tui_render.py``: ``--layers`` layers x 12
statistics), loads them as ``attach --compare`` does, and fills a live store with as many
steps. Then the real app (headless ``run_test``, 200x60) redraws once per new live report,
on the overview, layers and detail screens, first as a plain attach (``NeurotopApp``) and
then with the recordings overlaid (``LiveCompareApp``). A frame's cost is the UI thread's
CPU time for the redraw and Textual's paint (as in ``tui_render.py``).

Last line: ``plain_ms_p50=A plain_ms_p95=B overlay_ms_p50=C overlay_ms_p95=D
overlay_frame_ms_p50=E load_s=F`` (``overlay_frame_ms``: ``LiveComparison.frame`` alone, the
overview's ``Wants``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tui_render import SCALARS, STATS, filled_store, report, schema  # noqa: E402

from neurotop.protocol import wire  # noqa: E402
from neurotop.protocol.sessionfile import SessionWriter  # noqa: E402


def record(path: Path, layers: int, steps: int, seed: int) -> None:
    """A recording of ``steps`` reports, one per step, a heartbeat every 10."""
    rng = np.random.default_rng(seed)
    t0 = time.time() - steps / 20
    w = SessionWriter(path, {"run_id": f"rec{seed}", "name": f"rec{seed}", "start_time": t0})
    seq = 0

    def put(h: dict, arrays: tuple | list = (), step: int = -1) -> None:
        nonlocal seq
        t = t0 + max(step, 0) / 20
        h.update(run=f"rec{seed}", rank=0, seq=seq, t=t)
        seq += 1
        w.write_message(wire.encode(h, tuple(arrays)), kind=h["kind"], step=step, t=t)

    put({k: v for k, v in schema(layers).items() if k not in ("run", "rank")})
    for s in range(1, steps + 1):
        for h, arrays in report(rng, layers, s):
            put(h, arrays, s)
        if s % 10 == 0:
            put({"kind": "heartbeat", "step": s, "state": "running", "paused_at": None,
                 "steps_per_s": 20.0, "dropped": 0, "run_name": f"rec{seed}"}, (), s)
    w.close({"dropped": 0}, t=t0 + steps / 20)


def frame_ms(make_app, store, layers: int, steps: int, frames: int
             ) -> dict[str, list[float]]:
    """CPU milliseconds per frame, by screen (after two unmeasured frames on each)."""
    rng = np.random.default_rng(1)
    app = make_app()
    times: dict[str, list[float]] = {}

    async def run() -> None:
        async with app.run_test(size=(200, 60)) as pilot:
            step = steps
            for key in ("1", "2", "3"):
                await pilot.press(key)
                await pilot.pause()
                for k in range(frames + 2):
                    step += 1
                    for h, arrays in report(rng, layers, step):
                        store.ingest(wire.Message(h, arrays))
                    t = time.thread_time()
                    app.redraw()
                    await pilot.pause()
                    if k >= 2:
                        times.setdefault(key, []).append((time.thread_time() - t) * 1000)

    asyncio.run(run())
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--frames", type=int, default=15)
    a = p.parse_args()

    from neurotop.tui.data.client import Endpoints, LiveClient
    from neurotop.tui.data.live_compare import LiveComparison
    from neurotop.tui.data.replay_source import ReplaySource
    from neurotop.tui.data.view import View
    from neurotop.tui.screens.app import NeurotopApp
    from neurotop.tui.screens.dashboard import OverviewPane
    from neurotop.tui.screens.live_compare_app import LiveCompareApp

    with tempfile.TemporaryDirectory() as d:
        paths = [Path(d) / f"rec{i}.ntop" for i in range(a.runs)]
        for i, path in enumerate(paths):
            record(path, a.layers, a.steps, seed=10 + i)
        t = time.perf_counter()
        sources = [ReplaySource(path) for path in paths]
        for s in sources:
            s.load()
        load_s = time.perf_counter() - t
        print(f"  {a.runs} recordings of {a.steps:,} steps x {a.layers} layers x {len(STATS)}"
              f" stats ({len(SCALARS)} scalars) loaded in {load_s:.2f} s")

        store = filled_store(a.layers, a.steps)
        client = LiveClient(Endpoints(telemetry="tcp://127.0.0.1:9"), store=store)
        plain = frame_ms(lambda: NeurotopApp(client, read_only=True), store, a.layers,
                         a.steps, a.frames)
        cmp = LiveComparison(store, sources)
        over = frame_ms(lambda: LiveCompareApp(client, sources, read_only=True), store,
                        a.layers, a.steps + 3 * (a.frames + 2), a.frames)
        wants = OverviewPane().wants(View())
        cmp.frame(wants)  # the recordings' series for these wants, copied once
        alone, own = [], []
        for _ in range(50):
            t = time.thread_time()
            cmp.frame(wants)
            alone.append((time.thread_time() - t) * 1000)
            t = time.thread_time()
            store.frame(wants)
            own.append((time.thread_time() - t) * 1000)
        for s in sources:
            s.close()

    def q(v: list[float], f: float) -> float:
        return float(np.quantile(v, f))
    for key, name in (("1", "overview"), ("2", "layers"), ("3", "detail")):
        print(f"  {name:<9} plain {statistics.median(plain[key]):5.1f} ms/frame,"
              f" with {a.runs} overlays {statistics.median(over[key]):5.1f}")
    print(f"  the overview's frame data: the live store's {statistics.median(own):.2f} ms,"
          f" with the overlays (LiveComparison.frame) {statistics.median(alone):.2f} ms")
    plain = [v for vs in plain.values() for v in vs]
    over = [v for vs in over.values() for v in vs]
    print(f"plain_ms_p50={statistics.median(plain):.1f} plain_ms_p95={q(plain, .95):.1f}"
          f" overlay_ms_p50={statistics.median(over):.1f} overlay_ms_p95={q(over, .95):.1f}"
          f" overlay_frame_ms_p50={statistics.median(alone):.2f} load_s={load_s:.2f}")


if __name__ == "__main__":
    main()
