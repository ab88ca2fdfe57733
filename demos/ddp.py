"""Data-parallel training on CPU ranks (torchrun, gloo), watched by neurotop as one job.

No downloads: each rank draws its own Gaussian batches, labelled by one fixed random
teacher network, and trains a ReLU MLP wrapped in ``DistributedDataParallel``. Every rank
calls ``neurotop.watch``: they join one job (one run id), and a pause, a ``set`` or a stop
sent to rank 0 lands on every rank at the same step.

    neurotop demo --name ddp              # 2 ranks, the UI attached to rank 0
    neurotop demo --name ddp --nproc 4    # 4 ranks
    python demos/ddp.py --steps 500       # headless; attach with: neurotop attach

Started directly (no ``LOCAL_RANK`` in the environment), it launches itself under
``python -m torch.distributed.run --standalone --nproc-per-node N`` and waits for it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from neurotop.demos import _loop


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks to start (default: 2)")
    _loop.run_options(p, threads=False, step_sleep=0.02)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error(f"--nproc must be at least 1, got {args.nproc}")
    return args


#: After Ctrl-C, how long torchrun gets to end its ranks before it is told to terminate
#: them (SIGTERM): ``neurotop demo`` kills this launcher 5 s after its SIGINT, and torchrun
#: and the ranks must not outlive it.
SHUTDOWN_S = 2.5


def launch(args: argparse.Namespace) -> None:
    """Run this script on ``--nproc`` ranks under torchrun (in a session of its own, so that
    Ctrl-C reaches it once, from here); Ctrl-C (or ``neurotop demo``'s SIGINT when its UI
    quits) is passed on, and a torchrun still running after ``SHUTDOWN_S`` is terminated
    (it terminates its ranks). The ranks get the options spelled
    out (not ``--nproc``: torchrun's own parser takes it for ``--nproc-per-node``)."""
    rank_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "nproc"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", os.path.abspath(__file__), *rank_args]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        for sig, wait in ((signal.SIGINT, SHUTDOWN_S), (signal.SIGTERM, 1.5)):
            proc.send_signal(sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    sys.exit(code)


def train(args: argparse.Namespace) -> None:
    """One rank: what every rank of the job runs."""
    import torch
    import torch.distributed as dist
    from torch import nn

    import neurotop

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP checks)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).eval()
    model = nn.parallel.DistributedDataParallel(nn.Sequential(
        nn.Linear(32, args.width), nn.ReLU(), nn.Linear(args.width, args.width), nn.ReLU(),
        nn.Linear(args.width, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of data
    loss_fn = nn.CrossEntropyLoss()
    with neurotop.watch(model, opt, name="demo-ddp", report_every=args.report_every) as mon:
        def step(_: int) -> None:
            x = torch.randn(args.batch, 32, generator=gen)
            with torch.no_grad():
                y = teacher(x).argmax(1)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
        banner = (f"neurotop: job {mon.run_id}, {dist.get_world_size()} ranks (connection"
                  f" file {mon.connection_file})") if rank == 0 else ""
        _, interrupted = _loop.train(mon, args, step, banner=banner,
                                     stop_note=" on every rank" if rank == 0 else None)
    if not interrupted:  # interrupted, the ranks left at different points: tearing the
        dist.destroy_process_group()  # group down could wait for a peer that already left


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if "LOCAL_RANK" in os.environ:
        train(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
