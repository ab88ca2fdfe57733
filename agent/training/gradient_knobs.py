"""Gradient-space knobs, applied in a step pre-hook of the optimizer (after backward, after
a GradScaler's ``unscale_``, before the step): ``orthograd``.

``orthograd`` is METRICS.md F "⊥Grad", the released ``OrthoGrad`` of "Grokking at the Edge
of Numerical Stability" (GROK-NS): each parameter's gradient loses its component along the
parameter, ``g <- g - (<theta, g> / ||theta||^2) theta``, and is rescaled to its original
norm. Why: once a model fits its training set, the gradient of the cross-entropy points
more and more along the weights (naive loss minimization, NLM: scaling the logits up lowers
the loss without learning anything), which inflates the weights and ends in softmax
collapse; removing that direction leaves only the updates that change what the model
computes. Per tensor, like the released code; device ops only (no host sync).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from neurotop.training.hooks import Call
from neurotop.training.knob_kinds import Knob, Value, _torch_optimizers

#: Below this ||theta||^2 (a zero-initialized bias) a gradient is left as it is: there is no
#: direction to remove (the released code's 1e-30 guards the division the same way).
EPS = 1e-30


class OrthoGrad(Knob):
    """``orthograd``: project every gradient orthogonal to its parameter, keeping its norm.

    While on, a step pre-hook of each optimizer does it, run first of its pre-hooks (after
    a GradScaler's ``unscale_``, which ``scaler.step`` does before ``optimizer.step``): so
    the gradient statistics (``nlm_cos``, ``grad_norm``: kept), ``grad_clip`` and the
    script's own pre-hooks all see the gradient the optimizer steps with. An optimizer
    attached after the knob was set is hooked at its first step (``at_pre_step``)."""

    type = "bool"

    def __init__(self, optimizer: Any) -> None:
        super().__init__("orthograd", "project each gradient orthogonal to its weights and"
                         " rescale it to its norm (OrthoGrad, METRICS.md F ⊥Grad; false: off)")
        self.optimizer = optimizer
        self.on = False
        self._handles: dict[int, Any] = {}  # id(optimizer) -> its pre-hook while on

    def get(self, target: str) -> bool:
        return self.on

    def put(self, target: str, value: Value) -> None:
        self.on = bool(value)
        if self.on:
            for opt in _torch_optimizers(self.optimizer):
                self._hook(opt)
        else:
            self.close()

    def close(self) -> None:
        self.on = False
        for h in self._handles.values():
            h.remove()
        self._handles.clear()

    def stepped_by(self, targets: list[str]) -> list[torch.optim.Optimizer]:
        return _torch_optimizers(self.optimizer)  # applied in each one's step pre-hook

    def at_pre_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """From the monitor's step pre-hook: an optimizer attached since the knob was set
        is projected now and hooked for its next steps."""
        if self.on and optimizer is not None and id(optimizer) not in self._handles:
            self._project(optimizer)
            self._hook(optimizer)

    def _hook(self, opt: torch.optim.Optimizer) -> None:
        if id(opt) in self._handles:
            return
        h = opt.register_step_pre_hook(Call(lambda o, args, kwargs: self._project(o)))
        hooks = h.hooks_dict_ref()
        if isinstance(hooks, OrderedDict):
            hooks.move_to_end(h.id, last=False)  # before the monitor's: it sees the result
        self._handles[id(opt)] = h

    def _project(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]
                  if p.grad is not None and not p.grad.is_sparse]
        if params:
            project(params)


@torch.no_grad()
def project(params: list[torch.Tensor]) -> None:
    """``p.grad <- rescaled(g - <p, g>/||p||^2 p)`` for each ``p``, in place, on the device.

    Dot products and norms in float32 at least (a bf16 dot of a large tensor loses the
    small remainder that is the whole result); the new gradient in the gradient's dtype."""
    for p in params:
        g = p.grad
        w = p.detach().reshape(-1)
        flat = g.reshape(-1)
        acc = torch.promote_types(flat.dtype, torch.float32)
        w32, g32 = w.to(acc), flat.to(acc)
        ww = torch.dot(w32, w32)
        coef = torch.where(ww > EPS, torch.dot(w32, g32) / ww.clamp_min(EPS), ww.new_zeros(()))
        orth = g32 - coef * w32
        scale = g32.norm() / orth.norm().clamp_min(EPS)
        g.copy_((orth * scale).view_as(g))
