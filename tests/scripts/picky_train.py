"""A training loop whose optimizer refuses a learning rate above 0.5 inside its ``step()``
and cannot be copied (its constructor takes the model, as many custom optimizers' do), so
``set lr 0.7`` passes every bound and the knobs' dry run, and makes the real step raise: the
rollback test. ``--log FILE`` appends, after each step, the step, the LR it used and the
loss. ``--step-sleep S`` slows the loop; it trains until interrupted or stopped.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from torch import nn

import neurotop


class Picky(torch.optim.Optimizer):
    """Plain SGD that raises on a learning rate above 0.5; ``used``: the LR of its last step."""

    def __init__(self, params, model: nn.Module, lr: float) -> None:  # noqa: ANN001
        self.model = model
        super().__init__(params, {"lr": lr})
        self.used = lr

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        for g in self.param_groups:
            if g["lr"] > 0.5:
                raise RuntimeError(f"lr {g['lr']} is more than this optimizer takes")
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-g["lr"])
        self.used = self.param_groups[0]["lr"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = Picky(model.parameters(), model, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    step = 0
    with args.log.open("a") as log, neurotop.watch(model, opt, name="picky", report_every=1,
                                                   record=False) as mon:
        try:
            while not mon.should_stop:
                x = torch.randn(32, 8, generator=gen)
                loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                mon.observe(loss=loss)
                opt.step()
                step += 1
                log.write(json.dumps({"step": step, "lr": opt.used,
                                      "loss": loss.item()}) + "\n")
                log.flush()
                time.sleep(args.step_sleep)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
    # The suite starts hundreds of these: skip the interpreter's last collection of the
    # objects torch made (~1 s of CPU per process at exit); nothing is left to collect.
    gc.freeze()
