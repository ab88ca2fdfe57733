"""Per-step cost of the job's control check on 2 gloo ranks (torchrun, CPU, DDP).

    python benchmarks/distributed_overhead.py             # 2 ranks, 5 reps
    python benchmarks/distributed_overhead.py --reps 2 --nproc 4

Started directly, it runs itself under ``torchrun --standalone``. Every rank trains a DDP
ReLU MLP (3 hidden layers of 256, batch 128, SGD) in four modes, rotated rep after rep:
``none`` (no agent), ``agent`` (``watch(..., distributed=False)``: the agent, every rank
on its own, no control check), ``job`` (one job with every per-step cost of one, the rank
vitals and the node relay, but no check: ``control_every`` 10**9) and ``control``
(``watch(...)``: one job, the control check every ``Config.control_every`` boundaries).
Each mode warms up, then times chunks of ``control_every`` steps (each chunk holds exactly
one check, and one report step of the default ``report_every``); a step's time is its
chunk's / ``control_every``, and a mode's figure is the median over its chunks. It also
times the check's collective alone (``Job.exchange`` with nothing to send: started and
waited for at once), bare and with the rank vitals that ``watch()`` carries in a job (this
rank's row: step timings, loss, the DDP fingerprint), and what a check costs the training
thread as ``watch()`` runs it: started at one boundary, a step trained while gloo's
threads carry it, finished at the next (the time in ``start`` and ``finish``). Rank 0
prints; the last line is ``control_check_ratio=R step_ms=S``: control / agent, and the
step time with control.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

MODES = ("none", "agent", "job", "control")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunks", type=int, default=20, help="timed chunks per mode and rep")
    p.add_argument("--control-every", type=int, default=0, help="0: the Config default")
    return p.parse_args(argv)


def bench(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import neurotop
    from neurotop.service.controller import Controller
    from neurotop.service.rank_rules import RankJudge
    from neurotop.training.distributed import Job

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    every = args.control_every or neurotop.Config().control_every
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256),
        nn.ReLU(), nn.Linear(256, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    per_step: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(args.reps):
        for mode in MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]:
            mon = None
            if mode != "none":
                mon = neurotop.watch(model, opt, record=False,
                                     control_every=10**9 if mode == "job" else every,
                                     distributed=mode != "agent", handle_signals=False)
            for _ in range(2 * every):
                step()
            for _ in range(args.chunks):
                t0 = time.perf_counter()
                for _ in range(every):
                    step()
                per_step[mode].append((time.perf_counter() - t0) / every)
            if mon is not None:
                mon.close()
    job = Job()
    for _ in range(20):
        job.exchange(0, b"", False)
    t0 = time.perf_counter()
    n = 200
    for _ in range(n):
        job.exchange(0, b"", False)
    check_s = (time.perf_counter() - t0) / n
    # and with the rank rules' vitals (what ``watch()`` in a job carries: the row, the table)
    job.watch_health([model], RankJudge(), Controller())
    t0 = time.perf_counter()
    for _ in range(n):
        job.exchange(0, b"", False)
    vitals_s = (time.perf_counter() - t0) / n
    # as watch() runs it: started at one boundary, finished at the next, a step between
    held = []
    for _ in range(n // 4):
        t0 = time.perf_counter()
        job.start(0, b"", False)
        t1 = time.perf_counter()
        step()
        t2 = time.perf_counter()
        job.finish()
        held.append(t1 - t0 + time.perf_counter() - t2)
    async_s = statistics.median(held)
    if rank == 0:
        ms = {m: statistics.median(v) * 1e3 for m, v in per_step.items()}
        for m in MODES:
            print(f"{m:>8}: {ms[m]:.3f} ms/step (median of {len(per_step[m])} chunks)")
        print(f"control check alone: {check_s * 1e6:.0f} us per check, every {every} steps:"
              f" {check_s * 1e3 / every / ms['agent'] * 100:.2f} % of an agent step")
        print(f"with the rank vitals: {vitals_s * 1e6:.0f} us per check"
              f" (+{(vitals_s - check_s) * 1e6:.0f} us)")
        share = async_s * 1e3 / every / ms["agent"] * 100
        print(f"started at one boundary, finished at the next: {async_s * 1e6:.0f} us per"
              f" check on the training thread (median; {share:.2f} % of an agent step)")
        print(f"control_check_ratio={ms['control'] / ms['agent']:.4f} step_ms={ms['control']:.3f}",
              flush=True)
    dist.destroy_process_group()


def main() -> None:
    args = parse()
    if "LOCAL_RANK" in os.environ:
        bench(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", os.path.abspath(__file__),
           f"--reps={args.reps}", f"--chunks={args.chunks}",
           f"--control-every={args.control_every}"]
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
