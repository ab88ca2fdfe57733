"""Dying ReLUs: a ReLU MLP at a learning rate 100x too high loses half its units (E2).

No downloads: Gaussian inputs labelled by a fixed random teacher network. With Adam at
lr 0.03 (3e-4 is the healthy twin) the first few steps move every weight by
about half its own size, pushing many units' pre-activations negative for every input:
those units output 0, get no gradient, and never come back. neurotop's layers table shows
the dead fraction of the second hidden ReLU (``3``) climbing to about half its units:
``dead_jump`` fires there at step 51 (and at ``5``), ``dying_layer`` at ``3`` at step 81.

    python demos/dying_relu.py --steps 600            # a bounded run
    python demos/dying_relu.py --steps 600 --lr 3e-4  # the healthy twin: no dead layer
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import neurotop
from neurotop.demos._loop import run_options, train


def make_model(width: int = 128, depth: int = 3, classes: int = 10) -> nn.Sequential:
    """``depth`` hidden Linear+ReLU pairs: the ReLUs are modules 1, 3, 5, ..."""
    layers: list[nn.Module] = []
    fan_in = 32
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_options(p)
    p.add_argument("--lr", type=float, default=0.03, help="Adam lr (3e-4: the healthy twin)")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = make_model(64, 2).eval()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    with neurotop.watch(model, opt, name="demo-dying-relu",
                        report_every=args.report_every) as mon:
        def step(_: int) -> None:
            x = torch.randn(args.batch, 32, generator=gen)
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
