"""Session files for tests, written with the real writer and wire encoding, shaped like a
run's: a schema first and re-sent, stats per step, heartbeats, command acks and alerts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent import wire
from agent.sessionfile import SessionWriter


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
            b.put({"kind": "event", "event": "alert", "alert": "dead_units",
                   "layer": "net.0", "step": s}, t=t)
    if close:
        b.close()
    return b
