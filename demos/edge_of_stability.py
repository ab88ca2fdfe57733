"""Edge of stability: full-batch gradient descent whose sharpness rises to 2/lr and stays (E7).

No downloads: 200 Gaussian inputs with random real targets, fitted by a small tanh MLP with
plain full-batch gradient descent (``torch.optim.SGD``, no momentum) and a mean squared
error loss. The curvature probe (``mon.probe_batch``; every ``--probe-every`` steps) measures
the top Hessian eigenvalue lambda_max on the whole training set. It first rises
(progressive sharpening) until it reaches 2/lr, where gradient descent on a quadratic stops
being stable, then stays pinned there while the loss keeps going down, non-monotonically
(Cohen et al., "Gradient descent on neural networks typically occurs at the edge of
stability", 2021). neurotop raises ``edge_of_stability`` (E7) once lambda_max passes
0.9 x 2/lr on two probes in a row; the overview plots lambda_max against 2/lr.

    python demos/edge_of_stability.py                 # runs until stopped
    python demos/edge_of_stability.py --steps 600     # a bounded run
    python demos/edge_of_stability.py --lr 0.01       # the healthy twin: far from 2/lr
    python demos/edge_of_stability.py --adam --lr 0.01  # Adam: P^-1 H pinned at 38/lr

With ``--adam`` the optimizer is full-batch Adam, whose preconditioned sharpness
lambda_max(P^-1 H) equilibrates at (2 + 2 beta1)/((1 - beta1) lr) = 38/lr instead (Cohen et
al., "Adaptive gradient methods at the edge of stability", 2022): the same alert, judged on
that sharpness.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import neurotop
from neurotop.demos._loop import run_options, train


def make_model(width: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 1))


def task(samples: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and random targets: fitting them takes the net's whole capacity, which is what
    makes it sharpen."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(samples, 10, generator=g), torch.randn(samples, 1, generator=g)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_options(p)
    p.add_argument("--lr", type=float, default=0.1, help="gradient descent's step (2/lr = 20)")
    p.add_argument("--adam", action="store_true",
                   help="full-batch Adam instead of gradient descent (its limit: 38/lr)")
    p.add_argument("--probe-every", type=int, default=10,
                   help="steps between two curvature probes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = task()
    model = make_model()
    opt = (torch.optim.Adam(model.parameters(), lr=args.lr) if args.adam
           else torch.optim.SGD(model.parameters(), lr=args.lr))
    loss_fn = nn.MSELoss()
    with neurotop.watch(model, opt, name="demo-edge-of-stability",
                        report_every=args.report_every, probe_every=args.probe_every) as mon:
        mon.probe_batch(x, y)  # the whole training set: the loss GD descends

        def step(_: int) -> None:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
        train(mon, args, step)


if __name__ == "__main__":
    main()
