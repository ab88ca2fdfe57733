"""A real DDP training for the distributed tests, run under ``torchrun`` (gloo, CPU).

Every rank trains ``Linear(16, 32) ReLU Linear(32, 4)`` wrapped in
``DistributedDataParallel`` with SGD (lr 0.05) on its own seeded batches, and watches it
with ``neurotop.watch`` (``--config JSON``: its options, e.g. ``control_every``).

What it writes down, independently of the agent's telemetry: ``--log-dir DIR`` appends one
JSON line per optimizer step to ``DIR/rank<r>.jsonl`` from its own step pre-hook
(registered after the agent's, so it sees the knobs as applied): the step about to run
(1-based) and its LR. What it plants: ``--nan-at STEP --nan-rank R``: from step STEP on,
rank R observes a NaN loss (its gradients stay finite, so only its own detectors see it).
``--wait-for PATH`` holds the first step until PATH exists. It prints ``READY run-id rank``
once watching and ``STOPPED rank step`` at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import neurotop


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=0, help="0: until stopped")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--wait-for", type=Path)
    p.add_argument("--log-dir", type=Path)
    p.add_argument("--nan-at", type=int, default=0)
    p.add_argument("--nan-rank", type=int, default=1)
    p.add_argument("--config", default="{}", help="neurotop.watch options as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = neurotop.watch(model, opt, name="ddp_train", **json.loads(args.config))
    step = 0
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        log = (args.log_dir / f"rank{rank}.jsonl").open("a", buffering=1)

        def note(o: torch.optim.Optimizer, a: object, k: object) -> None:
            log.write(json.dumps({"step": step + 1, "lr": o.param_groups[0]["lr"],
                                  "t": time.time()}) + "\n")
        opt.register_step_pre_hook(note)
    print(f"READY {mon.run_id} {rank}\n", end="", flush=True)  # one write: ranks share the pipe
    while args.wait_for and not args.wait_for.exists():
        time.sleep(0.02)
    gen = torch.Generator().manual_seed(100 + rank)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    while not args.steps or step < args.steps:
        x = torch.randn(32, 16, generator=gen)
        loss = nn.functional.mse_loss(model(x), x @ teacher)
        opt.zero_grad()
        loss.backward()
        bad = args.nan_at and step + 1 >= args.nan_at and rank == args.nan_rank
        mon.observe(loss=loss.detach() * float("nan") if bad else loss.detach())
        opt.step()
        step += 1
        if mon.should_stop:
            break
        if args.step_sleep:
            time.sleep(args.step_sleep)
    print(f"STOPPED {rank} {step}\n", end="", flush=True)  # one write: ranks share the pipe
    mon.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The suite starts hundreds of these: skip the interpreter's last collection of the
    # objects torch made (~1 s of CPU per process at exit); nothing is left to collect.
    gc.freeze()
