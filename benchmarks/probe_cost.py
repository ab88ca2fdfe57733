"""The curvature probe's cost in training steps, on the benchmark transformer.

    python benchmarks/probe_cost.py                 # CPU
    python benchmarks/probe_cost.py --device cuda   # where there is one

The GPT-style transformer of ``benchmarks/overhead.py`` (4 pre-LN blocks, width 256, 4
heads, 128 tokens, batch 8; built by its ``build``), trained with AdamW. Interleaved, rep
after rep: ``--steps`` training steps (forward, backward, AdamW step), each timed, then a
probe at that boundary (``neurotop.training.curvature``, the loss of the same batch as a
closure), timed; one of each kind per rep: ``power``, lambda_max by 20 power iterations
alone (one forward, one double-graph backward, 20 Hessian-vector products), and ``full``,
the default probe of an AdamW run (also Hutchinson's trace over 10 vectors and the
preconditioned sharpness by 20 more iterations: 50 products). Each figure is the median
probe time over the median step time; the last line is the 20-iteration probe's,
``probe_step_equiv=X`` (budget <= 60), the line before it the full probe's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import build  # noqa: E402  (the benchmark transformer, not a copy of it)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5, help="probes measured")
    p.add_argument("--steps", type=int, default=5, help="training steps timed per rep")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args()

    import torch

    from neurotop.training.curvature import ITERS, TRACE_SAMPLES, CurvatureProbe

    if args.threads:
        torch.set_num_threads(args.threads)
    model, loss_fn, _ = build("transformer", args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    probe = CurvatureProbe(model, lambda: opt)
    probe.set_closure(lambda: loss_fn(model))

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm up (and give Adam its state: the preconditioner needs it)
        step()
    probe.run(0, trace_samples=0, precond=False)
    sync()
    steps: list[float] = []
    probes: dict[str, list[float]] = {"power": [], "full": []}
    for rep in range(args.reps):
        for kind in probes:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                sync()
                steps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = probe.run(rep + 1) if kind == "full" else probe.run(
                rep + 1, trace_samples=0, precond=False)
            sync()
            probes[kind].append(time.perf_counter() - t0)
            print(f"rep {rep} {kind}: probe {probes[kind][-1] * 1e3:.0f} ms, step"
                  f" {statistics.median(steps[-args.steps:]) * 1e3:.1f} ms, lambda_max"
                  f" {float(out['lambda_max']):.4g}", flush=True)
    step_s = statistics.median(steps)
    full = statistics.median(probes["full"]) / step_s
    power = statistics.median(probes["power"]) / step_s
    print(f"transformer on {args.device}: step {step_s * 1e3:.1f} ms; the default probe with"
          f" AdamW ({ITERS} power iterations for lambda_max, {TRACE_SAMPLES} Hutchinson vectors,"
          f" {ITERS} iterations for P^-1 H: {2 * ITERS + TRACE_SAMPLES} products)"
          f" {statistics.median(probes['full']) * 1e3:.0f} ms = {full:.1f} steps")
    print(f"probe_step_equiv={power:.1f}")


if __name__ == "__main__":
    main()
