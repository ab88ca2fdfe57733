"""Session files for tests, written with the real writer and wire encoding, shaped like a
run's: a schema first and re-sent, stats per step, heartbeats, command acks and alerts; and
what a real run recorded, read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import MESSAGE, SessionReader, SessionWriter, split_frames


class SessionBuilder:
    """Writes messages as the agent publishes them; keeps every message's frames."""

    def __init__(self, path: Path, *, index_every: int = 16, run_id: str = "run-test",
                 name: str = "synthetic", t0: float = 1_700_000_000.0) -> None:
        self.writer = SessionWriter(path, {"run_id": run_id, "name": name, "start_time": t0},
                                    index_every=index_every)
        self.run_id, self.t0 = run_id, t0
        self.seq = 0
        self.messages: list[list[bytes]] = []
        self.offsets: list[int] = []

    def put(self, header: dict, arrays: tuple = (), *, t: float) -> None:
        header.update(run=self.run_id, rank=0, seq=self.seq, t=t)
        self.seq += 1
        frames = wire.encode(header, arrays)
        self.messages.append(frames)
        step = header.get("step")
        self.offsets.append(self.writer.write_message(
            frames, kind=header["kind"], step=-1 if step is None else step, t=t))

    def close(self) -> None:
        self.writer.close({"dropped": 0})


def layer_names(n: int) -> list[str]:
    return [f"net.{i}" for i in range(n)]


def write_run(path: Path, steps: int, *, layers: int = 3, seed: int = 0,
              index_every: int = 16, extra_scalar_at: int | None = None,
              relayer_at: int | None = None, events_every: int = 0,
              close: bool = True) -> SessionBuilder:
    """A run of ``steps`` steps at 20 steps/s. ``extra_scalar_at``: a user scalar appears
    then (the schema grows); ``relayer_at``: the layers change then (new layout);
    ``events_every``: a pause ack, a resume ack and an alert every so many steps."""
    rng = np.random.default_rng(seed)
    b = SessionBuilder(path, index_every=index_every)
    stats = ["mean", "std", "max_abs", "zero_frac"]
    scalars = ["loss", "grad_norm", "lr"]
    n_layers = layers
    for s in range(1, steps + 1):
        t = b.t0 + s / 20
        changed = False
        if extra_scalar_at == s:
            scalars = ["loss", "grad_norm", "acc", "lr"]
            changed = True
        if relayer_at == s:
            n_layers = layers + 2
            changed = True
        if s == 1 or s % 25 == 0 or changed:
            b.put({"kind": "schema", "schema_id": len(scalars), "run_name": "synthetic",
                   "layers": layer_names(n_layers), "stats": stats, "scalars": scalars},
                  t=t)
        block = rng.standard_normal((n_layers, len(stats))).astype(np.float32)
        block[0, 1] = np.nan if s % 17 == 0 else block[0, 1]
        vec = rng.standard_normal(len(scalars)).astype(np.float32)
        b.put({"kind": "stats", "step": s, "wall": t, "schema_id": len(scalars),
               "dropped": 0}, (block, vec), t=t)
        if s % 5 == 0:
            b.put({"kind": "heartbeat", "step": s, "state": "running", "paused_at": None,
                   "steps_per_s": 20.0, "dropped": 0, "rec_dropped": s // 50,
                   "control": ""}, t=t)
        if events_every and s % events_every == 0:
            for cmd, new in (("pause", "paused"), ("resume", "running")):
                b.put({"kind": "event", "event": "ack", "id": f"{cmd}{s}", "cmd": cmd,
                       "args": {}, "ok": True, "step": s, "old": None, "new": new,
                       "state": new, "paused_at": s if new == "paused" else None,
                       "error": None, "sender": "test"}, t=t)
            b.put({"kind": "event", "event": "alert", "alert": "dying_layer", "rule": "E2",
                   "level": "warn", "message": "layer 'net.0': 62% of units dead over the"
                   " window", "layer": "net.0", "value": 0.62, "step": s}, t=t)
    if close:
        b.close()
    return b


