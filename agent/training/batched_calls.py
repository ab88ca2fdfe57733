"""Small outputs measured together: each call copies its output into a slot of a buffer
shared by every output of its shape, and the buffer's calls are measured at once.

Measuring one call costs six to nine eager ops (the per-unit maxima, the extremes, the
row sample, the views between them), each a few microseconds of dispatch on a CPU and a
kernel launch on a device, whatever the output's size. For an output of a few thousand
values that dispatch is nearly all the cost; a copy into a slot is one op, and a
buffer's calls then take the same statistics in about ten ops whatever their number.
The values are the same as one call's (``neurotop.training.stats.activation_row``): the
copy is taken in the hook, before anything (an in-place ReLU) changes the output.

Larger outputs are measured in their hook (``SMALL_OUTPUT``): there a copy's memory
traffic would cost more than the dispatch it saves.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from neurotop.service.finalize import MAX, MIN, NONFINITE, ROW_COLS
from neurotop.training.stats import CallPlan, Needs, nonfinite_ones

#: Outputs of at most this many values go into a batch. A copy of 64 Ki float32 values
#: (256 KiB, in cache) takes about what the seven ops it replaces cost to dispatch on a
#: CPU (~4 us each).
SMALL_OUTPUT = 1 << 16
#: One batch's buffer holds at most this many bytes; a full batch is measured at once
#: and its slots reused (an evaluation loop inside a report window stays bounded).
BATCH_BYTES = 4 << 20


class CallBatch:
    """The calls of one window whose outputs share a shape, unit dimension and device:
    their copies, their layers, and their places in the window's rows and samples."""

    def __init__(self, plan: CallPlan, device: torch.device) -> None:
        self.plan, self.device = plan, device
        self.limit = max(1, BATCH_BYTES // (4 * plan.numel))
        self.buf: torch.Tensor | None = None
        self.slots: list[torch.Tensor] = []  # views of ``buf``, shaped like the output
        self.layers: list[int] = []  # per pending call: its layer
        self.at: list[int] = []  # per pending call: its index among the window's calls
        self.used = False  # took a call this window

    def add(self, x: torch.Tensor, layer: int, at: int) -> bool:
        """Copy call ``at`` of ``layer`` (output ``x``) into a slot; True when full."""
        k = len(self.layers)
        if k == len(self.slots):
            self._grow(k + 1)
        self.slots[k].copy_(x)  # converts bf16 / fp16 to float32 on the way
        self.layers.append(layer)
        self.at.append(at)
        self.used = True
        return k + 1 == self.limit

    def drop(self) -> None:
        """A new window: no pending call (a discarded window's are dropped), none taken."""
        self.layers, self.at, self.used = [], [], False

    def _grow(self, need: int) -> None:
        """Room for ``need`` slots (doubling, up to ``limit``), pending calls kept: a batch
        grows to its shape's calls per window in the first windows, then stays."""
        cap = min(self.limit, max(need, 2 * len(self.slots), 4))
        old = len(self.layers)
        buf = torch.empty(cap, self.plan.numel, device=self.device)
        if old:
            buf[:old].copy_(self.buf[:old])
        self.buf = buf
        self.slots = [row.view(self.plan.shape) for row in buf.unbind(0)]

    def take(self, need: Needs, on_cpu: bool, owned: bool = True
             ) -> tuple[list[int], list[int], Measured]:
        """The pending calls' layers and places, and what ``measure`` makes of them; then
        the batch is empty. ``owned=False``: the samples may be views of the buffer (the
        report reads them before the next window writes a slot again)."""
        layers, at = self.layers, self.at
        self.layers, self.at = [], []
        return layers, at, measure(self.buf[: len(layers)], self.plan, need, on_cpu, owned)


#: Per call of a batch: its ``ROW_COLS`` (flat: floats on the CPU, 0-d tensors on a
#: device), the units' maxima ``[calls x units]`` (None unless needed), its row sample.
Measured = tuple[list[Any], torch.Tensor | None, tuple[torch.Tensor, ...]]


def measure(g: torch.Tensor, plan: CallPlan, need: Needs, on_cpu: bool, owned: bool = True
            ) -> Measured:
    """``activation_row`` for each row of ``g`` (``[calls x plan.numel]`` float32, one
    call's output per row, contiguous).

    On a device, units along the last dimension: one ``aminmax`` over the rows of each
    call gives the units' maxima and minima; on CPU (where ``aminmax`` along a dimension is
    slow) the units' maxima and one ``amin`` per call. The non-finite count always runs
    on a device; on CPU only for a batch whose extremes are not finite."""
    n, c = g.shape[0], len(ROW_COLS)
    units = lo = hi = None
    if plan.other_dims is None:
        view = g.view(n, -1, plan.units)
        if need.max and not on_cpu:
            lo, hi = torch.aminmax(view, dim=1)
            units = hi if need.units else None
            lo, hi = lo.amin(1), hi.amax(1)
        elif need.units:
            units = view.amax(1)
    elif need.units:
        units = g.view(n, *plan.shape).amax(dim=[d + 1 for d in plan.other_dims])
    if hi is None and (need.max or (need.nonfinite and on_cpu)):
        if on_cpu:
            hi = units.amax(1) if units is not None else g.amax(1)
            lo = g.amin(1)
        else:
            lo, hi = torch.aminmax(g, dim=1)
    samples = _samples(g, plan, owned).unbind(0)
    if on_cpu:
        rows = [0.0] * (n * c)
        if hi is not None:
            his, los = hi.tolist(), lo.tolist()
            if need.max:
                rows[MAX::c], rows[MIN::c] = his, los
            finite = all(math.isfinite(v) for v in his) and all(math.isfinite(v) for v in los)
            if need.nonfinite and not finite:
                rows[NONFINITE::c] = nonfinite_ones(g).sum(1).tolist()
        return rows, units, samples
    zero = torch.zeros((), device=g.device).expand(n)
    cols = [zero] * c
    if need.max:
        cols[MAX], cols[MIN] = hi, lo
    if need.nonfinite:
        cols[NONFINITE] = plan.numel - torch.isfinite(g).sum(1, dtype=torch.int32)
    return list(torch.stack(cols, 1).view(-1).unbind(0)), units, samples


def _samples(g: torch.Tensor, plan: CallPlan, owned: bool = True) -> torch.Tensor:
    """``take_sample`` of every row of ``g``, as one ``[calls x sample]`` copy (or a view
    of ``g``, unless ``owned``)."""
    n = g.shape[0]
    if plan.sample is not None:
        rows, width, r = plan.sample  # r >= 2 (``row_layout``): the reshape copies
        return g.view(n, rows, width)[:, ::r].reshape(n, -1)
    s = g[:, :: plan.every] if plan.every else g
    return s.clone() if owned else s
