"""The knobs from the training-dynamics papers (METRICS.md F), as ``Knobs`` registers them:
``orthograd``, ``topk[GLOB]``, ``temperature[GLOB]``, ``reset_dead[GLOB]``."""

from __future__ import annotations

from typing import Any

from torch import nn

from neurotop.training.activation_knobs import Temperature, TopK
from neurotop.training.gradient_knobs import OrthoGrad
from neurotop.training.knob_kinds import Knob
from neurotop.training.unit_reset import ResetDead


def research_knobs(model: nn.Module, named: dict[str, nn.Module], optimizer: Any) -> list[Knob]:
    """``OrthoGrad`` first (the step pre-hook calls it by position), then the module knobs."""
    return [OrthoGrad(optimizer), TopK(named), Temperature(named), ResetDead(model, optimizer)]
