"""A small real training loop with the agent, for end-to-end tests.

With ``--dump DIR`` it also saves, for the first ``--dump-steps`` steps, every leaf
module's output and the global grad norm as NumPy arrays, so that tests can
recompute the statistics independently of the agent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import neurotop


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=0, help="0: run until interrupted")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--report-every", type=int, default=1)
    p.add_argument("--dump", type=Path)
    p.add_argument("--dump-steps", type=int, default=30)
    p.add_argument("--bind-host", default="127.0.0.1")
    p.add_argument("--curve", action="store_true")
    p.add_argument("--no-record", action="store_true", help="do not record a session file")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 4))
    # Plant dead units: these rows of the first layer never produce a positive output.
    with torch.no_grad():
        model[0].weight[:5] = 0.0
        model[0].bias[:5] = -1.0
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    captured: dict[str, np.ndarray] = {}
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for name, m in model.named_modules():
            if name:
                m.register_forward_hook(
                    lambda mod, inp, out, name=name: captured.__setitem__(
                        name, out.detach().numpy().copy()))
    with neurotop.watch(model, opt, report_every=args.report_every, name="test-loop",
                     bind_host=args.bind_host, curve=args.curve,
                     record=not args.no_record) as mon:
        print("READY", mon.run_id, flush=True)
        step = 0
        try:
            while args.steps == 0 or step < args.steps:
                x = torch.randn(64, 16)
                y = torch.randint(0, 4, (64,))
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                mon.observe(loss=loss)
                if args.dump and step < args.dump_steps:
                    gn = np.sqrt(sum(float((q.grad.double() ** 2).sum())
                                     for q in model.parameters()))
                    np.savez(args.dump / f"step{step + 1}.npz", loss=loss.item(), grad_norm=gn,
                             **captured)
                opt.step()
                step += 1
                if args.step_sleep:
                    time.sleep(args.step_sleep)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
