"""Trainer classes that create the optimizer inside ``run()``: ``watch(model)`` first, then
``mon.attach_optimizer(opt)`` from a callback. Every report carries the loss of its own
step (no lag, none lost), whether the callbacks run before the optimizer step, only after
it (minGPT-style ``on_batch_end``), or the optimizer is found only after the first step."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from torch import nn

import neurotop
from tests.helpers.reports import Reports


class Trainer:
    """The shape of a small trainer class: it owns the loop and makes the optimizer."""

    def __init__(self, model: nn.Module, steps: int, lr: float = 0.05) -> None:
        self.model, self.steps, self.lr = model, steps, lr
        self.callbacks: dict[str, list[Callable[[Trainer], None]]] = defaultdict(list)
        self.losses: list[float] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.loss: torch.Tensor | None = None

    def add_callback(self, event: str, fn: Callable[[Trainer], None]) -> None:
        self.callbacks[event].append(fn)

    def trigger(self, event: str) -> None:
        for fn in self.callbacks[event]:
            fn(self)

    def run(self) -> None:
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)
        self.trigger("on_train_start")
        g = torch.Generator().manual_seed(0)
        for _ in range(self.steps):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
            self.loss = nn.functional.cross_entropy(self.model(x), y)
            self.model.zero_grad(set_to_none=True)
            self.loss.backward()
            self.losses.append(float(self.loss.detach()))
            self.trigger("on_before_step")
            self.optimizer.step()
            self.trigger("on_batch_end")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def check_losses(reports: Reports, trainer: Trainer, steps: list[int]) -> None:
    assert reports.steps(last=steps[-1]) == steps
    for s in steps:
        got = reports.stats(s).scalars["loss"]
        assert got == pytest.approx(trainer.losses[s - 1], rel=1e-6), f"step {s}"


def test_attached_at_train_start():
    m = model()
    with neurotop.watch(m, report_every=2, record=False) as mon:
        reports = Reports(mon)
        trainer = Trainer(m, steps=5)
        trainer.add_callback("on_train_start", lambda t: mon.attach_optimizer(t.optimizer))
        trainer.add_callback("on_before_step", lambda t: mon.observe(loss=t.loss))
        trainer.run()
        assert mon.step == 5 and mon.optimizer is trainer.optimizer
        check_losses(reports, trainer, [1, 3, 5])
        params = reports.params(3)
        assert list(params) == [n for n, _ in m.named_parameters()]
        assert reports.stats(3).scalars["lr"] == pytest.approx(0.05)
        reports.close()


def test_callbacks_after_the_step_use_the_manual_boundary():
    """minGPT-style: the only callback runs after ``optimizer.step()``."""
    m = model()
    with neurotop.watch(m, report_every=2, record=False) as mon:
        reports = Reports(mon)
        trainer = Trainer(m, steps=5)

        def on_batch_end(t: Trainer) -> None:
            mon.attach_optimizer(t.optimizer, boundary=False)  # once; then a no-op
            mon.observe(loss=t.loss)
            mon.step()

        trainer.add_callback("on_batch_end", on_batch_end)
        trainer.run()
        assert mon.step == 5
        check_losses(reports, trainer, [1, 3, 5])
        params = reports.params(3)  # measured by the optimizer's own step hooks
        assert all(v["update_ratio"] > 0 for v in params.values())
        reports.close()


def test_optimizer_found_after_the_first_step():
    """The loss of step 1, observed before any optimizer was known, is step 1's."""
    m = model()
    with neurotop.watch(m, report_every=1, record=False) as mon:
        reports = Reports(mon)
        trainer = Trainer(m, steps=4)
        trainer.add_callback("on_before_step", lambda t: mon.observe(loss=t.loss))
        trainer.add_callback("on_batch_end", lambda t: mon.attach_optimizer(t.optimizer))
        trainer.run()
        assert mon.step == 4
        check_losses(reports, trainer, [1, 2, 3, 4])
        reports.close()
