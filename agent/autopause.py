"""Auto-pause: the agent thread decides, the training thread pauses at its next boundary.

The decision is made from each report's host copy (the one the agent publishes
anyway), so the training thread never reads a value back to decide. When a rule
fires, the agent queues an ordinary ``pause`` command with the reason; the pause
lands at the next boundary (a step or two after the bad one, since the report
is read asynchronously) and its ack says why. Torch-free.

Rules: a non-finite ``loss`` or ``grad_norm`` scalar, or a layer whose ``mean`` or
``max_abs`` is non-finite (or whose ``nonfinite`` count is > 0 where the statistics
engine reports one). A scalar that has never been finite is taken as "not reported"
(the report carries NaN for a loss the loop never observed), except for +-Inf, which
is never a placeholder. Named alerts can pause too (``alert``). One auto-pause per
incident: it re-arms when the operator resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

WATCHED_SCALARS = ("loss", "grad_norm")
FINITE_STATS = ("mean", "max_abs")


class AutoPause:
    """Turns reports (and alerts) into at most one pause reason per incident."""

    def __init__(self, enabled: Callable[[], bool], alerts: Iterable[str] = (),
                 resumes: Callable[[], int] = lambda: 0) -> None:
        self.enabled, self.alerts, self._resumes = enabled, frozenset(alerts), resumes
        self._seen_finite: set[str] = set()
        self._fired_at: int | None = None  # the resume count when it last fired

    def check_report(self, step: int, block: np.ndarray, scalars: np.ndarray,
                     schema: dict[str, Any]) -> str | None:
        """The reason to pause after this report, or None."""
        reason = self._nonfinite(step, block, scalars, schema)
        return self._fire(reason) if reason and self.enabled() else None

    def alert(self, name: str, message: str) -> str | None:
        """A detector raised ``name``; the reason to pause if the policy names it."""
        if name in self.alerts and self.enabled():
            return self._fire(f"alert {name}: {message}")
        return None

    def _fire(self, reason: str) -> str | None:
        if self._fired_at == self._resumes():
            return None  # already paused for this incident; wait for a resume
        self._fired_at = self._resumes()
        return f"auto-pause: {reason}"

    def _nonfinite(self, step: int, block: np.ndarray, scalars: np.ndarray,
                   schema: dict[str, Any]) -> str | None:
        names = list(schema.get("scalars", []))
        for name in WATCHED_SCALARS:
            if name not in names or names.index(name) >= len(scalars):
                continue
            v = float(scalars[names.index(name)])
            if np.isfinite(v):
                self._seen_finite.add(name)
            elif np.isinf(v) or name in self._seen_finite:
                return f"non-finite {name} ({v}) at step {step}"
        stats = list(schema.get("stats", []))
        if block.ndim != 2 or block.shape[1] != len(stats):
            return None
        bad = np.zeros(block.shape[0], dtype=bool)
        present = ~np.all(np.isnan(block), axis=1)  # an all-NaN row: the layer did not run
        for s in FINITE_STATS:
            if s in stats:
                bad |= present & ~np.isfinite(block[:, stats.index(s)])
        for j, s in enumerate(stats):
            if s.startswith("nonfinite"):
                bad |= np.nan_to_num(block[:, j]) > 0
        if bad.any():
            layers = list(schema.get("layers", []))
            i = int(np.argmax(bad))
            layer = layers[i] if i < len(layers) else str(i)
            return f"non-finite activations in layer {layer!r} at step {step}"
        return None
