"""A ``torch.amp.GradScaler`` seen from the training thread: its loss scale, to report gradient
statistics in unscaled units, and the steps it skipped, without reading a device value.

The scaler skips ``optimizer.step()`` when the scaled gradients hold an Inf or NaN, so the
optimizer's step hooks never see a skipped step. ``watch(..., scaler=scaler)`` therefore
wraps ``scaler.step`` on that one instance (restored by ``close``): a call for the watched
optimizer after which the optimizer's post-step hook did not run is a skipped step. That is
a Python comparison of two step counts, so counting costs nothing on the device and reads
nothing back (the scaler itself reads its ``found_inf`` flag to decide; neurotop adds no
sync). Optimizers that take the scaler into their own kernel (``fused=True``, which the
scaler steps always) are not covered: their skipped steps look like steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: Skipped steps in a row after which the monitor reports skipped steps' windows (every
#: ``report_every`` skips): a scaler calibrating its scale halves it a few times (from 2**16
#: to what fp16 holds), never this often.
STUCK = 32


class ScalerWatch:
    """The loss scale of one scaler and how many steps it skipped of the optimizer whose
    step is the step boundary (``is_boundary``); ``steps()``: the boundaries so far."""

    def __init__(self, scaler: Any, is_boundary: Callable[[torch.optim.Optimizer], bool],
                 steps: Callable[[], int], on_skip: Callable[[], None]) -> None:
        if not (callable(getattr(scaler, "step", None)) and hasattr(scaler, "is_enabled")):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self.skipped = 0  # steps the scaler skipped, since ``watch``
        self.streak = 0  # ... in a row, up to now
        original = scaler.step

        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            before = steps()
            out = original(opt, *args, **kwargs)
            if is_boundary(opt) and scaler.is_enabled():
                if steps() == before:
                    self.skipped += 1
                    self.streak += 1
                    on_skip()
                else:
                    self.streak = 0
            return out

        self._wrapper = step
        scaler.step = step

    def scale(self) -> torch.Tensor | None:
        """The current loss scale as the scaler's own device tensor (not read), or None
        before the first ``scaler.scale(loss)`` and when the scaler is disabled. Between
        a backward and ``scaler.update()`` it is the scale that backward used."""
        s = getattr(self.scaler, "_scale", None)
        return s if isinstance(s, torch.Tensor) and self.scaler.is_enabled() else None

    def close(self) -> None:
        """Give the scaler its own ``step`` back."""
        if self.scaler.__dict__.get("step") is self._wrapper:
            del self.scaler.step