DASH_STATS = ["mean", "std", "max_abs", "massive_ratio", "dead_frac", "nonfinite"]
DASH_PARAM_STATS = ["grad_norm", "grad_max_abs", "weight_norm", "update_ratio"]


def write_dashboard_run(path: Path, steps: int, *, layers: int = 8,
                        hist_every: int = 10) -> SessionBuilder:
    """A run as the statistics engine reports it, with something for every screen to show:
    one layer dying (a ReLU whose dead fraction climbs to 1), one with a massive activation,
    a NaN late on, per-parameter statistics with one update ratio far too large, and
    histograms every ``hist_every`` steps. Deterministic (seeded, fixed times)."""
    rng = np.random.default_rng(7)
    b = SessionBuilder(path)
    names = layer_names(layers)
    params = [f"{n}.weight" for n in names[: min(layers, 6)]]
    edges = (10.0 ** np.arange(-3, 2)).tolist()
    edges = [-e for e in edges[::-1]] + edges
    scalars = ["loss", "grad_norm", "lr", "steps_per_s"]
    dying, massive = layers // 2, 1
    types = ["Linear"] * layers
    types[dying] = "ReLU"  # dead fractions are judged on activations only
    for s in range(1, steps + 1):
        t = b.t0 + s / 20
        if s == 1 or s % 50 == 0:
            b.put({"kind": "schema", "schema_id": 1, "run_name": "dashboard",
                   "layers": names, "layer_types": types, "blocks": [],
                   "stats": DASH_STATS, "scalars": scalars, "params": params,
                   "param_stats": DASH_PARAM_STATS, "hist_layers": names[:2],
                   "hist_edges": edges, "hist_every": hist_every}, t=t)
        frac = s / steps
        block = np.abs(rng.normal(0.5, 0.1, (layers, len(DASH_STATS)))).astype(np.float32)
        block[:, 4] = 0.05 + 0.02 * rng.random(layers)
        block[dying, 4] = min(1.0, 0.05 + 1.2 * frac)
        block[:, 5] = 0
        block[massive, 2], block[massive, 3] = 150.0, 2000.0 * frac
        if s == steps - 3:
            block[layers - 1, 5] = 4
        vec = np.array([2.5 * np.exp(-3 * frac) + 0.05 * rng.random(), 1 + rng.random(),
                        1e-3 * (1 - 0.5 * frac), 20.0], np.float32)
        p = np.abs(rng.normal(1.0, 0.2, (len(params), len(DASH_PARAM_STATS)))).astype(
            np.float32)
        p[:, 3] = 1e-3 * (0.5 + rng.random(len(params)))
        p[0, 3] = 0.05
        b.put({"kind": "stats", "step": s, "wall": t, "schema_id": 1, "dropped": 0},
              (block, vec), t=t)
        b.put({"kind": "params", "step": s, "schema_id": 1}, (p,), t=t)
        if hist_every and s % hist_every == 0:
            centre = 5 + int(3 * frac)
            hist = np.zeros((2, len(edges) + 1), np.float32)
            hist[:, centre - 1: centre + 2] = [[10, 40, 10], [5, 30 + s % 7, 20]]
            b.put({"kind": "hist", "step": s, "schema_id": 1}, (hist, hist * 2), t=t)
        if s % 5 == 0:
            b.put({"kind": "heartbeat", "step": s, "state": "running", "paused_at": None,
                   "steps_per_s": 20.0, "dropped": 0, "rec_dropped": 0, "control": ""},
                  t=t)
        if s == steps // 2:
            b.put({"kind": "event", "event": "alert", "alert": "dying_layer", "rule": "E2",
                   "level": "critical", "message": f"layer {names[dying]!r}: 94% of units"
                   " dead over the window", "layer": names[dying], "value": 0.94, "step": s},
                  t=t)
    b.close()
    return b


def recorded_headers(path: Path) -> list[dict]:
    """The header of every message a run recorded, in the order it published them."""
    with SessionReader(path) as r:
        return [wire.decode(split_frames(rec.body)).header for rec in r.records()
                if rec.type == MESSAGE]
