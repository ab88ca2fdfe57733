"""PyTorch Lightning: ``Trainer(callbacks=[NeurotopCallback(report_every=5)])``.

The callback is a ``lightning.pytorch.Callback`` (the ``lightning`` package, 2.2 or later).
The standalone ``pytorch_lightning`` package's ``Trainer`` takes it too (it calls callback
hooks by name, and the callback reads only what both share): checked by hand with
``pytorch_lightning`` 2.6, not covered by the tests, which use ``lightning.pytorch``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # the extra is not installed
    raise ImportError("neurotop.integrations.lightning needs Lightning:"
                      " pip install 'neurotop[lightning]'") from e

from neurotop.monitor import Monitor, watch

log = logging.getLogger("neurotop.agent")


class NeurotopCallback(pl.Callback):
    """Watches the ``LightningModule`` and its optimizers for one ``fit``.

    ``watch_options`` are ``neurotop.watch``'s (``name=``, ``report_every=``, ``record=``...);
    the callback adds the optimizers, the LR scheduler (with one optimizer and one
    scheduler) and, under ``precision="16-mixed"``, the precision plugin's GradScaler
    (``scaler=``, so gradient statistics are unscaled). ``monitor``: the ``Monitor``, from
    ``on_train_start`` on (still readable after ``fit`` returns).

    What it maps onto Lightning's loop:

    - The step boundary is the optimizer's step (with several, in manual optimization, the
      last optimizer ``configure_optimizers`` returns: step them in that order): reports,
      commands and ``pause``, which holds the loop there. Lightning calls the training
      closure (forward, backward, ``on_before_optimizer_step``, gradient clipping) inside
      ``optimizer.step(closure)``, which would run the optimizer's step pre-hook before the
      backward; the callback makes each optimizer run the closure first, then its step, as
      the built-in optimizers do themselves (``LBFGS``, which calls the closure many
      times, is left alone: its statistics and knobs act before the backward).
    - Gradients are measured as the backward accumulates them: before Lightning's
      ``gradient_clip_val`` clipping and, under 16-mixed, unscaled.
    - The loss is the one each backward gets (``on_before_backward``), observed without a
      read back: under automatic optimization multiplied back by ``accumulate_grad_batches``
      (Lightning divides it) and divided by the loss scale under 16-mixed, so each report
      shows the step's true mean loss; layer statistics pool the micro-batches of a step.
      In manual optimization each ``manual_backward``'s loss goes to the next optimizer
      step: ``loss`` for the boundary optimizer's, ``loss.NAME`` for the others'.
    - ``stop`` sets ``trainer.should_stop`` after the step it landed at.
    - Validation and sanity-check loops run in eval mode without grad: not measured.
    - ``samples_per_s`` counts the module's own forward calls (``self(x)`` in
      ``training_step``).
    """

    def __init__(self, **watch_options: Any) -> None:
        self.watch_options = watch_options
        self.monitor: Monitor | None = None
        self._undo: list[Callable[[], None]] = []
        self._losses: list[torch.Tensor] = []  # since the last optimizer step
        self._accumulated = 1  # what Lightning divided the backward's loss by

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()  # a previous ``fit``'s
        optimizers = list(trainer.optimizers)
        options = dict(self.watch_options)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            options.setdefault("scaler", scaler)
        configs = trainer.lr_scheduler_configs
        if len(optimizers) == 1 and len(configs) == 1:
            options.setdefault("scheduler", configs[0].scheduler)
        self.monitor = watch(pl_module, optimizers, **options)
        self._undo = [_closure_first(opt) for opt in optimizers]
        self._accumulated = (trainer.accumulate_grad_batches
                             if pl_module.automatic_optimization else 1)
        self._losses = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        mon = self.monitor
        if mon is None:
            return
        loss = loss.detach()
        scale = mon.amp.scale() if mon.amp is not None else None
        if scale is not None:  # the plugin scaled it before this hook
            loss = loss / scale
        if self._accumulated != 1:
            loss = loss * self._accumulated
        self._losses.append(loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.monitor is not None:
            self._observe(self._loss_name(optimizer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None and self.monitor.should_stop:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _observe(self, name: str) -> None:
        for loss in self._losses:  # several in one step: the report gets their mean
            self.monitor.observe(**{name: loss})
        self._losses.clear()

    def _loss_name(self, optimizer: torch.optim.Optimizer) -> str:
        """``loss`` for the boundary optimizer's (the last one), ``loss.NAME`` for another's."""
        named = self.monitor.optimizers.named
        for name, opt in named[:-1]:
            if opt is optimizer:
                return f"loss.{name}"
        return "loss"

    def _close(self) -> None:
        """Give the optimizers their own ``step`` back, then close the monitor (which
        removes its own wrapper from under ours)."""
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        if self.monitor is not None:
            self.monitor.close()


def _closure_first(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """Make ``opt.step(closure)`` run ``closure()`` and then ``opt.step()``, so the step's
    pre-hooks see the closure's gradients; returns what undoes it."""
    if isinstance(opt, torch.optim.LBFGS):
        log.warning("neurotop: LBFGS calls its closure inside its step; its parameter"
                    " statistics and knobs act before the closure's backward")
        return lambda: None
    inner, had = opt.step, "step" in opt.__dict__

    def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if closure is None:
            return inner(**kwargs)
        with torch.enable_grad():
            loss = closure()
        inner(**kwargs)
        return loss

    functools.update_wrapper(step, inner)  # keeps an LR scheduler's mark on the step
    opt.step = step

    def undo() -> None:
        if opt.__dict__.get("step") is step:
            if had:
                opt.step = inner
            else:
                del opt.step
    return undo
