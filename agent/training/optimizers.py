"""The models and optimizers of one run, and the one step boundary they share.

A run watches one module, or several (a GAN's generator and discriminator) given as a
dict (their names) or a list (named by class), gathered under one ``nn.ModuleDict`` so
that every layer and parameter is named by a path that says which model it is in
(``D.main.0``). It has no optimizer (the loop calls ``Monitor.step()``), one, or several.
With several, each optimizer's parameter statistics are taken around its own step, the
first in the report window, on the parameters it updates (so D's rows are D's gradients at
D's step, not what G's backward added to them later), and the step boundary (report,
commands, pause) is the last optimizer's step: list them in the order the loop steps them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from neurotop.service.finalize import lr_names
from neurotop.training.param_stats import ParamStats

Models = nn.Module | Mapping[str, nn.Module] | Sequence[nn.Module]
Optimizers = (torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer]
              | Sequence[torch.optim.Optimizer] | None)


def gather_models(models: Models) -> tuple[nn.Module, list[nn.Module]]:
    """The module whose paths name layers and parameters, and the user's models in order.

    One module is itself; several become the children of an ``nn.ModuleDict``, named by
    their dict keys or, in a list, by their class (``Generator``, ``Discriminator``; a
    repeated class gets ``_1``, ``_2``...). A model compiled before ``watch`` is watched
    as the module it compiles (``_orig_mod``), so its layers keep their names."""
    if isinstance(models, nn.Module):
        models = uncompiled(models)
        return models, [models]
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        named = {}
        for m in models:
            base = type(m).__name__
            name, k = base, 0
            while name in named:
                k += 1
                name = f"{base}_{k}"
            named[name] = m
    named = {k: uncompiled(m) if isinstance(m, nn.Module) else m for k, m in named.items()}
    if not named or not all(isinstance(m, nn.Module) for m in named.values()):
        raise TypeError(f"watch() takes an nn.Module, or a dict or list of them; got {models!r}")
    return nn.ModuleDict(named), list(named.values())


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``'d one wraps (hooks on it run in the compiled call)."""
    return getattr(model, "_orig_mod", model) if isinstance(
        model, torch._dynamo.eval_frame.OptimizedModule) else model


def name_optimizers(optimizers: Optimizers, model: nn.Module,
                    taken: Sequence[str] = ()) -> list[tuple[str, torch.optim.Optimizer]]:
    """Each optimizer with its name: its dict key, else the first path component its
    parameters share (``G``, ``D``, ``head``), else ``opt<k>``. ``taken``: names in use."""
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    if isinstance(optimizers, Mapping):
        return [(str(k), o) for k, o in optimizers.items()]
    paths = {id(p): n for n, p in model.named_parameters()}
    out: list[tuple[str, torch.optim.Optimizer]] = []
    used = set(taken)
    for k, opt in enumerate(optimizers, start=len(taken)):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"not a torch.optim.Optimizer: {opt!r}")
        heads = {paths.get(id(p), "").split(".")[0] for g in opt.param_groups
                 for p in g["params"]}
        name = heads.pop() if len(heads) == 1 and "" not in heads else f"opt{k}"
        if name in used:
            name = f"opt{k}"
        used.add(name)
        out.append((name, opt))
    return out


class Watched:
    """One optimizer of the run and its parameter statistics in the current window."""

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, stats: ParamStats) -> None:
        self.name, self.optimizer, self.stats = name, optimizer, stats
        self.measured = False  # statistics taken before a step of it in this window
        self.done = False  # and after that step
        self.block: torch.Tensor | None = None  # [params x PARAM_STATS], this window
        self.handles: list[Any] = []


class OptimizerSet:
    """The run's optimizers as the knobs and the snapshot see one: all param groups in one
    list (``lr[i]`` indexes it; with several optimizers ``lr[NAME]`` picks one's groups,
    by ``group_names``), and a ``state_dict`` per optimizer."""

    def __init__(self) -> None:
        self.named: list[tuple[str, torch.optim.Optimizer]] = []

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        if len(self.named) == 1:
            return self.named[0][1].param_groups
        return [g for _, o in self.named for g in o.param_groups]

    @property
    def group_names(self) -> list[str] | None:
        """The optimizer name of each param group, with several optimizers."""
        if len(self.named) < 2:
            return None
        return [n for n, o in self.named for _ in o.param_groups]

    def lr_names(self) -> list[str]:
        """Scalar names of the groups' learning rates: ``lr``, ``lr.1``... with one
        optimizer; ``lr.G``, ``lr.G.1``, ``lr.D``... with several."""
        if len(self.named) < 2:
            return lr_names(len(self.param_groups)) if self.named else []
        return [f"lr.{n}" + (f".{k}" if k else "") for n, o in self.named
                for k in range(len(o.param_groups))]

    def state_dict(self) -> dict[str, Any]:
        if len(self.named) == 1:
            return self.named[0][1].state_dict()
        return {n: o.state_dict() for n, o in self.named}
