"""Which modules the agent measures: leaves by name glob and type, plus residual blocks.

A layer's name is its ``named_modules()`` path, the one name used on the wire and in the
UI. Layers are listed in ``named_modules()`` order; the forward order (used to say which
layer first produced a non-finite value) is observed at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from neurotop.config import Config

#: Module families whose 3-D outputs are channels-first (N, C, L).
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
                   nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
                   nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                   nn.modules.pooling._AdaptiveMaxPoolNd)


@dataclass
class LayerSpec:
    """One measured module and what is measured on it."""

    name: str
    module: nn.Module
    kind: str  # "leaf", "block" or "attention"
    signal: bool  # measure RMS(dL/dh) on its output
    hist: bool  # histograms of its output and of dL/dh
    unit_dim: int | None  # None: the default rule (see ``unit_dim_for``)

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, g) for g in globs)


def _type_matches(module: nn.Module, types: tuple[str, ...]) -> bool:
    return not types or any(c.__name__ in types for c in type(module).__mro__)


def find_blocks(model: nn.Module) -> list[str]:
    """Children of a ModuleList/Sequential that are all non-leaf modules of one class,
    other than a plain container: a ``Sequential(Linear, ReLU)`` has no skip connection.

    That is how stacks of residual blocks (transformer layers, ResNet stages) are
    usually written; lists nested inside a found block are not searched.
    """
    found: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(b + ".") for b in found):
            continue
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.named_children())
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1:
            continue
        plain = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
        if all(any(c.children()) and type(c) not in plain for _, c in kids):
            found += [f"{name}.{k}" if name else k for k, _ in kids]
    return found


def select_layers(model: nn.Module, config: Config) -> list[LayerSpec]:
    """The measured layers, in ``named_modules()`` order.

    ``nn.MultiheadAttention`` is measured as one layer, on its output (kind
    ``"attention"``): it applies its ``out_proj`` functionally, so that child never runs as
    a module and is not listed."""
    blocks = set(find_blocks(model) if config.blocks is None else
                 [n for n, m in model.named_modules() if n and matches(n, config.blocks)])
    chosen: list[tuple[str, nn.Module, str]] = []
    attention: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(a + ".") for a in attention):
            continue
        picked = (matches(name, config.layers) and not matches(name, config.exclude)
                  and _type_matches(m, config.layer_types))
        if isinstance(m, nn.MultiheadAttention):
            attention.append(name)
        if name in blocks:
            chosen.append((name, m, "block"))
        elif isinstance(m, nn.MultiheadAttention) and picked:
            chosen.append((name, m, "attention"))
        elif not any(m.children()) and picked:
            chosen.append((name, m, "leaf"))
    if config.signal_layers is None:
        signal = {n for n, _, k in chosen if k == "block"} or {n for n, _, _ in chosen}
    else:
        signal = {n for n, _, _ in chosen if matches(n, config.signal_layers)}
    specs = []
    for name, m, kind in chosen:
        dims = [d for g, d in config.unit_dim.items() if fnmatchcase(name, g)]
        specs.append(LayerSpec(name, m, kind, name in signal,
                               config.hist_every > 0 and matches(name, config.hist_layers),
                               dims[0] if dims else None))
    return specs


def unit_dim_for(spec: LayerSpec, ndim: int) -> int:
    """The dimension holding the units of an output with ``ndim`` dimensions."""
    if ndim <= 1:
        return 0
    if spec.unit_dim is not None:
        return spec.unit_dim % ndim
    if ndim >= 4 or (ndim == 3 and isinstance(spec.module, _CHANNELS_FIRST)):
        return 1
    return ndim - 1
