"""Per-step scalars checked on every step, on the device, carried to the next report.

Layer statistics are taken on report steps only, so an event that lasts one step between
two reports (a loss spike over by the next report, a NaN whose poisoned weights make the
next report name the first layer instead of the step it came from) would go unseen or be
misdated. Two cheap per-step values are watched on every step instead: the observed loss
and the global gradient norm. Each update is a handful of 0-d kernels (a compare, two
selects, a max, a min): nothing is read back, no kernel branches on a value. The report
takes the window's worst value and its step, and the first step with a non-finite value,
as scalars (``CARRY_SCALARS``), then starts a fresh window. Steps are float32 on the
wire: exact up to 2**24. A value on the CPU is read as a float instead (no sync there):
three comparisons in Python cost ~1 us, the kernels ~70 us (0-d CPU kernels with Python
scalars cost ~10-30 us each), on every step.
"""

from __future__ import annotations

import math

import torch

from neurotop.service.finalize import CARRY_SCALARS

_WATCHED = ("loss", "grad_norm")


class _Track:
    """One scalar's window: its max, the step of the max, the first non-finite step."""

    def __init__(self, like: torch.Tensor) -> None:
        self.top = torch.full((), float("-inf"), device=like.device)
        self.at = torch.full((), float("nan"), device=like.device)
        self.bad = torch.full((), float("inf"), device=like.device)

    def update(self, v: torch.Tensor, step: int) -> None:
        """Out of place: a report may still be copying the tensors it was handed."""
        v = v.detach().reshape(()).to(self.top.device, torch.float32)
        self.bad = torch.fmin(self.bad, torch.where(torch.isfinite(v), float("nan"), step))
        self.at = torch.where(v > self.top, step, self.at)  # NaN compares false
        self.top = torch.fmax(self.top, v)  # NaN leaves the max as it was

    def take(self) -> list[torch.Tensor]:
        """``[max, step of max, first non-finite step]``: NaN, NaN, -1 when none."""
        top = torch.where(torch.isinf(self.top) & (self.top < 0), float("nan"), self.top)
        return [top, self.at, torch.where(torch.isinf(self.bad), -1.0, self.bad)]


class _HostTrack:
    """``_Track`` for values on the CPU, as floats."""

    def __init__(self) -> None:
        self.top, self.at, self.bad = -math.inf, math.nan, math.inf

    def update(self, v: float, step: int) -> None:
        if not math.isfinite(v):
            self.bad = min(self.bad, step)
        if v > self.top:  # NaN compares false
            self.top, self.at = v, float(step)

    def take(self) -> list[float]:
        top = math.nan if self.top == -math.inf else self.top
        return [top, self.at, -1.0 if self.bad == math.inf else float(self.bad)]


class StepCarry:
    """The loss and gradient-norm windows between two reports (training thread)."""

    def __init__(self) -> None:
        self._tracks: dict[str, _Track | _HostTrack] = {}

    def update(self, name: str, v: torch.Tensor | float | None, step: int) -> None:
        """Step ``step``'s ``name`` (``"loss"`` or ``"grad_norm"``); a float is taken too."""
        if v is None:
            return
        host = not isinstance(v, torch.Tensor) or v.is_cpu
        track = self._tracks.get(name)
        if track is None or isinstance(track, _HostTrack) != host:
            track = self._tracks[name] = _HostTrack() if host else _Track(v)
        track.update(float(v) if host else v, step)

    def take(self) -> dict[str, torch.Tensor | float]:
        """This window's ``CARRY_SCALARS`` (of the scalars updated in it); a fresh window."""
        out: dict[str, torch.Tensor | float] = {}
        for name in _WATCHED:
            track = self._tracks.pop(name, None)
            if track is not None:
                keys = [k for k in CARRY_SCALARS if k.startswith(f"{name}_")]
                out.update(zip(keys, track.take(), strict=True))
        return out
