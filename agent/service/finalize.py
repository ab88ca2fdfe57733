"""A report's host side: what the training thread knew without reading the device, and the
arithmetic (on the agent thread) that turns the copied buffer into wire messages.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurotop.config import LAYER_STATS, Config
from neurotop.protocol import wire

#: One call's exact row: the non-finite count, the largest and the smallest value.
ROW_COLS = ("nonfinite", "max", "min")
NONFINITE, MAX, MIN = range(len(ROW_COLS))

#: What ``summarize`` reduces each layer's pooled sample to, in column order.
SUMMARY_COLS = ("mean", "var", "m4", "zero_frac", "near_zero_frac", "median_abs")

Layout = list[tuple[str, tuple[int, ...]]]

#: Checked on every step, not only on report steps (``neurotop.training.carry``): over the
#: steps since the previous report, the largest loss and global grad norm and the steps
#: they came at, and the first step with a non-finite one (-1: none). NaN where not
#: measured. The grad norm is taken at each optimizer step (after the script's clip, if
#: any); the report's own ``grad_norm`` is of the gradients as accumulated.
CARRY_SCALARS = ("loss_max", "loss_max_step", "loss_nonfinite_step", "grad_norm_max",
                 "grad_norm_max_step", "grad_norm_nonfinite_step")
#: The built-in scalars, first in every report's scalars vector: ``loss`` (as observed,
#: usually a device tensor), ``grad_norm`` and ``CARRY_SCALARS`` are reduced on the device;
#: ``first_nonfinite`` is computed on the host, from the layer rows (``messages``). The
#: user's scalars from ``observe`` follow, then the learning rates, then ``HOST_SCALARS``
#: (measured on the host).
BUILTIN_SCALARS = ("loss", "grad_norm", "first_nonfinite", *CARRY_SCALARS)
HOST_SCALARS = ("steps_per_s", "samples_per_s", "mem_device", "mem_device_peak", "mem_host")
#: With a head (``watch(head=...)`` or ``observe(logits=...)``, ``neurotop.training.head``),
#: after the user's scalars: the fraction of rows whose softmax is one-hot in the loss dtype
#: (E4), the top-1 minus top-2 logit margin's quantiles, the mean output entropy (nats) and,
#: with ``observe(targets=...)``, the fraction of rows whose loss is exactly 0.
HEAD_SCALARS = ("head.collapse_frac", "head.margin_p10", "head.margin_p50", "head.margin_p90",
                "head.entropy", "head.zero_loss_frac")
#: With ``watch(scaler=...)``, after the learning rates: the GradScaler's loss scale at the
#: report step (the one its backward used) and the steps it skipped since ``watch``.
AMP_SCALARS = ("loss_scale", "skipped_steps")


def lr_names(groups: int) -> list[str]:
    """``lr`` for the first param group, ``lr.1``, ``lr.2``... for the others."""
    return ["lr"] + [f"lr.{g}" for g in range(1, groups)]


@dataclass
class Report:
    """One report as the training thread hands it over: its host copy possibly in flight."""

    step: int
    t: float
    data: Any  # torch.Tensor: the report's one flat float32 buffer, on the host
    #: Turns the buffer (as NumPy) into messages: ``[(header fields, arrays), ...]``.
    finalize: Callable[[np.ndarray], list[tuple[dict[str, Any], list[np.ndarray]]]]
    ready: Any = None  # a CUDA event to wait on before reading, or None
    #: The schema it was made under, taken when it is handed over (``submit_report``), so
    #: its messages go out after the schema that labels them.
    schema: dict[str, Any] | None = None


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


def unpack(buf: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for k, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out[k] = buf[at: at + n].reshape(shape)
        at += n
    if at != len(buf):
        raise ValueError(f"report buffer holds {len(buf)} values, its layout {at}")
    return out


def finalize_layers(stats: tuple[str, ...], layers: int, rows: np.ndarray,
                    summary: np.ndarray, row_layer: list[int], dead: np.ndarray,
                    dead_window: np.ndarray, units: list[int], grad_norms: np.ndarray,
                    grad_layer: list[int], grad_elements: list[int]) -> np.ndarray:
    """The ``[layers x stats]`` float32 block of one report (host, float64 arithmetic).

    ``rows`` (``ROW_COLS``): one per call, of layer ``row_layer[k]``; ``summary``
    (``SUMMARY_COLS``), ``dead``, ``dead_window`` (unit counts) and ``units``: per layer.
    ``grad_norms``: one ||dL/dh|| per gradient hook call. A layer with no call gets NaN.
    """
    out = np.full((layers, len(LAYER_STATS)), np.nan)
    col = {s: j for j, s in enumerate(LAYER_STATS)}
    rows = rows.astype(np.float64)
    of = np.asarray(row_layer, dtype=np.int64)
    ran = np.bincount(of, minlength=layers) > 0  # a layer with no call stays NaN
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        top = np.full(layers, -np.inf)
        np.maximum.at(top, of, np.abs(rows[:, [MAX, MIN]]).max(1))  # NaN stays NaN
        out[ran, col["max_abs"]] = top[ran]
        out[ran, col["nonfinite"]] = np.bincount(of, rows[:, NONFINITE], layers)[ran]
        u = np.asarray(units, dtype=np.float64)
        has = ran & (u > 0)
        out[has, col["dead_frac"]] = np.asarray(dead, np.float64)[has] / u[has]
        out[has, col["dead_frac_window"]] = np.asarray(dead_window, np.float64)[has] / u[has]
        mean, var, m4, zero, near, med = summary.astype(np.float64).T
        out[:, col["mean"]], out[:, col["std"]] = mean, np.sqrt(var)
        out[:, col["rms"]] = np.sqrt(var + mean * mean)
        out[:, col["kurtosis"]] = np.where(var > 0, m4 / var ** 2, np.nan)
        out[:, col["zero_frac"]], out[:, col["near_zero_frac"]] = zero, near
        out[:, col["massive_ratio"]] = out[:, col["max_abs"]] / med
        gof = np.asarray(grad_layer, dtype=np.int64)
        gsq = np.bincount(gof, np.asarray(grad_norms, np.float64) ** 2, layers)
        gn = np.bincount(gof, np.asarray(grad_elements, np.float64), layers)
        out[:, col["grad_rms"]] = np.sqrt(gsq / np.where(gn > 0, gn, np.nan))
    return out[:, [col[s] for s in stats]].astype(np.float32)
