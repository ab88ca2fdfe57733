"""Auto-pause: the agent thread decides, the training thread pauses at its next boundary.

The decision follows the detectors' alerts (``detectors``), which read each report's
host copy, so the training thread never reads a value back to decide. A ``nonfinite`` alert
(a NaN/Inf loss, gradient norm or activation) always pauses while the ``auto_pause`` knob is
on; other alerts pause when named in ``watch(auto_pause_alerts=...)``. The agent queues an
ordinary ``pause`` command with the reason; the pause lands at the next boundary (a step or
two after the bad one, since the report is read asynchronously) and its ack says why. One
auto-pause per incident: it re-arms when the operator resumes. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from neurotop.service.detectors import Alert, check_names

#: Alerts that pause whenever auto-pause is on.
ALWAYS = frozenset({"nonfinite"})


class Switch(Protocol):
    """The ``auto_pause`` knob as the policy reads it (``training.knobs.UserKnob``)."""

    @property
    def value(self) -> Any: ...


class AutoPause:
    """Turns alerts into at most one pause reason per incident, while ``switch`` is on."""

    def __init__(self, switch: Switch, alerts: Iterable[str] = ()) -> None:
        alerts = tuple(alerts)
        check_names("auto_pause_alerts", alerts)
        self.switch, self.alerts = switch, ALWAYS | set(alerts)
        self._fired_at: int | None = None  # the resume count when it last fired

    def alert(self, alert: Alert, resumes: int) -> str | None:
        """A detector raised ``alert``; the reason to pause if the policy names it.
        ``resumes``: how often the run was resumed so far (``Controller.resumes``)."""
        if alert.name not in self.alerts or not self.switch.value:
            return None
        if self._fired_at == resumes:
            return None  # already paused for this incident; wait for a resume
        self._fired_at = resumes
        return f"auto-pause: {alert.message} at step {alert.step}"
