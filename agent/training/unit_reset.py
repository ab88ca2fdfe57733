"""``reset_dead[GLOB]``: re-initialize the dead units of the matched layers, once, now.

METRICS.md F "Reset dead units" (AP, WC; the recipe of ReDo): a unit whose pre-activation
was never positive over the last ``dead_window`` reports (the collector's ``dead_frac_window``
units, ``LayerCollector.dead_units``) gets from the Linear/Conv layer that feeds it a fresh
incoming row (weight row and bias drawn as PyTorch's default ``reset_parameters`` draws them),
its outgoing column in the next Linear/Conv of its parent is zeroed (so the model computes
the same function at the boundary: the revived unit starts from no influence), and every
optimizer state tensor of those parameters shaped like them (Adam's ``exp_avg`` and
``exp_avg_sq``, SGD's ``momentum_buffer``, ...) is zeroed at those rows and columns, so that
no stale moment drags the fresh weights back. The units' past maxima are forgotten, so
``dead_frac_window`` judges them from the next report on.

A target is a measured Linear/Conv layer followed by an activation (a functional one, seen
in the autograd graph, or the next module of its parent) or a measured activation module
(its feeding layer is the module before it in its parent). The measured layer is found by
neurotop's own forward hook on it (``LayerHook``), whose monitor holds the collector. The
ack lists the units reset per feeding layer (``reset``, ``units_reset``) and, in ``notes``,
every target that could not be reset and why; a command that could reset nothing is
refused with those reasons. Under torch.distributed it is refused: each rank sees its own
dead units, and resetting different units would make the replicas differ.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from typing import Any

import torch
from torch import nn

from neurotop.training.hooks import LayerHook
from neurotop.training.knob_kinds import ModuleKnob, Value, _torch_optimizers

_FEEDERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU,
                nn.Mish, nn.Hardswish, nn.PReLU, nn.RReLU, nn.Threshold)
#: Modules between an activation and the layer its units feed that keep each unit apart.
_KEEP_UNITS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
               nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
               nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


class ResetDead(ModuleKnob):
    """``reset_dead[GLOB] true``: a one-shot action (nothing is held); ``knobs`` lists the
    units reset so far per layer."""

    type = "bool"

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        named = {n: m for n, m in model.named_modules() if n}
        super().__init__("reset_dead", "re-initialize the dead units of the layers matching"
                         " [GLOB]: fresh incoming rows, zero outgoing columns and optimizer"
                         " moments (one-shot: set it true)", named, need_glob=True)
        self.model, self.optimizer = model, optimizer
        self.names = {id(m): n for n, m in named.items()}
        self.total: dict[str, int] = {}  # feeding layer -> units reset since watch
        self._outcome: dict[str, Any] = {"reset": {}, "notes": []}
        self._done: set[int] = set()  # feeding layers reset by this command
        self._draws = 0  # re-initializations so far: each draws from its own seed

    def targets(self, sel: str | None) -> list[str]:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("reset_dead is not available under torch.distributed: each rank"
                             " sees its own dead units, the replicas would differ")
        if sel is not None:  # layers only: a glob like * must not list every container
            hits = [n for n, m in self.modules.items() if fnmatch.fnmatchcase(n, sel)
                    and not any(m.children())]
            if hits:
                return hits
        return super().targets(sel)

    def get(self, target: str) -> bool:
        return False  # an action: nothing stays set

    def listed(self) -> dict[str, int]:
        return dict(self.total)

    def refuse(self, value: Value) -> str | None:
        if not value:
            return ("reset_dead is a one-shot action: `set reset_dead[GLOB] true` resets the"
                    " dead units of the matched layers now")
        return super().refuse(value)

    def put(self, target: str, value: Value) -> None:
        """Reset ``target``'s dead units now (at the boundary); never raises for a target it
        cannot reset: it says why in the ack's ``notes``."""
        why = self._reset(target)
        if why:
            self._outcome["notes"].append(f"{target}: {why}")

    def outcome(self) -> dict[str, Any]:
        """What the ack adds (then a next command starts afresh). Raises ``ValueError`` when
        no target could be reset: nothing was changed."""
        out, self._outcome, self._done = self._outcome, {"reset": {}, "notes": []}, set()
        if not out["reset"]:
            notes = out["notes"]
            more = f"; and {len(notes) - 4} more" if len(notes) > 4 else ""
            raise ValueError("reset_dead: nothing to reset: " + "; ".join(notes[:4]) + more)
        out["units_reset"] = sum(out["reset"].values())
        return out

    # -- the reset ---------------------------------------------------------------------------

    def _reset(self, target: str) -> str | None:
        m = self.modules[target]
        parent_name, _, child = target.rpartition(".")
        parent = self.modules[parent_name] if parent_name else self.model
        siblings = list(parent.named_children())
        pos = next(i for i, (n, _) in enumerate(siblings) if n == child)
        where = _measured(m)
        if where is None:
            return "not a measured layer (no dead-unit statistics)"
        collector, i = where
        layers = [i]  # the measured layers whose dead-unit window the reset restarts
        if isinstance(m, _FEEDERS):
            feeder, act = m, pos + 1
            nxt = siblings[act][1] if act < len(siblings) else None
            if not collector.activations[i] and not _is_activation(nxt):
                return "no activation follows it, so its units cannot die"
            if collector.activations[i] and not _is_activation(nxt):
                act = pos  # a functional activation: the next module reads its units
            elif nxt is not None and (nw := _measured(nxt)) is not None:
                layers.append(nw[1])
        elif _is_activation(m) or collector.activations[i]:
            prev = siblings[pos - 1][1] if pos > 0 else None
            if not isinstance(prev, _FEEDERS):
                found = type(prev).__name__ if prev is not None else "nothing"
                return (f"no Linear/Conv layer feeds it in its parent (the module before it:"
                        f" {found}); nothing reset")
            feeder, act = prev, pos
            if (pw := _measured(prev)) is not None:
                layers.append(pw[1])
        else:
            return f"neither a Linear/Conv layer nor an activation ({type(m).__name__})"
        name = self.names.get(id(feeder), target)
        if id(feeder) in self._done:
            return None  # reached by another target of this command (fc1 and its ReLU)
        mask = collector.dead_units(i)
        units = _out_units(feeder)
        if mask is None:
            return "no report has measured its units yet (or dead-unit statistics are off)"
        if mask.numel() != units:
            return f"{mask.numel()} units measured, but {name} has {units} outputs"
        idx = mask.nonzero().flatten()
        n = int(idx.numel())  # one read of the device, at a boundary, once per command
        self._done.add(id(feeder))
        self._outcome["reset"][name] = n
        if not n:
            return None
        consumer, cols, why = _consumer(siblings, act, units, idx)
        with torch.no_grad():
            self._reinit(feeder, idx, name)
            self._zero_moments(feeder.weight, idx, 0)
            if feeder.bias is not None:
                self._zero_moments(feeder.bias, idx, 0)
            if consumer is not None:
                consumer.weight[:, cols] = 0
                self._zero_moments(consumer.weight, cols, 1)
        for j in set(layers):
            collector.restart_units(j, idx)
        self.total[name] = self.total.get(name, 0) + n
        if why:
            self._outcome["notes"].append(f"{name}: {why}")
        return None

    def _reinit(self, layer: nn.Module, idx: torch.Tensor, name: str) -> None:
        """Rows ``idx`` of ``layer`` drawn as ``reset_parameters`` draws them (kaiming
        uniform, a = sqrt(5); bias uniform within 1/sqrt(fan_in)), from a generator of
        neurotop's own: the script's random stream is left as it was."""
        w = layer.weight
        self._draws += 1
        gen = torch.Generator(device=w.device)
        gen.manual_seed(zlib.crc32(f"{name}:{self._draws}".encode()))
        fresh = torch.empty_like(w)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
        w[idx] = fresh[idx]
        if w.grad is not None:
            w.grad[idx] = 0
        if layer.bias is not None:
            fan_in = w[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            b = torch.empty_like(layer.bias)
            nn.init.uniform_(b, -bound, bound, generator=gen)
            layer.bias[idx] = b[idx]
            if layer.bias.grad is not None:
                layer.bias.grad[idx] = 0

    def _zero_moments(self, p: torch.Tensor, idx: torch.Tensor, dim: int) -> None:
        """Zero the slices ``idx`` along ``dim`` of every optimizer state tensor shaped like
        ``p`` (and of its gradient, for a loop that accumulates)."""
        for opt in _torch_optimizers(self.optimizer):
            for v in opt.state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    v.index_fill_(dim, idx.to(v.device), 0)
        if p.grad is not None and p.grad.shape == p.shape and not p.grad.is_sparse:
            p.grad.index_fill_(dim, idx.to(p.grad.device), 0)


def _measured(m: nn.Module | None) -> tuple[Any, int] | None:
    """``(collector, layer index)`` of a module neurotop measures, from its ``LayerHook``."""
    if m is None:
        return None
    for h in m._forward_hooks.values():
        if isinstance(h, LayerHook):
            collector = getattr(h.window, "collector", None)
            if collector is not None:
                return collector, h.i
    return None


def _is_activation(m: nn.Module | None) -> bool:
    return isinstance(m, _ACTIVATIONS)


def _out_units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _consumer(siblings: list[tuple[str, nn.Module]], act: int, units: int,
              idx: torch.Tensor) -> tuple[nn.Module | None, torch.Tensor, str]:
    """The layer that reads the units (the next Linear/Conv after position ``act`` of the
    parent, past dropout, pooling and one Flatten), and its input columns of units ``idx``;
    or None and why its weights are left as they are."""
    flat = False
    for _, m in siblings[act + 1:]:
        if isinstance(m, _KEEP_UNITS):
            continue
        if isinstance(m, nn.Flatten) and not flat:
            flat = True
            continue
        if isinstance(m, nn.Linear) and (m.in_features == units or (
                flat and m.in_features % units == 0)):
            per = m.in_features // units  # a flattened [C, H, W]: C-major columns
            cols = (idx[:, None] * per + torch.arange(per, device=idx.device)).flatten()
            return m, cols, ""
        if isinstance(m, _FEEDERS[1:]) and not flat and m.in_channels == units \
                and m.groups == 1:
            return m, idx, ""
        return None, idx, (f"its units feed a {type(m).__name__}, not a Linear/Conv reading"
                           f" {units} inputs: outgoing weights not zeroed")
    return None, idx, "no layer after it in its parent reads its units: outgoing weights not zeroed"
