"""Grokking: an MLP memorizes modular addition, generalizes once weight decay is raised (E5, E6).

No downloads: the task is (a + b) mod p for every pair of residues, half of them (by
default) to train on, full batch, the rest held out. A bias-free MLP on the two one-hot
residues, trained with AdamW at weight decay 0, fits the training pairs in ~50 steps and
stays at ~0 % test accuracy: it is in the naive-loss-minimization regime of Prieto et al.
("Grokking at the edge of numerical stability"), where the gradient points along the
weights themselves (cos(-g, theta) > 0.8) and only scales the logits up, so the weight norm
keeps rising and nothing new is learnt. neurotop raises ``grokking_stall`` (E5) with the
advice to raise weight decay. Raise it live, ``set weight_decay 1`` (the control panel, or
``neurotop ctl RUN set weight_decay 1``): the weight norm turns down, test accuracy climbs
to ~100 % within ~1000 steps, and ``grokking`` (E6, info) says so.

    python demos/grokking.py                   # runs until stopped
    python demos/grokking.py --steps 3000      # a bounded run
    python demos/grokking.py --wd 1            # weight decay from the start: it groks alone
    python demos/grokking.py --head            # also watch the head: E4 follows E5
    python demos/grokking.py --task first      # the healthy twin: it generalizes at once
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import neurotop
from neurotop.demos._loop import run_options, train


class ModAddMLP(nn.Module):
    """Bias-free, so positively homogeneous: scaling the weights only scales the logits,
    which is the direction the gradient takes once the training set is fitted."""

    def __init__(self, p: int, width: int = 128) -> None:
        super().__init__()
        self.p = p
        self.fc1 = nn.Linear(2 * p, width, bias=False)
        self.fc2 = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, p, bias=False)

    def forward(self, ab: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.one_hot(ab[:, 0], self.p), F.one_hot(ab[:, 1], self.p)], 1).float()
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def task(p: int, train_frac: float, seed: int = 0,
         kind: str = "add") -> tuple[torch.Tensor, ...]:
    """Every pair (a, b) with its label, (a + b) mod p (``add``) or a (``first``: the easy
    twin, learnt by the first layer alone, so test follows train), split at random into
    train and test."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    ab = torch.stack([a.flatten(), b.flatten()], 1)
    y = ab.sum(1) % p if kind == "add" else ab[:, 0].clone()
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n = max(1, min(p * p - 1, round(train_frac * p * p)))
    tr, te = perm[:n], perm[n:]
    return ab[tr], y[tr], ab[te], y[te]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_options(p)
    p.add_argument("--p", type=int, default=59, help="the modulus, 2..200")
    p.add_argument("--train-frac", type=float, default=0.5,
                   help="fraction of the p*p pairs to train on (the rest is the test set)")
    p.add_argument("--task", choices=("add", "first"), default="add",
                   help="add: (a + b) mod p; first: a, an easy task that generalizes at once")
    p.add_argument("--wd", type=float, default=0.0,
                   help="AdamW weight decay at the start (0: memorizes and stalls)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--head", action="store_true",
                   help="watch the output layer too (E4 softmax collapse follows E5 at wd 0)")
    args = p.parse_args(argv)
    if not 2 <= args.p <= 200:
        p.error(f"--p must be in 2..200, got {args.p}")
    if not 0 < args.train_frac < 1:
        p.error(f"--train-frac must be in (0, 1), got {args.train_frac}")
    if not args.wd >= 0:
        p.error(f"--wd must be >= 0, got {args.wd}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y, x_test, y_test = task(args.p, args.train_frac, kind=args.task)
    model = ModAddMLP(args.p, args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd,
                            betas=(0.9, 0.98))
    with neurotop.watch(model, opt, name="demo-grokking", head="out" if args.head else None,
                        report_every=args.report_every) as mon:
        def step(i: int) -> None:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                train_acc = (logits.argmax(1) == y).float().mean()
                test_acc = None
                if i % args.report_every == 0:  # held out: no grad, not recorded
                    model.eval()
                    test_acc = (model(x_test).argmax(1) == y_test).float().mean()
                    model.train()
            if test_acc is None:
                mon.observe(loss=loss, train_acc=train_acc)
            else:
                mon.observe(loss=loss, train_acc=train_acc, test_acc=test_acc)
            opt.step()
        train(mon, args, step)


if __name__ == "__main__":
    main()
