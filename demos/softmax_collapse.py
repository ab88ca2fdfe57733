"""Softmax collapse: a small MLP memorizing random labels without weight decay (E4 alert).

No downloads: 256 Gaussian inputs with random labels among 10 classes, trained full-batch
with AdamW and no weight decay, in float32, far past 100 % train accuracy. With nothing to
stop them, the logits keep growing along the weights' own direction until the top-1 margin
of some rows passes ln(2 / eps) = 16.6 and their softmax rounds to exactly one-hot: their
loss is exactly 0, their gradient too (Prieto et al., "Grokking at the edge of numerical
stability"). neurotop watches the head (``watch(head=...)``) and raises ``softmax_collapse``
(E4), a warning as the margin passes the onset, critical once a row has collapsed.

    python demos/softmax_collapse.py                   # runs until stopped
    python demos/softmax_collapse.py --steps 3000      # a bounded run
    python demos/softmax_collapse.py --weight-decay 1  # the healthy twin: no collapse
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import neurotop
from neurotop.demos._loop import run_options, train

CLASSES = 10


def make_model(width: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, CLASSES))


def task(samples: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and random labels to memorize: nothing to generalize, everything to fit."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(samples, 32, generator=g), torch.randint(0, CLASSES, (samples,),
                                                                generator=g)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_options(p)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (1: the healthy twin, whose margin stays small)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = task()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    with neurotop.watch(model, opt, name="demo-softmax-collapse", head="4",
                        report_every=args.report_every) as mon:
        def step(_: int) -> None:
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                acc = (logits.argmax(1) == y).float().mean()
            mon.observe(loss=loss, targets=y, train_acc=acc)
            opt.step()
        train(mon, args, step)


if __name__ == "__main__":
    main()
