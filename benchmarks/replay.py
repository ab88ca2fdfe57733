"""Replay of a long recording: open to first frame, seek, peak memory.

Builds a synthetic session of ``--steps`` steps x ``--layers`` layers (100k x 100 by
default; ``--stats`` statistics per layer, 4 as the agent sends today) with the real
``SessionWriter`` and wire encoding, shaped like a run reporting 20 steps/s: a schema
every 100 steps, a heartbeat every 10, pause/resume acks and alerts now and then. Then,
in a fresh process (building must not count towards its memory), it opens the file in
the real replay app, headless (``App.run_test``), and measures:

- ``open_s``: from opening the file to the first frame drawn with the whole history
  (the app draws on its 8 Hz timer, so this includes waiting for the next tick);
- ``seek_ms``: median over random steps of asking the replay to seek there until the
  store shows that step, plus redrawing every widget once (the timer's wait for its
  next tick, at most 125 ms, is not counted);
- ``peak_rss_mb``: the measuring process's peak resident memory.

    python benchmarks/replay.py            # last line: open_s=X seek_ms=Y peak_rss_mb=Z
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import SessionWriter

HZ = 20.0


def build(path: Path, steps: int, layers: int, stats: int) -> None:
    """A session file shaped like a real run's, written with the real writer."""
    t0 = time.time() - steps / HZ
    names = [f"blocks.{i}.mlp.fc{i % 2}" for i in range(layers)]
    stat_names = ["mean", "std", "max_abs", "zero_frac", "rms", "massive_ratio",
                  "near_zero_frac", "dead_frac", "nonfinite"][:stats]
    stat_names += [f"stat{i}" for i in range(len(stat_names), stats)]
    schema = {"schema_id": 0, "run_name": "bench", "layers": names, "stats": stat_names,
              "scalars": ["loss", "grad_norm", "lr"], "report_every": 1}
    w = SessionWriter(path, {"run_id": "bench", "name": "bench", "start_time": t0})
    rng = np.random.default_rng(0)
    base = rng.standard_normal((layers, stats)).astype(np.float32)
    seq = 0

    def put(header: dict, arrays: tuple = (), step: int = -1, t: float = 0.0) -> None:
        nonlocal seq
        header.update(run="bench", rank=0, seq=seq, t=t)
        seq += 1
        w.write_message(wire.encode(header, arrays), kind=header["kind"], step=step, t=t)

    for s in range(1, steps + 1):
        t = t0 + s / HZ
        if s % 100 == 1:
            put({"kind": "schema", **schema}, t=t)
        block = base * np.float32(1 + 1e-5 * s)
        scalars = np.array([2.0 / (1 + 1e-4 * s), 1.0 + 0.1 * np.sin(s / 50), 3e-4],
                           np.float32)
        put({"kind": "stats", "step": s, "wall": t, "schema_id": 0, "dropped": 0},
            (block, scalars), s, t)
        if s % 10 == 0:
            put({"kind": "heartbeat", "step": s, "state": "running", "paused_at": None,
                 "steps_per_s": HZ, "dropped": 0, "rec_dropped": 0, "control": ""}, step=s, t=t)
        if s % 20000 in (0, 10):
            cmd, new = ("pause", "paused") if s % 20000 == 0 else ("resume", "running")
            put({"kind": "event", "event": "ack", "id": f"c{s}", "cmd": cmd, "args": {},
                 "ok": True, "step": s, "old": None, "new": new, "state": new,
                 "paused_at": s if new == "paused" else None, "error": None,
                 "sender": "bench"}, step=s, t=t)
        if s % 33333 == 0:
            put({"kind": "event", "event": "alert", "alert": "dead_units", "layer": names[0],
                 "step": s}, step=s, t=t)
    w.close({"dropped": 0})


async def measure(path: Path, seeks: int) -> tuple[float, float]:
    from neurotop.tui.data.replay_source import ReplaySource
    from neurotop.tui.screens.replay_app import ReplayApp
    from neurotop.tui.screens.widgets import LayerTable

    t0 = time.perf_counter()
    source = ReplaySource(path).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            table = app.query_one(LayerTable)
            await pilot.press("2")  # the layers screen: its table shows the loaded rows
            while not (app._drawn and app._drawn[0] == app.store.version and table.row_count):
                await pilot.pause(0.01)
            open_s = time.perf_counter() - t0
            rng = np.random.default_rng(1)
            tl = source.timeline()
            times = []
            for target in rng.integers(tl.first_step, tl.last_step, seeks):
                await pilot.pause(0.2)  # let the previous frame reach the screen
                t1 = time.perf_counter()
                shown = await asyncio.wrap_future(source.seek_step(int(target)))
                app.redraw(force=True)
                assert shown.step == target == app.store.status.step
                times.append(time.perf_counter() - t1)
            return open_s, statistics.median(times) * 1e3
    finally:
        source.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--stats", type=int, default=4)
    p.add_argument("--seeks", type=int, default=15)
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        open_s, seek_ms = asyncio.run(measure(args.measure, args.seeks))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"open_s={open_s:.2f} seek_ms={seek_ms:.1f} peak_rss_mb={rss:.0f}")
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "session.ntop"
        t = time.perf_counter()
        build(path, args.steps, args.layers, args.stats)
        print(f"built {args.steps} steps x {args.layers} layers x {args.stats} stats:"
              f" {path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s",
              flush=True)
        out = subprocess.run([sys.executable, __file__, "--measure", str(path),
                              "--seeks", str(args.seeks)], capture_output=True,
                             text=True, check=False)
        if out.returncode:
            sys.exit(f"measuring failed:\n{out.stderr[-3000:]}")
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
