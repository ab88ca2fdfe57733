"""The Hugging Face ``Trainer``: ``Trainer(..., callbacks=[NeurotopCallback(report_every=5)])``.

Written against ``transformers`` 4.40 to 5.x with ``accelerate``; the Accelerate loop
pattern (no ``Trainer``) needs no callback: see the README's "Integrations".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

try:
    import transformers
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler
except ImportError as e:  # the extra is not installed
    raise ImportError("neurotop.integrations.transformers needs transformers and accelerate:"
                      " pip install 'neurotop[transformers]'") from e

from neurotop.monitor import Monitor, watch
from neurotop.training.hooks import Call


class NeurotopCallback(transformers.TrainerCallback):
    """Watches the ``Trainer``'s model and optimizer for one ``train()``.

    ``watch_options`` are ``neurotop.watch``'s (``name=``, ``report_every=``, ``record=``...).
    From ``on_train_begin`` it takes ``model``, ``optimizer`` and ``lr_scheduler`` from the
    callback's arguments (unwrapping Accelerate's wrappers, so ``set lr`` rescales the
    schedule, and passing Accelerate's GradScaler under ``fp16=True`` as ``scaler=``).
    ``monitor``: the ``Monitor`` (still readable after ``train()`` returns).

    - The step boundary is the optimizer's step: reports, commands and ``pause``, which
      holds the loop there. Under ``gradient_accumulation_steps`` that is once per
      accumulated step; layer statistics pool its micro-batches.
    - Gradients are measured as the backward accumulates them, so ``grad_norm`` is the
      norm before the ``max_grad_norm`` clip (the Trainer's logged ``grad_norm``).
    - The loss: no callback event carries the loss tensor (``on_log`` gets a float every
      ``logging_steps``; ``on_step_end`` and the optimizer events get none). So a forward
      hook on the model keeps each training micro-batch's ``outputs["loss"]`` (a device
      tensor, not read), and a step pre-hook on the optimizer (the last thing before its
      step, after the clip, in every Trainer version) observes the step's loss as
      ``Trainer.training_step`` normalizes it: the sum of the micro-batches' losses when
      the model was given ``num_items_in_batch`` (it divided by the step's token count),
      else their mean. That is the value the Trainer logs. A step the GradScaler skips
      observes nothing. Both hooks are inert in a copy of the model
      (``copy.deepcopy``, ``torch.save``). A loss the model does not return
      (``compute_loss_func``, label smoothing, an overridden ``compute_loss``) is not seen:
      observe it yourself with ``callback.monitor.observe(loss=...)``.
    - ``stop`` sets ``control.should_training_stop`` after the step it landed at.
    - Evaluation runs in eval mode without grad: not measured, and its loss not observed.
    """

    def __init__(self, **watch_options: Any) -> None:
        self.watch_options = watch_options
        self.monitor: Monitor | None = None
        self._handles: list[Any] = []
        self._losses: list[torch.Tensor] = []  # this step's micro-batches
        self._per_item = False  # the model divided by the whole step's item count

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        self._close()  # a previous ``train()``'s
        if model is None:
            raise ValueError("NeurotopCallback needs the Trainer's model (got model=None)")
        options = dict(self.watch_options)
        scaler = getattr(optimizer, "scaler", None)  # Accelerate's, under fp16
        if scaler is not None:
            options.setdefault("scaler", scaler)
        if isinstance(lr_scheduler, AcceleratedScheduler):
            lr_scheduler = lr_scheduler.scheduler
        if lr_scheduler is not None:
            options.setdefault("scheduler", lr_scheduler)
        if isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer
        self.monitor = watch(model, optimizer, **options)
        self._losses, self._per_item = [], False
        self._handles = [model.register_forward_hook(Call(self._keep_loss), with_kwargs=True),
                         optimizer.register_step_pre_hook(Call(self._observe))]

    def _keep_loss(self, module: nn.Module, args: Any, kwargs: dict[str, Any],
                   output: Any) -> None:
        """A training forward's loss tensor (detached, not read)."""
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
            self._per_item = kwargs.get("num_items_in_batch") is not None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._losses.clear()  # a skipped step's (the optimizer did not step)

    def _observe(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """The step's loss, just before the optimizer's step (its pre-hook)."""
        if self.monitor is None or not self._losses:
            return
        losses, self._losses = self._losses, []
        if len(losses) == 1:
            loss = losses[0]
        else:
            stacked = torch.stack([v.float().reshape(()) for v in losses])
            loss = stacked.sum() if self._per_item else stacked.mean()
        self.monitor.observe(loss=loss)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None and self.monitor.should_stop:
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.monitor is not None:
            self.monitor.close()
