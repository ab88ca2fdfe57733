"""``neurotop export FILE --csv DIR``: a recording as CSV tables for pandas.

``scalars.csv``: one row per reported step: ``step``, ``time`` (when the agent published
it, Unix seconds), then one column per scalar (``loss``, ``grad_norm``, …, ``lr``).
``layers.csv``: long form, one row per step and layer: ``step``, ``layer`` (its
``named_modules()`` path), then one column per statistic (``mean``, ``std``, …).
``events.csv``: every command acknowledgement and alert: ``step``, ``time``, ``kind``,
``event``, ``cmd``, ``ok``, ``old``, ``new``, ``error``, ``sender``, and ``details``
(anything else, as JSON). Floats are written in the shortest form that reads back as
the same float32; missing values are ``nan``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from neurotop.tui.data.replay_source import ReplaySource

EVENT_COLUMNS = ("kind", "event", "cmd", "ok", "old", "new", "error", "sender")
_HEADER_FIELDS = frozenset({"run", "rank", "seq", "t", "v", "arrays", "step", *EVENT_COLUMNS})
STEPS_PER_PIECE = 2000


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"' if any(c in name for c in ',"\n\r') else name


def export_csv(source: ReplaySource, out: Path) -> list[Path]:
    """Write the three tables into ``out`` (created if needed); returns their paths."""
    source.load()
    out.mkdir(parents=True, exist_ok=True)
    store = source.store
    schema = store.schema or {"layers": [], "stats": [], "scalars": []}
    steps = store.steps()
    times = source.row_times()
    paths = [out / "scalars.csv", out / "layers.csv", out / "events.csv"]

    cols = [np.asarray(steps).astype(str), times.astype(str)]
    cols += [store.scalar(name)[1].astype(str) for name in schema["scalars"]]
    with open(paths[0], "w", newline="") as f:
        f.write(",".join(["step", "time", *map(_quote, schema["scalars"])]) + "\n")
        f.writelines(",".join(row) + "\n" for row in zip(*cols, strict=True))

    layers = [_quote(n) for n in schema["layers"]]
    series = np.stack([store.recent_series(st, len(steps)) for st in schema["stats"]], -1) \
        if schema["stats"] and len(steps) else np.empty((len(layers), 0, 0), np.float32)
    with open(paths[1], "w", newline="") as f:
        f.write(",".join(["step", "layer", *map(_quote, schema["stats"])]) + "\n")
        for a in range(0, len(steps), STEPS_PER_PIECE):
            piece = series[:, a:a + STEPS_PER_PIECE].astype(str)  # [layers x steps x stats]
            for i, step in enumerate(steps[a:a + STEPS_PER_PIECE].tolist()):
                f.writelines(f"{step},{name},{','.join(piece[j, i])}\n"
                             for j, name in enumerate(layers))

    with open(paths[2], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "time", *EVENT_COLUMNS, "details"])
        for step, h in source.events():
            details = {k: v for k, v in h.items() if k not in _HEADER_FIELDS}
            w.writerow([h.get("step", step) if h.get("step") is not None else step,
                        h.get("t", ""), *(h.get(c, "") for c in EVENT_COLUMNS),
                        json.dumps(details, default=str) if details else ""])
    return paths
