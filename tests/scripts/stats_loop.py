"""A small training loop that plants what the statistics must find, and dumps the truth.

A ReLU MLP with known dead units (rows of the first layer that can never be positive) and,
with ``--massive``, one unit of layer ``2`` with a bias of 300 (a massive activation).
``--nan-at STEP`` writes NaN into three elements of layer ``2``'s output at that step.
With ``--dump DIR``, each of the first ``--dump-steps`` steps saves every layer's output
and output gradient, the parameters before and after the optimizer step, their
gradients, the loss and the learning rate, so that tests can recompute every statistic
with NumPy. ``--config JSON`` passes options to ``neurotop.watch``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import neurotop


def build(relu_inplace: bool, massive: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=relu_inplace), nn.Linear(32, 32),
                          nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[:5] = 0.0  # five dead units: output -1 whatever the input
        model[0].bias[:5] = -1.0
        if massive:
            model[2].bias[7] = 300.0
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=0, help="0: run until interrupted")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--config", default="{}", help="neurotop.watch options as JSON")
    p.add_argument("--dump", type=Path)
    p.add_argument("--dump-steps", type=int, default=30)
    p.add_argument("--massive", action="store_true")
    p.add_argument("--relu-inplace", action="store_true")
    p.add_argument("--nan-at", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = build(args.relu_inplace, args.massive)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = 0
    if args.nan_at:  # registered first, so the capture and the agent both see it
        def inject(mod, inp, out):
            if step + 1 == args.nan_at:
                with torch.no_grad():
                    out[0, :3] = float("nan")
        model[2].register_forward_hook(inject)
    outs: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)

        def capture(mod, inp, out, name):
            outs[name] = out.detach().numpy().copy()
            if out.requires_grad:
                out.register_hook(lambda g: grads.__setitem__(name, g.numpy().copy()))
        for name, m in model.named_modules():
            if name:
                m.register_forward_hook(lambda mod, i, o, name=name: capture(mod, i, o, name))
    gen = torch.Generator().manual_seed(1)
    # No auto-pause: a planted NaN must not stop the run before its step is dumped.
    with neurotop.watch(model, opt, name="stats-loop", auto_pause=False,
                     **json.loads(args.config)) as mon:
        print("READY", mon.run_id, flush=True)
        try:
            while args.steps == 0 or step < args.steps:
                x = torch.randn(64, 16, generator=gen)
                y = torch.randint(0, 4, (64,), generator=gen)
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                mon.observe(loss=loss)
                dump = args.dump and step < args.dump_steps
                if dump:
                    before = {n: q.detach().numpy().copy() for n, q in model.named_parameters()}
                    pgrads = {n: q.grad.numpy().copy() for n, q in model.named_parameters()}
                opt.step()
                step += 1
                if dump:
                    after = {n: q.detach().numpy().copy() for n, q in model.named_parameters()}
                    np.savez(args.dump / f"step{step}.npz", loss=loss.item(),
                             lr=opt.param_groups[0]["lr"],
                             **{f"out:{k}": v for k, v in outs.items()},
                             **{f"grad:{k}": v for k, v in grads.items()},
                             **{f"before:{k}": v for k, v in before.items()},
                             **{f"pgrad:{k}": v for k, v in pgrads.items()},
                             **{f"after:{k}": v for k, v in after.items()})
                    outs.clear()
                    grads.clear()
                if args.step_sleep:
                    time.sleep(args.step_sleep)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
