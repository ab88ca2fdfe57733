"""``neurotop.integrations.lightning.NeurotopCallback`` on a real Lightning ``Trainer`` (CPU,
tiny modules, synthetic data): automatic optimization with gradient accumulation, clipping
and validation inside report windows (32-bit; 16-mixed where CUDA is available), and manual
optimization over two optimizers in bf16-mixed. An operator lists the run with
``neurotop ls``, sets a learning rate, pauses, resumes and stops it over the control socket;
the reports are checked against plain forward hooks and the module's own losses."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.reports import Reports
from tests.integrations.operator import Capture, Operator, StepProbe, approx

pl = pytest.importorskip("lightning.pytorch")
from neurotop.integrations.lightning import NeurotopCallback  # noqa: E402

pytestmark = pytest.mark.slow
STEP_SLEEP = 0.01  # per batch: the operator's CLI and commands share two loaded cores
CAPTURED = 12  # steps whose layer outputs the test keeps


def loader(scale: float, n: int, seed: int, width: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * scale
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                       batch_size=8)


def trainer(callbacks: list, **options) -> pl.Trainer:
    return pl.Trainer(max_steps=5000, callbacks=callbacks, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0,
                      val_check_interval=4, limit_val_batches=2, **options)


class Subscribe(pl.Callback):
    """After neurotop's callback: subscribes to the run before its first step; and each
    step's gradient norm where Lightning would clip (after ``on_before_optimizer_step``)."""

    def __init__(self, cb: NeurotopCallback) -> None:
        self.cb, self.reports, self.norms = cb, None, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.reports = Reports(self.cb.monitor)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.float() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        self.losses: dict[int, list[float]] = {}  # step -> its micro-batches' losses
        self.probe: StepProbe | None = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.losses.setdefault(self.trainer.global_step + 1, []).append(loss.item())
        time.sleep(STEP_SLEEP)
        return loss

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        self.probe = StepProbe(opt)
        return opt


@pytest.mark.parametrize("precision", [
    "32-true",
    pytest.param("16-mixed", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="16-mixed (a GradScaler) needs CUDA")),
])
def test_automatic_optimization_with_accumulation_clipping_and_validation(precision):
    model = Regressor()
    steps = lambda: model.probe.steps if model.probe else 0  # noqa: E731
    capture = Capture(model.net[1], steps, CAPTURED)
    run_id = f"lit-{uuid.uuid4().hex[:8]}"
    cb = NeurotopCallback(run_id=run_id, report_every=1, record=False)
    sub = Subscribe(cb)
    op = Operator(run_id, steps, "lr", 0.05)
    op.start()
    t = trainer([cb, sub], accumulate_grad_batches=2, gradient_clip_val=0.01,
                precision=precision)
    t.fit(model, loader(1.0, 64, 0), loader(100.0, 16, 1))
    op.result()
    mon = cb.monitor
    assert t.should_stop and mon.step == model.probe.steps == t.global_step < 5000
    op.check(model.probe.lrs, 0.01, mon.step)

    s = capture.window_with_validation()  # validation ran inside this report's window
    got = sub.reports.stats(s)
    sub.reports.close()
    capture.check(got.layer("net.1"), s, mon.config.sample, mon.config.eps)
    sc = got.scalars
    assert len(model.losses[s]) == 2
    assert sc["loss"] == approx(np.mean(model.losses[s])), "not the step's mean loss"
    assert sc["grad_norm"] == approx(sub.norms[s - 1]) and sc["grad_norm"] > 0.05, \
        "not the gradient norm before the 0.01 clip"
    assert sc["samples_per_s"] == approx(16 * sc["steps_per_s"]), "validation samples counted"
    if precision == "16-mixed":
        assert sc["loss_scale"] > 1


class GAN(pl.LightningModule):
    """Manual optimization, DCGAN-style: D's step, then G's (the boundary)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.D = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.losses: dict[int, tuple[float, float]] = {}
        self.probes: dict[str, StepProbe] = {}

    def training_step(self, batch, batch_idx):
        real = batch[0]
        opt_d, opt_g = self.optimizers()
        ones, zeros = real.new_ones(len(real), 1), real.new_zeros(len(real), 1)
        fake = self.G(torch.randn(len(real), 4, device=self.device))
        d_loss = (F.binary_cross_entropy_with_logits(self.D(real), ones)
                  + F.binary_cross_entropy_with_logits(self.D(fake.detach()), zeros))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.D(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.losses[self.probes["G"].steps] = (d_loss.item(), g_loss.item())
        time.sleep(STEP_SLEEP)

    def validation_step(self, batch, batch_idx):
        self.D(self.G(torch.randn(len(batch[0]), 4, device=self.device) * 100))

    def configure_optimizers(self):
        opt_d = torch.optim.Adam(self.D.parameters(), lr=0.01)
        opt_g = torch.optim.Adam(self.G.parameters(), lr=0.02)
        self.probes = {"D": StepProbe(opt_d), "G": StepProbe(opt_g)}
        return [opt_d, opt_g]


def test_manual_optimization_over_two_optimizers_in_bf16():
    model = GAN()
    steps = lambda: model.probes["G"].steps if model.probes else 0  # noqa: E731
    capture = Capture(model.G[1], steps, CAPTURED)
    run_id = f"gan-{uuid.uuid4().hex[:8]}"
    cb = NeurotopCallback(run_id=run_id, report_every=1, record=False)
    sub = Subscribe(cb)
    op = Operator(run_id, steps, "lr[D]", 0.005)
    op.start()
    t = trainer([cb, sub], precision="bf16-mixed")
    t.fit(model, loader(1.0, 64, 0), loader(1.0, 16, 1))
    op.result()
    mon = cb.monitor
    n = model.probes["G"].steps
    assert t.should_stop and mon.step == n == model.probes["D"].steps
    assert t.global_step == 2 * n  # Lightning counts both optimizers' steps
    op.check(model.probes["D"].lrs, 0.01, mon.step)
    assert model.probes["G"].lrs[-1] == approx(0.02), "lr[D] changed G's learning rate"

    s = capture.window_with_validation()
    got = sub.reports.stats(s)
    params = sub.reports.params(s)
    sub.reports.close()
    capture.check(got.layer("G.1"), s, mon.config.sample, mon.config.eps)
    sc = got.scalars
    d_loss, g_loss = model.losses[s]
    assert sc["loss"] == approx(g_loss) and sc["loss.D"] == approx(d_loss)
    assert {"lr.D", "lr.G", "grad_norm.D", "grad_norm.G"} <= set(sc)
    assert {p.split(".")[0] for p in params} == {"D", "G"}
