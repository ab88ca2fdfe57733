"""A deep ReLU MLP learning a synthetic teacher task on the CPU, watched by neurotop.

No downloads: inputs are Gaussian, labels come from a fixed random teacher network.
The learning rate is high enough that some ReLU units die over the first minutes,
which the layers table shows as a rising zero fraction.

    python demos/mlp.py                # runs until stopped (X in the UI, or Ctrl-C)
    python demos/mlp.py --steps 500    # a bounded run
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import neurotop
from neurotop.demos._loop import run_options, train


def make_model(width: int, depth: int, classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.1)]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_options(p)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = 10
    teacher = make_model(128, 2, classes).eval()
    model = make_model(args.width, args.depth, classes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    with neurotop.watch(model, opt, name="demo-mlp", report_every=args.report_every) as mon:
        def step(_: int) -> None:
            x = torch.randn(args.batch, 64)
            with torch.no_grad():
                y = teacher(x).argmax(1)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
        train(mon, args, step)


if __name__ == "__main__":
    main()
