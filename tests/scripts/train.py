"""The real training loop the end-to-end tests run with the agent; its options choose what
it plants, what it writes down for the test to check against, and how ``watch`` is set up.

Models (``--model``): ``relu`` (default), ``Linear(16, 32) ReLU Linear(32, 32) Tanh
Linear(32, 4)`` with five planted dead units (rows of the first layer that can never be
positive); ``dropout``, ``Linear ReLU Dropout Linear ReLU Dropout Linear`` (64 wide), for the
dropout knob. Either way, SGD (lr 0.05, or ``--lr``; weight decay 1e-4) on seeded data
labelled by a fixed linear teacher, a user knob ``temperature`` that divides the logits, and
layer ``1`` a ReLU.

What it plants: ``--massive`` (relu model) gives one unit of layer ``2`` a bias of 300, a
massive activation; ``--nan-at STEP`` writes NaN into three elements of layer ``2``'s
output at that step (the loss, the gradients and then the weights follow).

What it writes down, independently of the agent's telemetry:
``--log FILE`` appends one JSON line per optimizer step from its own step pre-hook
(registered after the agent's, so it runs after the agent applied knobs and clipped): the
step, each param group's LR and weight decay, every Dropout's p, ``temperature``, the
global grad norm the step will apply, and the exact-zero fraction of layer ``1``.
``--dump DIR`` saves, for each of the first ``--dump-steps`` steps, every layer's output
and output gradient, the parameters before and after the optimizer step, their gradients,
the loss and the LR, so that tests can recompute every statistic with NumPy.

``--wait-for PATH`` holds the first step until PATH exists, so a test can subscribe first
and see every step. ``--config JSON`` passes options to ``neurotop.watch`` (e.g. ``curve``,
``record``, ``bind_host``, ``snapshot``, ``raise_on_stop``, statistics options). It prints
``READY run-id`` once watching, ``STOPTRAINING reason`` if a stop raised, ``STOPPED step``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import neurotop


def build(kind: str, massive: bool) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "dropout":
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 64),
                             nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[:5] = 0.0  # five dead units: output -1 whatever the input
        model[0].bias[:5] = -1.0
        if massive:
            model[2].bias[7] = 300.0
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=0, help="0: until interrupted or stopped")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--wait-for", type=Path, help="start training once this file exists")
    p.add_argument("--model", choices=["relu", "dropout"], default="relu")
    p.add_argument("--massive", action="store_true")
    p.add_argument("--nan-at", type=int, default=0)
    p.add_argument("--log", type=Path)
    p.add_argument("--dump", type=Path)
    p.add_argument("--dump-steps", type=int, default=30)
    p.add_argument("--config", default="{}", help="neurotop.watch options as JSON")
    p.add_argument("--lr", type=float, default=0.05, help="SGD's learning rate")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = build(args.model, args.massive)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 4, generator=gen)
    step = 0
    if args.nan_at:  # registered first, so the dump and the agent both see it
        def inject(mod: nn.Module, inp: object, out: torch.Tensor) -> None:
            if step + 1 == args.nan_at:
                with torch.no_grad():
                    out[0, :3] = float("nan")
        model[2].register_forward_hook(inject)
    relu_zero: list[float] = []
    model[1].register_forward_hook(
        lambda m, i, out: relu_zero.append(float((out == 0).float().mean())))
    outs: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)

        def capture(out: torch.Tensor, name: str) -> None:
            outs[name] = out.detach().numpy().copy()
            if out.requires_grad:
                out.register_hook(lambda g: grads.__setitem__(name, g.numpy().copy()))
        for name, m in model.named_modules():
            if name:
                m.register_forward_hook(lambda mod, i, o, name=name: capture(o, name))
    log = args.log.open("a") if args.log else None
    options = {"name": "test-loop", "report_every": 1, **json.loads(args.config)}
    with neurotop.watch(model, opt, **options) as mon:
        temperature = mon.knob("temperature", 1.0, min=0.1, max=10.0,
                               doc="divides the logits")

        def record(o: torch.optim.Optimizer, a: object, k: object) -> None:
            gn = torch.linalg.vector_norm(torch.stack(
                [q.grad.norm() for q in model.parameters() if q.grad is not None]))
            log.write(json.dumps({
                "step": step + 1, "lr": [g["lr"] for g in o.param_groups],
                "wd": [g["weight_decay"] for g in o.param_groups],
                "dropout": [m.p for m in model.modules() if isinstance(m, nn.Dropout)],
                "temperature": temperature.value, "grad_norm": float(gn),
                "relu_zero": relu_zero[-1]}) + "\n")
            log.flush()

        if log is not None:
            opt.register_step_pre_hook(record)
        print("READY", mon.run_id, flush=True)
        try:
            while args.wait_for and not args.wait_for.exists():
                time.sleep(0.01)
            while (args.steps == 0 or step < args.steps) and not mon.should_stop:
                x = torch.randn(64, 16, generator=gen)
                y = (x @ teacher).argmax(1)
                loss = nn.functional.cross_entropy(model(x) / temperature.value, y)
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
        except neurotop.StopTraining as e:
            print("STOPTRAINING", e, flush=True)
    print("STOPPED", mon.step, flush=True)


if __name__ == "__main__":
    main()
    # The suite starts hundreds of these: skip the interpreter's last collection of the
    # objects torch made (~1 s of CPU per process at exit); nothing is left to collect.
    gc.freeze()
