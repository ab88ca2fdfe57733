"""Bounded memory for a live run of any length: the compacted past of a store's series.

A live store keeps its most recent rows at full resolution (see ``RunStore.window``);
older rows move here in buckets. Each bucket keeps the last step, the mean, min and max
of the rows it covers, and how many rows that was. When the buckets are all used, pairs
merge and every bucket covers twice as many rows: memory stays ``capacity`` buckets
however long the run, the oldest past at the coarsest resolution. Spikes survive as the
bucket's max (and dips as its min), which is what plots draw for the compacted part.
"""

from __future__ import annotations

import warnings

import numpy as np


def _reduce(rows: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over ``groups`` equal runs of rows (NaN ignored, all-NaN is NaN)."""
    g = rows.reshape(groups, -1, *rows.shape[1:]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(g, axis=1), np.fmin.reduce(g, axis=1), np.fmax.reduce(g, axis=1)


def _merge_mean(a: np.ndarray, b: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    shape = (-1,) + (1,) * (a.ndim - 1)
    wa, wb = ca.reshape(shape), cb.reshape(shape)
    both = (a * wa + b * wb) / (wa + wb)
    return np.where(np.isnan(a), b, np.where(np.isnan(b), a, both)).astype(np.float32)


class Summary:
    """Compacted rows of several aligned series (same steps), ``capacity`` buckets each."""

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity - capacity % 2
        self.res = 1  # rows per bucket for rows added from now on
        self.n = 0
        self.steps = np.zeros(self.capacity, np.int64)
        self.count = np.zeros(self.capacity, np.int64)
        self.series: dict[str, dict[str, np.ndarray]] = {}

    def _arrays(self, name: str, row_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        s = self.series.get(name)
        if s is None or s["mean"].shape[1:] != row_shape:
            s = {k: np.full((self.capacity, *row_shape), np.nan, np.float32)
                 for k in ("mean", "min", "max")}
            self.series[name] = s
        return s

    def add(self, steps: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Compact ``len(steps)`` consecutive rows (a multiple of ``res`` keeps buckets even;
        otherwise the last bucket is short)."""
        k = len(steps)
        groups = -(-k // self.res)
        while self.n + groups > self.capacity:
            self._halve()
            groups = -(-k // self.res)
        pad = groups * self.res - k
        idx = np.minimum(np.arange(groups * self.res), k - 1)  # repeat the last row to pad
        a, b = self.n, self.n + groups
        self.steps[a:b] = steps[idx].reshape(groups, -1)[:, -1]
        self.count[a:b] = self.res
        self.count[b - 1] -= pad
        for name, r in rows.items():
            s = self._arrays(name, r.shape[1:])
            s["mean"][a:b], s["min"][a:b], s["max"][a:b] = _reduce(r[idx], groups)
        self.n = b

    def _halve(self) -> None:
        """Merge neighbouring buckets: half the buckets, each covering twice the rows."""
        n = self.n - self.n % 2
        h = n // 2
        ca, cb = self.count[0:n:2], self.count[1:n:2]
        for s in self.series.values():
            s["mean"][:h] = _merge_mean(s["mean"][0:n:2], s["mean"][1:n:2], ca, cb)
            s["min"][:h] = np.fmin(s["min"][0:n:2], s["min"][1:n:2])
            s["max"][:h] = np.fmax(s["max"][0:n:2], s["max"][1:n:2])
            if self.n % 2:
                for k in ("mean", "min", "max"):
                    s[k][h] = s[k][n]
        self.steps[:h] = self.steps[1:n:2]
        self.count[:h] = ca + cb
        if self.n % 2:
            self.steps[h], self.count[h] = self.steps[n], self.count[n]
        self.n = h + self.n % 2
        self.res *= 2

    def get(self, name: str, kind: str = "mean") -> np.ndarray | None:
        s = self.series.get(name)
        return None if s is None else s[kind][: self.n]

    def nbytes(self) -> int:
        return sum(a.nbytes for s in self.series.values() for a in s.values())
