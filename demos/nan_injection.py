"""NaN injection: one NaN put into a chosen layer's output at a chosen step (E3 nonfinite).

No downloads: a ReLU MLP learning a fixed random teacher's labels. At ``--nan-step``
(default 201, a report step: reports come at steps 1, 6, 11, ...) a forward hook writes
NaN into one element of layer ``--nan-layer``'s output (default ``3``, the second hidden
ReLU), as a bad kernel, an overflow or a log of 0 would.
The loss is NaN, and the optimizer step that follows spreads it into every weight.
neurotop checks the loss and the gradient norm on every step on the device: at a report
step the ``nonfinite`` alert names the layer (the first non-finite one in forward order)
and the step; between report steps (``--nan-step 205``) it names the step the loss went
NaN, and that by the next report the poisoned weights make every layer non-finite. The
alert auto-pauses the run. ``--guard`` skips the optimizer step of a non-finite loss (the
weights stay clean and the run goes on); ``--nan-step 0`` is the healthy twin.

    python demos/nan_injection.py --steps 300                  # NaN at step 201, layer 3
    python demos/nan_injection.py --steps 300 --nan-step 205   # between two reports
    python demos/nan_injection.py --steps 300 --nan-step 0     # the healthy twin
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import neurotop
from neurotop.demos._loop import run_options, train


def make_model(width: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_options(p)
    p.add_argument("--nan-step", type=int, default=201,
                   help="the step to inject at (0: none; 201 is a report step at the default)")
    p.add_argument("--nan-layer", default="3", help="the layer (named_modules path)")
    p.add_argument("--guard", action="store_true",
                   help="skip the optimizer step when the loss is not finite")
    p.add_argument("--no-auto-pause", action="store_true",
                   help="do not pause on the alert (headless runs, tests)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD lr")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = make_model()
    modules = dict(model.named_modules())
    if args.nan_layer not in modules:
        p.error(f"no layer {args.nan_layer!r}; layers: {', '.join(n for n in modules if n)}")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 4, generator=gen)
    now = [0]  # the step under way (0-based)

    def inject(module: nn.Module, inputs: object, out: torch.Tensor) -> torch.Tensor:
        if now[0] + 1 == args.nan_step and module.training:  # the step this forward is of
            out = out.clone()
            out.view(-1)[0] = float("nan")
        return out

    modules[args.nan_layer].register_forward_hook(inject)
    with neurotop.watch(model, opt, name="demo-nan-injection", report_every=args.report_every,
                        auto_pause=not args.no_auto_pause) as mon:
        def step(i: int) -> None:
            now[0] = i
            x = torch.randn(64, 16, generator=gen)
            loss = loss_fn(model(x), (x @ teacher).argmax(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mon.observe(loss=loss)
            if args.guard and not torch.isfinite(loss):
                opt.zero_grad(set_to_none=True)  # no gradient: the step updates nothing
            opt.step()
        train(mon, args, step)


if __name__ == "__main__":
    main()
