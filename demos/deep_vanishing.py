"""Vanishing signal: a 24-layer plain tanh network at sigma_w^2 = 0.5, vs the critical 1 (E3).

No downloads: Gaussian inputs labelled by a fixed random linear teacher. Every hidden
Linear is initialised N(0, sigma_w^2 / fan_in) with zero bias (mean-field theory, Poole et
al. 2016, Schoenholz et al. 2017): at sigma_w^2 = 0.5 each tanh layer multiplies the
backprop signal by about sqrt(0.5) = 0.71, so across 24 layers the first layer's dL/dh is
thousands of times smaller than the last one's and the early layers barely train;
``explode_vanish`` fires at once, critical, naming the chain's first and last layers. At
the critical sigma_w^2 = 1 (``--sigma-w2 1``, the healthy twin) the signal keeps its size
with depth and nothing fires.

    python demos/deep_vanishing.py --steps 300                 # vanishing
    python demos/deep_vanishing.py --steps 300 --sigma-w2 1    # critical: the healthy twin
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import neurotop
from neurotop.demos._loop import run_options, train


def make_model(sigma_w2: float, depth: int = 24, width: int = 128,
               classes: int = 10) -> nn.Sequential:
    """Linear+Tanh pairs (the Linears are modules 0, 2, 4, ...), then a Linear head."""
    layers: list[nn.Module] = []
    fan_in = 32
    for _ in range(depth):
        lin = nn.Linear(fan_in, width)
        nn.init.normal_(lin.weight, 0.0, math.sqrt(sigma_w2 / fan_in))
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
        fan_in = width
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_options(p)
    p.add_argument("--sigma-w2", type=float, default=0.5,
                   help="weight variance x fan_in (1: critical, the healthy twin)")
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--lr", type=float, default=0.01, help="SGD lr")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = make_model(args.sigma_w2, args.depth)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 10, generator=gen)
    with neurotop.watch(model, opt, name="demo-deep-vanishing",
                        report_every=args.report_every) as mon:
        def step(_: int) -> None:
            x = torch.randn(args.batch, 32, generator=gen)
            loss = loss_fn(model(x), (x @ teacher).argmax(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
        train(mon, args, step)


if __name__ == "__main__":
    main()
