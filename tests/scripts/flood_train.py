"""A training that floods its stderr, run by ``neurotop demo --script`` in the tests: every
step writes a 1 kB warning line (a 64 kB pipe is full within seconds). Trains until
interrupted (Ctrl-C, or the demo's quit), then closes its session.

``--fail-with CODE`` instead writes a few lines and exits with CODE before watching.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from torch import nn

import neurotop


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--step-sleep", type=float, default=0.02)
    p.add_argument("--fail-with", type=int, default=0)
    args = p.parse_args()
    if args.fail_with:
        for i in range(100):
            print(f"flood_train: setting up, line {i}", file=sys.stderr)
        print("flood_train: giving up: no such dataset", file=sys.stderr)
        sys.exit(args.fail_with)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with neurotop.watch(model, opt, name="flood", report_every=5) as mon:
        step = 0
        try:
            while not mon.should_stop:
                x = torch.randn(64, 16)
                loss = nn.functional.cross_entropy(model(x), x[:, :4].argmax(1))
                opt.zero_grad()
                loss.backward()
                mon.observe(loss=loss)
                opt.step()
                step += 1
                print(f"UserWarning: step {step}: " + "x" * 1000, file=sys.stderr, flush=True)
                time.sleep(args.step_sleep)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
    # The suite starts hundreds of these: skip the interpreter's last collection of the
    # objects torch made (~1 s of CPU per process at exit); nothing is left to collect.
    gc.freeze()
