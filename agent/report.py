"""A report's host side: what the training thread knew without reading the device, and the
arithmetic (on the agent thread) that turns the copied buffer into wire messages.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent import wire
from agent.config import Config
from agent.packing import Layout, unpack
from agent.stats import NONFINITE, finalize_layers

#: Scalars computed on the device; user scalars from ``observe`` follow, then host ones.
DEVICE_SCALARS = ("loss", "grad_norm", "first_nonfinite")
HOST_SCALARS = ("steps_per_s", "samples_per_s", "mem_device", "mem_device_peak", "mem_host")


def lr_names(groups: int) -> list[str]:
    """``lr`` for the first param group, ``lr.1``, ``lr.2``... for the others."""
    return ["lr"] + [f"lr.{g}" for g in range(1, groups)]


@dataclass
class PendingReport:
    """Everything about one report except the device values, which arrive in one buffer."""

    schema_id: int
    config: Config
    layout: Layout
    meta: dict[str, Any]  # host facts from the collector (see ``LayerCollector.pack``)
    scalar_names: list[str]
    scalar_slots: list[str]  # names of the scalars packed in the buffer's "scalars" part
    host_values: dict[str, Any] = field(default_factory=dict)  # floats or CPU tensors

    def messages(self, buf: np.ndarray) -> list[tuple[dict[str, Any], list[np.ndarray]]]:
        """The stats message, the params message (when parameter statistics are on) and,
        on histogram reports, the histogram message."""
        parts = unpack(buf, self.layout)
        m, c = self.meta, self.config
        layers = m["layers"]
        nan = np.full(layers, np.nan)
        block = finalize_layers(c.stats, layers, parts["rows"], parts["summary"],
                                m["row_layer"], parts.get("dead", nan),
                                parts.get("dead_window", nan), m["units"], parts["grad_norms"],
                                m["grad_layer"], m["grad_elements"])
        values = {k: float(v) for k, v in self.host_values.items()}
        values.update(zip(self.scalar_slots, parts.get("scalars", ()), strict=True))
        if "nonfinite" in c.stats:
            values["first_nonfinite"] = first_nonfinite(parts["rows"], m["row_layer"],
                                                        m["order"])
        values["mem_host"] = _rss_bytes()
        scalars = np.array([values.get(k, math.nan) for k in self.scalar_names], np.float32)
        out = [({"kind": wire.STATS, "schema_id": self.schema_id}, [block, scalars])]
        if "params" in parts:
            out.append(({"kind": wire.PARAMS, "schema_id": self.schema_id},
                        [parts["params"].astype(np.float32)]))
        if m["hist"]:
            out.append(({"kind": wire.HIST, "schema_id": self.schema_id},
                        [parts["hist"].astype(np.float32),
                         parts["grad_hist"].astype(np.float32)]))
        return out


def first_nonfinite(rows: np.ndarray, row_layer: list[int], order: list[int]) -> float:
    """Index of the first layer, in forward order, with a non-finite output; -1 if none.

    A module called several times takes the place of its first call.
    """
    bad = {row_layer[k] for k in np.flatnonzero(rows[:, NONFINITE] > 0)}
    return float(next((i for i in order if i in bad), -1))


def _rss_bytes() -> float:
    """Resident memory of this process (Linux ``/proc``; NaN elsewhere). Agent thread only."""
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return math.nan
