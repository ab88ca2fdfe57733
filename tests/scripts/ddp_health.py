"""A real DDP training for the rank-rule tests, run under ``torchrun`` (gloo, CPU).

Every rank trains ``Linear(16, 32) ReLU Linear(32, 4)`` in ``DistributedDataParallel`` with
SGD on its own seeded batches, watched by ``neurotop.watch`` (``--config JSON``: its options,
e.g. ``control_every`` and ``rank_alerts``), for ``--steps`` steps, sleeping ``--step-sleep``
seconds after each (its "data loading"). What it plants: ``--slow-rank R --slow-sleep S``:
rank R sleeps S seconds more per step (a straggler); ``--perturb-rank R --perturb-at N``:
before step N rank R adds noise to its weights outside DDP (a diverged replica). It prints
``READY run-id rank`` once watching and ``STOPPED rank step`` at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.distributed as dist
from torch import nn

import neurotop


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--step-sleep", type=float, default=0.01)
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--slow-sleep", type=float, default=0.0)
    p.add_argument("--perturb-rank", type=int, default=-1)
    p.add_argument("--perturb-at", type=int, default=0)
    p.add_argument("--config", default="{}", help="neurotop.watch options as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = neurotop.watch(model, opt, name="ddp_health", **json.loads(args.config))
    print(f"READY {mon.run_id} {rank}\n", end="", flush=True)  # one write: ranks share the pipe
    gen = torch.Generator().manual_seed(100 + rank)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    step = 0
    while step < args.steps and not mon.should_stop:
        if rank == args.perturb_rank and step + 1 == args.perturb_at:
            with torch.no_grad():  # outside DDP: no other rank sees it
                for w in model.parameters():
                    w.add_(0.01 * torch.randn(w.shape, generator=gen))
        x = torch.randn(32, 16, generator=gen)
        loss = nn.functional.mse_loss(model(x), x @ teacher)
        opt.zero_grad()
        loss.backward()
        mon.observe(loss=loss.detach())
        opt.step()
        step += 1
        time.sleep(args.step_sleep + (args.slow_sleep if rank == args.slow_rank else 0.0))
    print(f"STOPPED {rank} {step}\n", end="", flush=True)  # one write: ranks share the pipe
    mon.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The suite starts hundreds of these: skip the interpreter's last collection of the
    # objects torch made (~1 s of CPU per process at exit); nothing is left to collect.
    gc.freeze()
