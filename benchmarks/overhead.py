"""Training-step overhead of the agent: with and without it, interleaved in fresh processes.

    python benchmarks/overhead.py                 # CPU (and CUDA when there is one)
    python benchmarks/overhead.py --reps 10       # more processes per mode, less noise

Two models, each trained with AdamW on 1024 rows per step: a GPT-style transformer (4
pre-LN blocks, width 256, 4 heads, 128 tokens, batch 8) and a ReLU MLP (6 hidden layers
of 1024, batch 1024; ``--mlp-batch`` changes it: with fewer rows per step the fixed
per-parameter statistics weigh more: ~1.18x for everything on every step at 256).
Three modes, each in its own fresh process, run in rotated order rep after rep
(off, default, all / default, all, off / ...): ``off`` is the bare loop, ``default`` is
``neurotop.watch(model, opt)`` with the default settings, ``all`` computes every statistic on
every step (report_every=1, histograms of every layer on every report, the backprop signal
on every layer, parameter statistics). Each process warms up, then times chunks of 10
steps, so that every chunk holds exactly one report step of the default mode; a step's
time is its chunk's time / 10, and the figure per mode is the median over all chunks of
all its processes. The last line is ``overhead_default=R1 overhead_all=R2``: the largest
ratio over the models (and devices) measured.

Memory with evaluation inside report windows (``--eval-every N``, default 10; 0 skips it):
one more process per model with and without neurotop (default settings) trains 20 steps
and, every N steps, right after a step that opens a report window, runs a validation loop
of ``--eval-batches`` batches (default 200) under ``torch.no_grad()`` in eval mode. Each
prints its peak memory (resident set size on the CPU, the allocator's peak on CUDA); the
last line adds ``eval_mem_ratio=X``, the largest ratio with / without (budget <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

MODES = ("off", "default", "all")
CHUNK = 10


def build(model_name: str, device: str, mlp_batch: int = 1024, eval_batch: int = 64):
    """The model, its training loss, and one validation batch (``eval_batch`` rows)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(
                2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(b, t, d))

    class Block(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
            self.ln2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self, vocab=1024, d=256, heads=4, depth=4, ctx=128) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            self.blocks = nn.ModuleList([Block(d, heads) for _ in range(depth)])
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

        def forward(self, idx):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln(x))

    torch.manual_seed(0)
    if model_name == "transformer":
        model = GPT().to(device)
        x = torch.randint(0, 1024, (8, 128), device=device)

        def loss_fn(m):
            return F.cross_entropy(m(x).flatten(0, 1), x.flatten())
        val = torch.randint(0, 1024, (max(1, eval_batch // 128), 128), device=device)
    else:
        layers: list[nn.Module] = [nn.Linear(512, 1024), nn.ReLU()]
        for _ in range(5):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(1024, 10)).to(device)
        x = torch.randn(mlp_batch, 512, device=device)
        y = torch.randint(0, 10, (mlp_batch,), device=device)

        def loss_fn(m):
            return F.cross_entropy(m(x), y)
        val = torch.randn(eval_batch, 512, device=device)
    return model, loss_fn, val


def peak_memory(device: str) -> float:
    """Peak bytes of this process: the CUDA allocator's, or the resident set's (Linux)."""
    import resource

    import torch

    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, loss_fn, val = build(args.model, args.device, args.mlp_batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mon = None
    if args.mode != "off":
        import neurotop

        opts = {} if args.mode == "default" else dict(
            report_every=1, hist_every=1, signal_layers=("*",), hist_layers=("*",))
        mon = neurotop.watch(model, opt, name=f"bench-{args.model}", **opts)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mon is not None:
            mon.observe(loss=loss)
        opt.step()

    if args.eval_child:
        for i in range(1, 21):
            step()
            if i % args.eval_every == 0:  # the window of step i + 1 is open (report_every 10)
                model.eval()
                with torch.no_grad():
                    for _ in range(args.eval_batches):
                        model(val)
                model.train()
        sync()
        if mon is not None:
            mon.close()
        print(json.dumps({"peak": peak_memory(args.device)}))
        return

    for _ in range(args.warmup):
        step()
    sync()
    wall, cpu = [], []
    for _ in range(args.chunks):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(CHUNK):
            step()
        sync()
        wall.append((time.perf_counter() - t0) / CHUNK)
        cpu.append((time.process_time() - c0) / CHUNK)
    if mon is not None:
        mon.close()
    print(json.dumps({"wall": wall, "cpu": cpu}))


def run_child(model: str, mode: str, device: str, args: argparse.Namespace,
              eval_child: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--mode", mode,
           "--device", device, "--warmup", str(args.warmup), "--chunks", str(args.chunks),
           "--threads", str(args.threads), "--mlp-batch", str(args.mlp_batch),
           "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
           *(["--eval-child"] if eval_child else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"benchmark child failed ({model} {mode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(model: str, device: str, args: argparse.Namespace) -> dict[str, float]:
    times = {k: {m: [] for m in MODES} for k in ("wall", "cpu")}
    for rep in range(args.reps):
        order = MODES[rep % 3:] + MODES[: rep % 3]
        for mode in order:
            got = run_child(model, mode, device, args)
            for k in times:
                times[k][mode] += got[k]
    for k, what in (("cpu", "process CPU time per step (less sensitive to a busy machine)"),
                    ("wall", "median step")):
        med = {m: statistics.median(v) for m, v in times[k].items()}
        print(f"{device} {model}: {what}: off {med['off'] * 1e3:.1f} ms  "
              f"default {med['default'] * 1e3:.1f} ms ({med['default'] / med['off']:.3f})  "
              f"all {med['all'] * 1e3:.1f} ms ({med['all'] / med['off']:.3f})", flush=True)
    print(f"  [{args.reps} processes x {args.chunks} chunks of {CHUNK} steps per mode]")
    return {m: med[m] / med["off"] for m in ("default", "all")}


def measure_eval_memory(model: str, device: str, args: argparse.Namespace) -> float:
    """Peak memory with / without neurotop on a loop that evaluates inside report windows."""
    peak = {m: run_child(model, m, device, args, eval_child=True)["peak"]
            for m in ("off", "default")}
    ratio = peak["default"] / peak["off"]
    print(f"{device} {model}: peak memory with {args.eval_batches} eval batches every "
          f"{args.eval_every} steps: off {peak['off'] / 2**20:.1f} MiB  default "
          f"{peak['default'] / 2**20:.1f} MiB ({ratio:.3f})", flush=True)
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=6, help="processes per mode and model")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per process")
    p.add_argument("--chunks", type=int, default=4, help="timed chunks of 10 steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--models", default="transformer,mlp")
    p.add_argument("--mlp-batch", type=int, default=1024, help="rows per step of the MLP")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--eval-every", type=int, default=10,
                   help="evaluate every N steps in the memory measurement (0: skip it)")
    p.add_argument("--eval-batches", type=int, default=200, help="batches per evaluation")
    p.add_argument("--eval-only", action="store_true",
                   help="only the eval memory measurement (no timing)")
    p.add_argument("--eval-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    devices = [args.device]
    if args.device == "auto":
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = [(m, d) for d in devices for m in args.models.split(",")]
    keys = []
    if not args.eval_only:
        ratios = [measure(m, d, args) for m, d in runs]
        keys += [f"overhead_default={max(r['default'] for r in ratios):.3f}",
                 f"overhead_all={max(r['all'] for r in ratios):.3f}"]
    if args.eval_every > 0:
        keys.append(f"eval_mem_ratio={max(measure_eval_memory(m, d, args) for m, d in runs):.3f}")
    print(" ".join(keys))


if __name__ == "__main__":
    main()
