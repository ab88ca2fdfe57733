"""The per-layer statistics: what one module call computes on the device, what the report
computes from a window's calls on the device, and the host-side arithmetic that turns that
into the ``[layers x stats]`` block.

Per call of a measured module (training thread): the few statistics that must see every
element read the whole activation (see ``activation_row``: on a device one pass for the
per-unit maxima and minima, which give the dead units and max |a|, plus one for the
non-finite count; on CPU two, the per-unit maxima and one ``aminmax``, which also tells
whether the non-finite count must run); everything else is taken from a row sample
(``take_sample``: one strided copy, the whole activation when it has at most
``Config.sample`` elements). Each call costs three to six kernels, none of which
branches on a device value. Outputs of at most ``batched_calls.SMALL_OUTPUT`` values are
copied instead, one op, and measured with the others of their shape at the report
(``neurotop.training.batched_calls``).

Per report (training thread, ``summarize`` and ``hist_counts``): each layer's calls
(modules called several times per forward, gradient accumulation) are pooled, and the
samples are reduced on the device, all layers of one sample size at once, to a few
moments, fractions, a median and histogram counts: a handful of batched kernels. Doing
this on the agent thread in NumPy cost more: on a CPU whose cores all train, every
millisecond the agent thread computes is taken from the training threads, and more than a
millisecond is lost, since their parallel regions wait for the preempted one.

The agent thread turns those columns into statistics (``neurotop.service.finalize``), where
the column orders (``ROW_COLS``, ``SUMMARY_COLS``) are defined.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from neurotop.service.finalize import MAX, MIN, NONFINITE, ROW_COLS, SUMMARY_COLS

__all__ = ["Needs", "first_tensor", "sample_stride", "CallPlan", "call_plan", "row_layout",
           "take_sample", "unit_max", "activation_row", "cpu_row", "nonfinite_ones",
           "device_row", "stack_by_size", "summarize", "hist_counts", "SummaryLayout",
           "summary_layout", "summarize_layout", "hist_layout", "hist_counts_at", "to_device",
           "float32_on"]

#: The median |a| of ``massive_ratio`` uses every s-th value of the layer's sample, at most
#: this many: the ratio only needs its order of magnitude (511 values put the median within
#: a few percent), and the selection costs ~7 ns per value on CPU, the report's costliest
#: reduction at 2048.
MEDIAN_SAMPLE = 512

#: A per-unit max over dim 0 is fastest on CPU with rows at least this wide: fold first.
_FOLD_WIDTH = 8192


class Needs:
    """Which groups of work the chosen statistics require."""

    def __init__(self, stats: tuple[str, ...]) -> None:
        s = set(stats)
        self.nonfinite = "nonfinite" in s
        self.max = bool(s & {"max_abs", "massive_ratio"})
        self.units = bool(s & {"dead_frac", "dead_frac_window"})
        self.grad = "grad_rms" in s


def first_tensor(out: object) -> torch.Tensor | None:
    """The activation to measure from a module's output (tensor, tuple/list or dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    if isinstance(out, dict):
        for o in out.values():
            if isinstance(o, torch.Tensor):
                return o
    return None


