"""A real training loop for the control tests: it logs what each optimizer step really used.

With ``--log FILE`` it appends one JSON line per optimizer step, written by its own
step pre-hook (registered after the agent's, so it runs after the agent applied
knobs and clipped): the step number, the LR and weight decay of each param group,
every Dropout's p, the user knob ``temperature``, the global grad norm the step
will apply, and the exact-zero fraction of the ReLU layer ``1`` on this batch.
The test reads what the process saw, independently of the agent's telemetry.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import neurotop


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=0, help="0: until interrupted or stopped")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--log", type=Path)
    p.add_argument("--scheduler", choices=["none", "lambda"], default="none")
    p.add_argument("--nan-at", type=int, default=0, help="feed NaN inputs from this step on")
    p.add_argument("--snapshot-dir", type=Path)
    p.add_argument("--raise-on-stop", action="store_true")
    p.add_argument("--width", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    w = args.width
    model = nn.Sequential(nn.Linear(16, w), nn.ReLU(), nn.Dropout(0.1), nn.Linear(w, w),
                          nn.ReLU(), nn.Dropout(0.1), nn.Linear(w, 4))
    teacher = torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.99 ** e) \
        if args.scheduler == "lambda" else None
    relu_zero: list[float] = []
    model[1].register_forward_hook(
        lambda m, i, out: relu_zero.append(float((out == 0).float().mean())))
    log = args.log.open("a") if args.log else None
    step = 0
    with neurotop.watch(model, opt, name="control-loop", scheduler=sched, report_every=1,
                     snapshot=args.snapshot_dir, raise_on_stop=args.raise_on_stop) as mon:
        temperature = mon.knob("temperature", 1.0, min=0.1, max=10.0,
                               doc="divides the logits")

        def record(o: torch.optim.Optimizer, a: object, k: object) -> None:
            if log is None:
                return
            gn = torch.linalg.vector_norm(torch.stack(
                [q.grad.norm() for q in model.parameters() if q.grad is not None]))
            log.write(json.dumps({
                "step": step + 1, "lr": [g["lr"] for g in o.param_groups],
                "wd": [g["weight_decay"] for g in o.param_groups],
                "dropout": [m.p for m in model.modules() if isinstance(m, nn.Dropout)],
                "temperature": temperature.value, "grad_norm": float(gn),
                "relu_zero": relu_zero[-1]}) + "\n")
            log.flush()

        opt.register_step_pre_hook(record)
        print("READY", mon.run_id, flush=True)
        try:
            while (args.steps == 0 or step < args.steps) and not mon.should_stop:
                x = torch.randn(64, 16)
                if args.nan_at and step + 1 >= args.nan_at:
                    x = x * float("nan")
                y = (x @ teacher).argmax(1)
                loss = nn.functional.cross_entropy(model(x) / temperature.value, y)
                opt.zero_grad()
                loss.backward()
                mon.observe(loss=loss)
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                if args.step_sleep:
                    time.sleep(args.step_sleep)
        except KeyboardInterrupt:
            pass
        except neurotop.StopTraining as e:
            print("STOPTRAINING", e, flush=True)
    print("STOPPED", mon.step, flush=True)


if __name__ == "__main__":
    main()
