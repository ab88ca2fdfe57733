"""The heat strip's data without a gather per frame: one statistic of every layer over the
run, kept contiguous and extended by the rows that arrived since the last frame.

``RunStore.stat_series`` gathers ``[rows x layers]`` out of ``[rows x layers x stats]``
at every call, a strided read of the whole history (2 ms at 200 layers and 5k rows, at
every overview frame). Rows are only ever appended, and the store's past changes only when
it compacts, so the gather can be done once and extended. The arrays a frame gets are
read-only views of rows that are never written again: a later frame's rows go past them,
and a rebuild (a compaction, another statistic, a rewind) starts new arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from neurotop.tui.data.frame import Series
    from neurotop.tui.data.store import RunStore


def _frozen(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


class HeatCache:
    """``stat_series(stat)`` of one store, for its frames; call it under the store's lock."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._steps = np.empty(0, np.int64)
        self._values = np.empty((0, 0), np.float32)
        self._past = 0  # rows from the store's compacted past
        self._n = 0  # rows filled: the past, then the store's recent rows

    def series(self, store: RunStore, stat: str) -> Series:
        """The same arrays as ``store.stat_series(stat)``, as read-only views."""
        stats = store.schema["stats"] if store.schema is not None else ()
        if store._stats is None or stat not in stats:
            return np.empty(0, np.int64), np.empty((0, 0), np.float32)
        sm, steps, rows = store.summary, store._steps.view(), store._stats.view()
        # What the rows so far depend on: the statistic, the store's arrays (the object, so
        # a new one never passes for it), its past, the first recent step (a compaction
        # moves it) and its rewinds (rows appended after one replace the cached ones, even
        # when they reach past them before the next frame); new rows only extend them.
        key = (stat, store._stats, sm.n, sm.res, int(steps[0]) if len(steps) else None,
               store.rewinds)
        if key != self._key or len(steps) < self._n - self._past:
            self._rebuild(store, stat, key)
        else:
            self._extend(steps, rows, stats.index(stat))
        n = self._n
        return _frozen(self._steps[:n]), _frozen(self._values[:n])

    def _rebuild(self, store: RunStore, stat: str, key: tuple) -> None:
        steps, values = store.stat_series(stat)
        self._key, self._past = key, len(steps) - store._steps.n
        self._steps, self._values, self._n = steps, values, len(steps)

    def _extend(self, steps: np.ndarray, rows: np.ndarray, j: int) -> None:
        have = self._n - self._past  # recent rows already here
        new = len(steps) - have
        if not new:
            return
        end = self._n + new
        if end > len(self._steps):  # room for more: a new array (frames keep the old one)
            cap = max(end, 2 * len(self._steps), 64)
            grown_s = np.empty(cap, np.int64)
            grown_v = np.empty((cap, self._values.shape[1]), np.float32)
            grown_s[: self._n], grown_v[: self._n] = self._steps[: self._n], \
                self._values[: self._n]
            self._steps, self._values = grown_s, grown_v
        self._steps[self._n:end] = steps[have:]
        self._values[self._n:end] = rows[have:, :, j]
        self._n = end