def sample_stride(n: int, limit: int, period: int) -> int:
    """The smallest stride s >= n / limit that is coprime with ``period``.

    Taking every s-th of n items then keeps at most ``limit`` of them, spread over all,
    and never locks onto a fixed phase of a pattern that repeats every ``period`` items
    (the same token position, or the same column).
    """
    s = max(1, -(-n // max(limit, 1)))
    while math.gcd(s, max(period, 1)) != 1:
        s += 1
    return s


class CallPlan(NamedTuple):
    """How one call reads an output of a given shape, worked out once per layer and shape
    (the hooks run per call: every Python operation there is paid 36 times a step)."""

    units: int  # units (see ``neurotop.training.layers.unit_dim_for``)
    fold: tuple[int, int, int] | None  # the per-unit max's ``[rows / k, k, units]`` view
    other_dims: tuple[int, ...] | None  # or the dimensions to reduce (units not last)
    sample: tuple[int, int, int] | None  # (rows, width, every r-th row); None: whole
    every: int  # every s-th element, when a row is wider than the sample (else 0)
    numel: int  # elements of the output
    contiguous: bool  # the output is (``view`` works on it)
    shape: tuple[int, ...]  # the output's


def call_plan(shape: torch.Size, contiguous: bool, unit_dim: int, limit: int) -> CallPlan:
    """The plan for an output of ``shape`` whose units lie along ``unit_dim``."""
    ndim, n = len(shape), math.prod(shape)
    units, fold, other = 1, None, None
    if ndim:
        units = max(shape[unit_dim], 1)
        if unit_dim != ndim - 1:
            other = tuple(d for d in range(ndim) if d != unit_dim)
        else:
            rows = n // units
            k = math.gcd(rows, max(1, _FOLD_WIDTH // units)) if contiguous else 1
            fold = (rows // k, k, units)
    sample, every = row_layout(shape, limit, shape[-2] if ndim >= 3 else 1)
    return CallPlan(units, fold, other, sample, every, n, contiguous, tuple(shape))


def row_layout(shape: tuple[int, ...], limit: int, period: int
               ) -> tuple[tuple[int, int, int] | None, int]:
    """Where the row sample of at most ``limit`` elements of a tensor of ``shape`` lies:
    ``((rows, width, r), 0)`` for every r-th row of its last dimension, r coprime with
    ``period``; ``(None, s)`` for every s-th element when a row is wider than ``limit``;
    ``(None, 0)`` for the whole tensor. Activations, gradients and parameters share it."""
    n = math.prod(shape)
    if n <= limit:
        return None, 0
    width = shape[-1] if shape else 1
    if width > limit:
        return None, sample_stride(n, limit, 1)
    rows = n // width
    return (rows, width, sample_stride(rows, max(1, limit // width), period)), 0


def take_sample(flat: torch.Tensor, plan: CallPlan) -> torch.Tensor:
    """The row sample of a flattened output (or of the output itself, when it is
    contiguous and sampled by rows), owned (a copy, never a view of it).

    Whole rows (the last dimension), every r-th one, r coprime with the size of the
    second-to-last dimension (so that, e.g., token positions vary): contiguous rows cost
    far less memory traffic than scattered elements. A row longer than the sample falls
    back to every s-th element; an output no larger than the sample is taken whole.
    """
    if plan.sample is not None:
        rows, width, r = plan.sample
        return flat.view(rows, width)[::r].reshape(-1)
    if plan.every:
        return flat[:: plan.every].clone()
    return flat.clone()


def unit_max(x: torch.Tensor, flat: torch.Tensor, plan: CallPlan) -> torch.Tensor:
    """``[k x units]`` partial maxima: the maximum of each unit over every other dimension
    is their column max (taken at the report, see ``LayerCollector._dead_counts``).

    Units along the last dimension are reduced as a ``[rows / k, k, units]`` view (rows
    of k * units values in memory), which is fastest on CPU with rows at least
    ``_FOLD_WIDTH`` wide; the k-fold rest is left for the report, where all layers' rests
    take one batched kernel instead of one each here. The max over dim 0 of that view is
    already ``[k x units]``: no view after it (each costs as much as a small reduction).
    """
    if plan.other_dims is not None:
        return x.amax(dim=plan.other_dims).view(1, -1)
    if plan.fold is None:  # a 0-d output
        return flat.view(1, 1)
    return flat.view(plan.fold).amax(0)


def activation_row(x: torch.Tensor, plan: CallPlan, need: Needs, zero: torch.Tensor,
                   scratch: torch.Tensor | None
                   ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """One call of a layer, ``x`` float32: ``(row, unit_max parts or None, sample)``; the
    row is ``ROW_COLS`` 0-d tensors (the report stacks all its rows at once).

    On a device, units along the last dimension: one pass, ``aminmax`` over the folded
    batch dimensions, gives each unit's max and min, hence the dead units, the max and the
    min; the non-finite count is one more pass (``isfinite``, a byte per value, and its
    sum): a branch on the max would be a sync. On CPU, where ``aminmax`` along a dimension
    runs 15-60x slower than ``amax`` (torch 2.13), two passes: the per-unit maxima and one
    flat ``aminmax``; the counting passes run only when the max or min is non-finite
    (reading a CPU value costs no sync). ``scratch``, when given, is a float32 buffer of at
    least ``x.numel()`` elements for that count's one temporary (on CPU a fresh
    multi-megabyte temporary per call costs more than the arithmetic).
    """
    if x.device.type != "cpu":
        return device_row(x, plan, need, zero)
    cols, umax, sample = cpu_row(x, plan, need, scratch)
    return [torch.tensor(c) for c in cols], umax, sample


def cpu_row(x: torch.Tensor, plan: CallPlan, need: Needs, scratch: torch.Tensor | None
            ) -> tuple[list[float], torch.Tensor | None, torch.Tensor]:
    """``activation_row`` on the CPU, with the row as floats (what the collector keeps:
    the non-finite check reads the max and min anyway, and on the CPU that costs no sync;
    the report then makes one tensor of all rows instead of stacking 0-d tensors)."""
    # Flattened only where a flat view is needed (a view costs as much as a small
    # reduction): a contiguous output sampled by rows is viewed as rows directly.
    rows = plan.sample is not None and plan.contiguous
    flat = x if rows else x.reshape(-1)  # a copy only when ``x`` is not contiguous
    cols = [0.0] * len(ROW_COLS)
    umax = unit_max(x, flat, plan) if need.units else None
    if need.max or need.nonfinite:
        lo, hi = torch.aminmax(flat)
        h, m = hi.item(), lo.item()
        if need.max:
            cols[MAX], cols[MIN] = h, m
        # the max and min are NaN or infinite exactly when some value is: count only then
        if need.nonfinite and not (math.isfinite(h) and math.isfinite(m)):
            flat = flat.view(-1)
            out = scratch[: flat.numel()] if scratch is not None else None
            cols[NONFINITE] = nonfinite_ones(flat, out).sum().item()
    return cols, umax, take_sample(flat, plan)


def nonfinite_ones(a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """1 where ``a`` is NaN or infinite, 0 elsewhere (float32, into ``out`` if given): a - a
    is 0 where a is finite and NaN elsewhere. The CPU's count, summed by the caller."""
    return torch.sub(a, a, out=out).nan_to_num_(1.0)


def device_row(x: torch.Tensor, plan: CallPlan, need: Needs, zero: torch.Tensor
               ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """``activation_row`` on a device (correct on any, tested on CPU): no value is read,
    so the non-finite count always runs. Units not along the last dimension (NCHW) take
    two passes for the extremes, the per-unit maxima and one flat ``aminmax``."""
    flat = x.reshape(-1)
    cols = [zero] * len(ROW_COLS)
    umax = None
    if need.max and plan.fold is not None:
        lo, hi = torch.aminmax(flat.view(plan.fold), dim=0)
        cols[MAX], cols[MIN] = hi.max(), lo.min()
        umax = hi if need.units else None
    else:
        umax = unit_max(x, flat, plan) if need.units else None
        if need.max:
            cols[MIN], cols[MAX] = torch.aminmax(flat)
    if need.nonfinite:
        cols[NONFINITE] = flat.numel() - torch.isfinite(flat).sum(dtype=torch.int32)
    return cols, umax, take_sample(flat, plan)


def pool_by_layer(samples: list[torch.Tensor], layer_of: list[int]
                  ) -> dict[int, torch.Tensor]:
    """Each layer's samples of this window (one per call) as one tensor."""
    by_layer: dict[int, list[torch.Tensor]] = {}
    for t, i in zip(samples, layer_of, strict=True):
        by_layer.setdefault(i, []).append(t)
    return {i: ts[0] if len(ts) == 1 else torch.cat(ts) for i, ts in by_layer.items()}


Groups = list[tuple[list[int], torch.Tensor]]


def stack_by_size(pooled: dict[int, torch.Tensor], device: torch.device) -> Groups:
    """The pooled samples as ``(layers, [len(layers) x n] stack)``, one per sample size n,
    so that the report's reductions are a few batched kernels, not a few per layer."""
    by_size: dict[int, list[int]] = {}
    for i, t in pooled.items():
        if t.numel():
            by_size.setdefault(t.numel(), []).append(i)
    return [(idx, torch.stack([pooled[i] if pooled[i].device == device else pooled[i].to(device)
                               for i in idx])) for idx in by_size.values()]


def summarize(groups: Groups, layers: int, eps: float, device: torch.device) -> torch.Tensor:
    """``[layers x SUMMARY_COLS]`` on the device: each layer's pooled sample reduced to its
    mean, variance, 4th central moment, zero and near-zero (|a| < eps) fractions, and the
    median |a| over every s-th value (at most ``MEDIAN_SAMPLE``; the last one dropped when
    that leaves an even count, so the median is one value: a selection, no sort). NaN for
    layers with no sample.

    float32 throughout (float64 reductions cost ten times more on CPU); the deviations
    are centred twice, so the rounding of the first mean does not bias the variance."""
    missing = torch.full((len(SUMMARY_COLS),), float("nan"), device=device)
    out: list[torch.Tensor] = [missing] * layers
    for idx, a in groups:
        n = a.shape[1]
        mean = a.mean(1)
        d = a - mean[:, None]
        rest = d.mean(1)  # what float32 rounding left of the mean
        d.sub_(rest[:, None])
        mag = a.abs()
        small = mag[:, :: sample_stride(n, MEDIAN_SAMPLE, 1)]
        m = small.shape[1] - (small.shape[1] % 2 == 0)  # an odd count
        median = small[:, :m].median(1).values  # an odd count: its middle value
        d2 = d.square_()
        cols = (mean + rest, d2.mean(1), d2.square_().mean(1),
                torch.eq(a, 0).sum(1, dtype=torch.int32) / n,
                torch.lt(mag, eps).sum(1, dtype=torch.int32) / n, median)
        for i, row in zip(idx, torch.stack(cols, 1).unbind(0), strict=True):
            out[i] = row
    # Stacked, not indexed: an index built from a host list is a host-to-device copy.
    return torch.stack(out) if out else torch.zeros((0, len(SUMMARY_COLS)), device=device)


class SummaryLayout(NamedTuple):
    """Where a window's samples go for its summary, worked out once per layout of calls
    (which layer each call was, and its sample's size: the same every report of a model
    whose shapes do not change), so that a report's summary is ~30 kernels for all layers,
    whatever their sample sizes, and no Python per layer.

    Layer l's pooled sample (its calls' samples, in order) is row l of ``buf``, zero
    padded to ``width``; after it three sentinel columns: NaN (a histogram's padding: NaN
    is counted nowhere), +inf and -inf (after ``abs``, -inf is set again: the median's
    padding, half of each, leaves the median of an odd count where it is)."""

    key: tuple[tuple[int, ...], tuple[int, ...]]  # (layer of each call, its sample's size)
    buf: torch.Tensor  # [layers x width + 3] float32
    dst: list[torch.Tensor]  # per call: the slice of ``buf`` its sample is copied into
    n: torch.Tensor  # [layers] float32: values per layer (0: no sample, gives NaN)
    pad: torch.Tensor  # [layers] float32: width - n
    mask: torch.Tensor  # [layers x width] float32: 1 on values, 0 on padding
    median: torch.Tensor  # [layers x m] long into ``buf.view(-1)``; m odd
    present: torch.Tensor  # [layers] float32: 1, NaN for a layer with no sample
    sizes: list[int]  # n per layer (host)
    #: [layers x width] float32 scratch for the comparisons: on the CPU a comparison
    #: written as float32 and summed costs ~30 us where a bool one costs ~100 (torch 2.13)
    flags: torch.Tensor


def float32_on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t`` as float32 on ``dev``: itself when it already is (a no-op ``to`` still costs a
    dispatch, a few microseconds on a report's cold path)."""
    return t if t.dtype == torch.float32 and t.device == dev else t.to(dev, torch.float32)


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host tensor on ``dev``; on CUDA from pinned memory, without waiting (a plain
    host-to-device copy would synchronize)."""
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def summary_layout(row_layer: list[int], sizes: list[int], layers: int,
                   device: torch.device) -> SummaryLayout | None:
    """The layout of a window whose call k was of layer ``row_layer[k]`` with a sample of
    ``sizes[k]`` values, or None when padding every layer to the largest would more than
    quadruple the memory (a layer called many times per window: ``summarize`` groups by
    size then)."""
    n = [0] * layers
    for i, m in zip(row_layer, sizes, strict=True):
        n[i] += m
    width = max(n, default=0)
    if not width or layers * width > 4 * sum(n) + 4096:
        return None
    full = width + 3
    buf = torch.zeros(layers, full, device=device)
    buf[:, width] = float("nan")
    buf[:, width + 1] = float("inf")
    buf[:, width + 2] = float("-inf")
    at, dst = [0] * layers, []
    for i, m in zip(row_layer, sizes, strict=True):
        dst.append(buf[i, at[i]: at[i] + m])
        at[i] += m
    picks = []
    for m in n:
        k = list(range(0, m, sample_stride(m, MEDIAN_SAMPLE, 1))) if m else []
        picks.append(k[: len(k) - (len(k) % 2 == 0)] if k else [])
    rows = max(len(k) for k in picks) | 1
    idx = []
    for i, k in enumerate(picks):
        half = (rows - len(k)) // 2
        idx.append([i * full + j for j in k] + [i * full + width + 1] * half
                   + [i * full + width + 2] * (rows - len(k) - half))
    nt = torch.tensor(n, dtype=torch.float32)
    return SummaryLayout(
        (tuple(row_layer), tuple(sizes)), buf, dst, to_device(nt, device),
        to_device(torch.tensor([width - m for m in n], dtype=torch.float32), device),
        to_device((torch.arange(width)[None, :] < nt[:, None]).float(), device),
        to_device(torch.tensor(idx, dtype=torch.long), device),
        to_device(torch.where(nt > 0, 1.0, float("nan")), device), n,
        torch.empty(layers, width, device=device))


def summarize_layout(lay: SummaryLayout, samples: list[torch.Tensor], eps: float
                     ) -> torch.Tensor:
    """``summarize`` for a window of layout ``lay``: the samples copied into its buffer
    (one multi-tensor copy), then every column of every layer at once (the same values:
    padding adds zeros to the sums and is masked out of the deviations; the median is
    taken over the same picks)."""
    torch._foreach_copy_(lay.dst, samples)
    width = lay.buf.shape[1] - 3
    a, n = lay.buf[:, :width], lay.n
    mean = a.sum(1).div_(n)
    d = (a - mean[:, None]).mul_(lay.mask)
    rest = d.sum(1).div_(n)  # what float32 rounding left of the mean
    d.sub_(rest[:, None]).mul_(lay.mask)
    d2 = d.square_()
    var = d2.sum(1).div_(n)
    m4 = d2.square_().sum(1).div_(n)
    mag = lay.buf.abs()
    mag[:, width + 2] = float("-inf")
    zero = (torch.eq(a, 0, out=lay.flags).sum(1) - lay.pad) / n  # exact below 2**24
    near = (torch.lt(mag[:, :width], eps, out=lay.flags).sum(1) - lay.pad) / n
    median = mag.take(lay.median).median(1).values  # an odd count: its middle value
    return torch.stack((mean + rest, var, m4, zero, near, median), 1).mul_(lay.present[:, None])


def hist_layout(lay: SummaryLayout, want: list[int], limit: int) -> torch.Tensor:
    """``[len(want) x k]`` indices into ``lay.buf.view(-1)``: every s-th value of each
    wanted layer's sample (at most ``limit``), the rest the NaN column (counted nowhere).
    On the device; cached with the layout by the caller."""
    full = lay.buf.shape[1]
    width = full - 3
    picks = [list(range(0, lay.sizes[i], max(1, -(-lay.sizes[i] // max(limit, 1)))))
             for i in want]
    k = max((len(p) for p in picks), default=0) or 1
    idx = [[r * full + j for j in p] + [r * full + width] * (k - len(p))
           for r, p in zip(want, picks, strict=True)]
    return to_device(torch.tensor(idx, dtype=torch.long).view(len(want), k), lay.buf.device)


def hist_counts_at(values: torch.Tensor, exponents: tuple[int, int]) -> torch.Tensor:
    """``[rows x bins]`` counts of each row of ``values`` (NaN not counted); see
    ``hist_counts``."""
    lo, hi = exponents
    to_bin = _bin_matrix(values.device, lo, hi)
    code = ((values.view(torch.int32) >> _CODE_SHIFT) & (_CODES - 1)).long()
    per_code = torch.zeros(values.shape[0], _CODES, device=values.device).scatter_add_(
        1, code, torch.ones((), device=values.device).expand(code.shape))
    return per_code @ to_bin


#: A float32's top 10 bits (sign, exponent, first mantissa bit) decide its histogram bin.
_CODE_SHIFT, _CODES = 22, 1024


@functools.lru_cache(maxsize=8)
def _bin_matrix(device: torch.device, lo: int, hi: int) -> torch.Tensor:
    """``[_CODES x bins]`` one-hot float map from a value's top-10-bit code to its bin of
    ``neurotop.protocol.histograms``; quiet NaN (exponent 255, first mantissa bit set) maps nowhere.
    Made on the device from an ``arange``: no host-to-device copy."""
    k = hi - lo
    bins = 2 * k + 3
    c = torch.arange(_CODES, device=device)
    exp = (c >> 1) & 0xFF
    p = (exp - 127 - lo).clamp_(-1, k)  # -1: the zero bin (zero, subnormal, < 2**lo); k: overflow
    b = torch.where(c >= _CODES // 2, k - p, k + 2 + p)
    b = torch.where((exp == 0xFF) & (c & 1 == 1), bins, b)
    return (b[:, None] == torch.arange(bins, device=device)[None, :]).float()


def hist_counts(groups: Groups, want: list[int], exponents: tuple[int, int], limit: int,
                device: torch.device) -> torch.Tensor:
    """``[len(want) x bins]`` counts in the bins of ``protocol.histograms`` (on the device):
    row r for layer ``want[r]``, over every s-th value of its sample (at most ``limit``);
    zeros for a layer with no sample.

    A value's bin follows from its top 10 bits (exact, and cheaper than a log or a
    search): each row's values are counted per code (one ``scatter_add_``), and the code
    counts go to bins in one small matmul. NaN is not counted (``nonfinite`` counts it);
    no value is read back."""
    lo, hi = exponents
    bins = 2 * (hi - lo) + 3
    to_bin = _bin_matrix(device, lo, hi)
    row_of = {layer: r for r, layer in enumerate(want)}
    zero = torch.zeros(bins, device=device)
    out: list[torch.Tensor] = [zero] * len(want)
    for idx, a in groups:
        pick = [(j, row_of[i]) for j, i in enumerate(idx) if i in row_of]
        if not pick:
            continue
        if len(pick) < len(idx):
            a = torch.stack([a[j] for j, _ in pick])
        a = a[:, :: max(1, -(-a.shape[1] // max(limit, 1)))]
        code = ((a.view(torch.int32) >> _CODE_SHIFT) & (_CODES - 1)).long()
        per_code = torch.zeros(a.shape[0], _CODES, device=device).scatter_add_(
            1, code, torch.ones((), device=device).expand(code.shape))
        for (_, r), row in zip(pick, (per_code @ to_bin).unbind(0), strict=True):
            out[r] = row
    return torch.stack(out) if out else torch.zeros((0, bins), device=device)
