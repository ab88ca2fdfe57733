"""Activation-space knobs: forward hooks on the matched modules that return a changed output.

- ``topk[GLOB] k``: keep the ``k`` largest activations of each sample (along the units: the
  last dimension, channels for outputs of 4 or more dimensions, as the statistics count
  units) and zero the rest. METRICS.md F "Top-k / threshold activation" (LAZY, SPARK, CHESS):
  an enforced sparsity level, for robustness and calibration (a conv's k channels at each
  position). The output is ``out * mask``,
  so the gradient flows through the kept units only. ``k`` at or above the unit count
  keeps everything; 0 removes the hook.
- ``temperature[GLOB] T``: the matched module's output divided by ``T`` (a head's logits:
  METRICS.md F "Logit temperature"). ``T > 1`` softens a softmax that is collapsing
  (GROK-NS) or overconfident (E12); 1 removes the hook.

Both hooks are registered first among the module's forward hooks (``prepend``), so what
neurotop measures of that module (its layer row, a ``head=`` hook's statistics) and
whatever the rest of the model computes see the changed output. The values change only at
step boundaries (they are read by the hook at each forward, as floats and ints: no device
value is read back). A module that returns no tensor (or a tuple) is left as it is, its
first tensor changed; non-floating outputs are never touched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from neurotop.training.knob_kinds import ModuleKnob, Value
from neurotop.training.layers import _CHANNELS_FIRST

#: Largest ``k``: far above any layer's width; a ``k`` above a layer's units keeps them all.
TOPK_MAX = 1_000_000
#: Temperature bounds: beyond them the logits are scaled by more than 1000x either way.
T_MIN, T_MAX = 1e-3, 1e3


def _first_tensor(out: Any) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], Any]]:
    """The tensor a hook changes and how to put the changed one back into the output."""
    if isinstance(out, torch.Tensor):
        return out, lambda t: t
    if isinstance(out, (tuple, list)):
        for i, o in enumerate(out):
            if isinstance(o, torch.Tensor):
                def rebuild(t: torch.Tensor, i: int = i) -> Any:
                    items = list(out)
                    items[i] = t
                    return type(out)(items) if isinstance(out, tuple) else items
                return o, rebuild
    return None, lambda t: t


def _unit_dim(module: nn.Module, t: torch.Tensor) -> int:
    """The units' dimension, as the statistics count them (``layers.unit_dim_for``):
    channels for 4+ dims and for a channels-first module's 3, else the last."""
    if t.dim() >= 4 or (t.dim() == 3 and isinstance(module, _CHANNELS_FIRST)):
        return 1
    return t.dim() - 1


class _OutputKnob(ModuleKnob):
    """A per-module value that a forward hook (first of the module's) applies to its output;
    ``off`` is the value that removes the hook."""

    off: Value = 0

    def __init__(self, name: str, doc: str, modules: dict[str, nn.Module], *,
                 min: float, max: float) -> None:
        super().__init__(name, doc, modules, need_glob=True, min=min, max=max)
        self.vals: dict[str, Value] = {}

    def get(self, target: str) -> Value:
        return self.vals.get(target, self.off)

    def listed(self) -> dict[str, Value]:
        return dict(self.vals)

    def put(self, target: str, value: Value) -> None:
        if value == self.off:
            self.vals.pop(target, None)
            self._unhook(target)
            return
        self.vals[target] = value
        register = functools.partial(self.modules[target].register_forward_hook, prepend=True)
        self._hook(target, register, self._hook_fn(target))

    def _hook_fn(self, target: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            v = self.vals.get(target)
            t, rebuild = _first_tensor(out)
            if v is None or t is None or not t.is_floating_point() or t.dim() == 0:
                return None
            return rebuild(self.change(module, t, v))
        return hook

    def change(self, module: nn.Module, t: torch.Tensor, value: Value) -> torch.Tensor:
        raise NotImplementedError


class TopK(_OutputKnob):
    """``topk[GLOB]``: the k largest activations per sample (and position) are kept."""

    type = "int"
    off = 0

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__("topk", "keep the k largest activations of each sample of the"
                         " modules matching [GLOB], zero the rest (0: off)", modules,
                         min=0, max=TOPK_MAX)

    def put(self, target: str, value: Value) -> None:
        super().put(target, int(value))

    def change(self, module: nn.Module, t: torch.Tensor, k: Value) -> torch.Tensor:
        d = _unit_dim(module, t)
        if int(k) >= t.shape[d]:
            return t
        idx = t.detach().topk(int(k), dim=d, sorted=False).indices
        keep = torch.zeros(t.shape, dtype=torch.bool, device=t.device).scatter_(d, idx, True)
        return t * keep


class Temperature(_OutputKnob):
    """``temperature[GLOB]``: the output (a head's logits) divided by T. A user knob of the
    same name (``mon.knob("temperature", ...)``, read by the script itself) takes its
    place: the script's own temperature is the one its operator means."""

    type = "float"
    off = 1.0
    yields_to_user = True

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__("temperature", "divide the outputs (a head's logits) of the modules"
                         " matching [GLOB] by T (1: off)", modules, min=T_MIN, max=T_MAX)

    def put(self, target: str, value: Value) -> None:
        super().put(target, float(value))

    def change(self, module: nn.Module, t: torch.Tensor, temp: Value) -> torch.Tensor:
        return t * (1.0 / float(temp))
