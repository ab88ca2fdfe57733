"""The hooks neurotop leaves on a user's modules and optimizers, as module-level classes, so
that a watched model can still be copied and saved.

``copy.deepcopy(model)`` (an EMA or best-model copy) and ``torch.save(model)`` copy the
module's hook dictionaries. A closure cannot be pickled, and a bound method of the monitor
drags its threads, locks and sockets into the copy (which fails) or, deep-copied as a
reference, would make the copy feed this run. Each hook here copies, pickles and unpickles
as ``Inert``: a no-op that holds nothing. The copy trains without neurotop; the original
keeps reporting. Loading a pickled module needs neurotop importable, as it needs the
model's own classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


def eager_unless_compiling(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` for a hook body: called directly when run eagerly, and through
    ``torch.compiler.disable`` (a graph break: the body runs eagerly) while dynamo traces
    it, where ``is_compiling()`` is a constant. The disabled wrapper cost 2-12 us a call
    (torch 2.13, CPU), paid by every measured layer's call in a report window."""
    disabled = torch.compiler.disable(fn)

    def call(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return disabled(*args)
        return fn(*args)
    return call


class Inert:
    """What a neurotop hook becomes in a copy of the model: it does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (Inert, ())


class _InertWhenCopied:
    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (Inert, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> Inert:
        return Inert()


class Call(_InertWhenCopied):
    """``fn`` as a hook (optimizer step hooks, knob hooks): called with the hook's arguments."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class Window(Protocol):
    """What the module hooks read (the monitor): whether this is a report window, whether
    forwards that do not train count, and what to call then."""

    _active: bool
    _measure_eval: bool

    def _measure(self, i: int, out: Any, args: Any) -> None: ...

    def _forward_started(self) -> None: ...

    def _count(self, args: Any, kwargs: Any) -> None: ...


def training_forward(root: nn.Module) -> bool:
    """A forward that trains: it tracks gradients and its model is in train mode. Eval and
    generation (``no_grad``, ``inference_mode``, ``model.eval()``) inside a report window
    are not measured by default (``Config.measure_eval``). The flag is the watched model's,
    not the layer's, so a layer kept in eval mode while the model trains (a frozen
    BatchNorm) is still measured."""
    return torch.is_grad_enabled() and root.training


class LayerHook(_InertWhenCopied):
    """Forward hook of measured layer ``i``: returns at once outside report windows."""

    def __init__(self, window: Window, i: int, root: nn.Module) -> None:
        self.window, self.i, self.root = window, i, root

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        w = self.window
        if w._active and (w._measure_eval or training_forward(self.root)):
            w._measure(self.i, out, args)


class ForwardStart(_InertWhenCopied):
    """Forward pre-hook of each watched model: in report windows, a forward begins (the
    collector counts each layer's calls per forward, to tell a module used twice)."""

    def __init__(self, window: Window, root: nn.Module) -> None:
        self.window, self.root = window, root

    def __call__(self, module: nn.Module, args: Any) -> None:
        w = self.window
        if w._active and (w._measure_eval or training_forward(self.root)):
            w._forward_started()


class InputHook(_InertWhenCopied):
    """Forward pre-hook (with kwargs) of the model: counts the samples of training forwards."""

    def __init__(self, window: Window, root: nn.Module) -> None:
        self.window, self.root = window, root

    def __call__(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        w = self.window
        if w._active and training_forward(self.root):
            w._count(args, kwargs)
