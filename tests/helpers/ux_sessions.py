"""A recorded run shaped to show what a first-time user must be able to read: every
per-layer statistic, layer types (ReLUs, a logits layer, a LayerNorm), 14 parameters, 18
alerts among many more pause and single-step events, and ties in a sortable column."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.sessions import SessionBuilder

#: Every per-layer statistic the agent reports (``neurotop.config.LAYER_STATS``).
UX_STATS = ["mean", "std", "rms", "max_abs", "massive_ratio", "kurtosis", "zero_frac",
            "near_zero_frac", "dead_frac", "dead_frac_window", "nonfinite", "grad_rms"]
UX_LAYERS = ["embed", "block0.fc", "block0.act", "block0.norm", "block1.fc", "block1.act",
             "block1.norm", "head", "logits"]
UX_TYPES = ["Embedding", "Linear", "ReLU", "LayerNorm", "Linear", "ReLU", "LayerNorm",
            "Linear", "Linear"]
UX_PARAMS = [f"p{i:02d}.weight" for i in range(14)]
UX_PARAM_STATS = ["grad_norm", "grad_max_abs", "weight_norm", "update_ratio", "nlm_cos"]
ALERTS = 18
#: Layers whose dead_frac is exactly alike at every step (a tie the sort must keep).
TIED = ("block0.fc", "block1.fc", "head")


def col(stat: str) -> int:
    return UX_STATS.index(stat)


def write_ux_run(path: Path, steps: int = 360) -> SessionBuilder:
    """``steps`` steps at 20 steps/s; every ``steps // ALERTS`` steps an alert, then a
    pause, five single steps and a resume (acks and ``paused`` events: command events);
    values that keep changing (the layers' order under a sort would, too)."""
    rng = np.random.default_rng(3)
    b = SessionBuilder(path, name="ux")
    scalars = ["loss", "grad_norm", "lr", "steps_per_s", "acc"]
    every = steps // ALERTS
    relu = [i for i, t in enumerate(UX_TYPES) if t == "ReLU"]
    for s in range(1, steps + 1):
        t = b.t0 + s / 20
        if s == 1 or s % 50 == 0:
            b.put({"kind": "schema", "schema_id": 1, "run_name": "ux", "layers": UX_LAYERS,
                   "layer_types": UX_TYPES, "blocks": [], "stats": UX_STATS,
                   "scalars": scalars, "params": UX_PARAMS, "param_stats": UX_PARAM_STATS},
                  t=t)
        block = np.abs(rng.normal(0.5, 0.2, (len(UX_LAYERS), len(UX_STATS)))).astype(
            np.float32)
        block[:, col("nonfinite")] = 0
        block[:, col("dead_frac")] = rng.random(len(UX_LAYERS)) * 0.3
        for name in TIED:
            block[UX_LAYERS.index(name), col("dead_frac")] = 0.25
        block[relu, col("massive_ratio")] = np.inf  # median 0: most outputs are 0
        block[relu, col("zero_frac")] = 0.62  # a healthy ReLU
        block[UX_LAYERS.index("logits"), col("dead_frac")] = 1.0  # log-probabilities < 0
        vec = np.array([2.0 * np.exp(-3 * s / steps), 1.0, 1e-3, 20.0, s / steps],
                       np.float32)
        b.put({"kind": "stats", "step": s, "wall": t, "schema_id": 1, "dropped": 0},
              (block, vec), t=t)
        p = np.abs(rng.normal(1.0, 0.2, (len(UX_PARAMS), len(UX_PARAM_STATS)))).astype(
            np.float32)
        p[:, 3] = 1e-3 * 10.0 ** rng.uniform(-1.5, 1.5, len(UX_PARAMS))
        b.put({"kind": "params", "step": s, "schema_id": 1}, (p,), t=t)
        if s % 5 == 0:
            b.put({"kind": "heartbeat", "step": s, "state": "running", "paused_at": None,
                   "steps_per_s": 20.0, "dropped": 0, "rec_dropped": 0, "control": ""}, t=t)
        if s % every == 0:  # an alert, then a pause, five single steps and a resume
            b.put({"kind": "event", "event": "alert", "alert": "dying_layer", "rule": "E2",
                   "level": "warn", "message": f"layer 'block0.act': dead at step {s}",
                   "layer": "block0.act", "value": 0.6, "step": s}, t=t)
            for k, cmd in enumerate(("pause", *["step"] * 5, "resume")):
                new = "running" if cmd == "resume" else "paused"
                b.put({"kind": "event", "event": "ack", "id": f"{cmd}{s}.{k}", "cmd": cmd,
                       "args": {"n": 1} if cmd == "step" else {}, "ok": True, "step": s,
                       "old": None, "new": new, "state": new,
                       "paused_at": s if new == "paused" else None, "error": None,
                       "sender": "test"}, t=t)
                if new == "paused":
                    b.put({"kind": "event", "event": "paused", "step": s, "state": "paused",
                           "paused_at": s, "reason": cmd}, t=t)
    b.close()
    return b
