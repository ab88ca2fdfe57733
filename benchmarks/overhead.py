"""Training-step overhead of the agent: with and without it, interleaved in fresh processes.

    python benchmarks/overhead.py                 # CPU (and CUDA when there is one)
    python benchmarks/overhead.py --reps 10       # more processes per mode, less noise

Models, each trained with AdamW: a GPT-style transformer (4 pre-LN blocks, width 256, 4
heads, 128 tokens, batch 8), a ReLU MLP (6 hidden layers of 1024) at 1024 and at 256 rows
per step (``--mlp-batches``: with fewer rows the fixed per-parameter statistics weigh
more), and ``gpt_small`` (2 blocks of width 64, 64 tokens, batch 8, ~0.12 M parameters,
~10 ms a step), where the fixed cost of a report weighs most.
Two watched modes: ``default`` is ``neurotop.watch(model, opt)`` with the default settings,
``all`` computes every statistic on every step (report_every=1, histograms of every layer on
every report, the backprop signal on every layer, parameter statistics). Each runs in its
own fresh processes, alternating (default, all / all, default / ...), and every process
also trains the same model unwatched (same seed, its own optimizer): after warming both up,
it times chunks of 10 steps, bare and watched in turn (bare, watched, bare, ..., bare), so
that each watched chunk is compared with the bare chunks just before and after it, which
ran on the machine as it was then (a shared machine's speed drifts by 10-40 % within
seconds and from one process to the next: ratios of separate processes' medians moved by
more than the overhead being measured). A watched chunk starts with its report step (one
per chunk in the default mode). The figure per mode is the median, over every watched
chunk of every process, of its time over the mean of its two bare neighbours'. A process
times at least ``--chunks`` pairs and goes on until ``--seconds`` have passed (a fast
model's chunks are short and noisy). The model built first in a process trains up to ~6 %
slower than the same model built second, so half of each mode's processes build the bare
one first; ``--aa`` (both models unwatched) prints the method's own error. The
default mode's steps are also timed one by one: ``report_ms`` is its median report step
minus its median plain step (transformer). ``launches_per_layer``:
the top-level aten ops (each a kernel launch on a device) of a report step minus a plain
step's, per measured layer, counted with torch.profiler on the CPU (transformer, default
settings). The last line is ``overhead_default=R1 overhead_all=R2 report_ms=C
launches_per_layer=D gpt_small_default=E gpt_small_all=F gpt_small_report_ms=G``
(then the fixed cost per report and ``eval_mem_ratio``): R1, R2 the largest ratio over the
transformer and the MLPs (and devices) measured, E, F, G the small GPT's.

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
#: The modes a process watches its model in (each beside the same model unwatched).
WATCHED = ("default", "all")
#: The per-report figures are taken on this model (the issue's budgets are for it).
REPORT_MODEL = "transformer"
CHUNK = 10
#: Chunks per process of the fixed-cost measurement (tiny models: ~5 ms a step).
FIXED_CHUNKS = 20


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
    base, _, tiny = model_name.partition(":")
    if base in ("transformer", "gpt_small"):
        # gpt_small: ~0.12 M parameters, 2 blocks of width 64, 64 tokens of a 128-token
        # vocabulary, batch 8 (~10 ms a step on one core): the fixed cost per report
        # weighs most on such a model.
        vocab, ctx, kw = (1024, 128, {}) if base == "transformer" else (
            128, 64, dict(vocab=128, d=64, heads=4, depth=2, ctx=64))
        batch = 8
        if tiny:  # "<model>:tiny": the same layers and parameters, every tensor tiny
            vocab, ctx, batch = 32, 4, 1
            kw = dict(vocab=vocab, d=16, heads=4, depth=kw.get("depth", 4), ctx=ctx)
        model = GPT(**kw).to(device)
        x = torch.randint(0, vocab, (batch, ctx), device=device)

        def loss_fn(m):
            return F.cross_entropy(m(x).flatten(0, 1), x.flatten())
        val = torch.randint(0, vocab, (max(1, eval_batch // ctx), ctx), device=device)
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
    # The model built first trains up to ~6 % slower than the same model built second (an
    # A/A run, both unwatched; cause unknown): ``measure`` builds the bare one first in half
    # of the processes, the watched one first in the others.
    bare_built = build(args.model, args.device, args.mlp_batch) if args.bare_first else None
    model, loss_fn, val = build(args.model, args.device, args.mlp_batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mon = None
    if args.mode != "off":
        import neurotop

        opts = {} if args.mode in ("default", "ops") else dict(
            report_every=1, hist_every=1, signal_layers=("*",), hist_layers=("*",))
        mon = neurotop.watch(model, opt, name=f"bench-{args.model}", **opts)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def trainer(model: Any, loss_fn: Any, opt: Any, mon: Any) -> Any:
        def step() -> None:
            loss = loss_fn(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if mon is not None:
                mon.observe(loss=loss)
            opt.step()
        return step

    step = trainer(model, loss_fn, opt, mon)
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
    if args.mode == "ops":
        print(json.dumps(count_ops(model, mon, step)))
        mon.close()
        return
    # The same model, unwatched, in the same process: its chunks alternate with the watched
    # model's, so that both see the machine as it is at that moment (a shared machine's
    # speed drifts by 10-40 % within seconds and between processes).
    bare_model, bare_loss, _ = bare_built or build(args.model, args.device, args.mlp_batch)
    bare = trainer(bare_model, bare_loss, torch.optim.AdamW(bare_model.parameters(), lr=1e-4),
                   None)
    for _ in range(args.warmup):
        bare()
    while mon is not None and not mon._active:  # each watched chunk starts with a report
        step()
    sync()

    steps: dict[bool, list[float]] = {True: [], False: []}  # the watched model's steps
    thread: dict[bool, list[float]] = {True: [], False: []}  # and this thread's CPU in them

    def chunk(watched: bool) -> tuple[float, float]:
        run = step if watched else bare
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(CHUNK):
            reports, t1 = watched and mon is not None and mon._active, time.perf_counter()
            c1 = time.thread_time()
            run()
            sync()  # per step: a report step's time is its own (a no-op on the CPU)
            if watched:
                thread[reports].append(time.thread_time() - c1)
                steps[reports].append(time.perf_counter() - t1)
        return (time.perf_counter() - t0) / CHUNK, (time.process_time() - c0) / CHUNK

    off, on = [chunk(False)], []
    t0 = time.perf_counter()  # a fast model takes more pairs: its chunks are noisier
    while len(on) < args.chunks or time.perf_counter() - t0 < args.seconds:
        on.append(chunk(True))
        off.append(chunk(False))
    if mon is not None:
        mon.close()
    # each watched chunk against the mean of the bare chunks just before and after it
    ratios = {k: [on[i][k] / ((off[i][k] + off[i + 1][k]) / 2) for i in range(len(on))]
              for k in (0, 1)}
    print(json.dumps({"wall_ratio": ratios[0], "cpu_ratio": ratios[1],
                      "off": [t for t, _ in off], "on": [t for t, _ in on],
                      "report": steps[True], "plain": steps[False],
                      "report_cpu": thread[True], "plain_cpu": thread[False],
                      "layers": len(mon._layers) if mon is not None else 0}))


def count_ops(model: Any, mon: Any, step: Any) -> dict[str, float]:
    """Top-level aten ops (on CPU each is a kernel launch on a device) of a report step
    minus those of a plain step, with the profiler, and the number of measured layers."""
    from torch.profiler import ProfilerActivity, profile

    def ops(report: bool) -> int:
        while mon._active != report:
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        n = 0
        for e in prof.events():
            if not e.name.startswith("aten::"):
                continue
            p = e.cpu_parent
            while p is not None and not p.name.startswith("aten::"):
                p = p.cpu_parent
            n += p is None
        return n

    rep, plain = min(ops(True) for _ in range(2)), min(ops(False) for _ in range(2))
    return {"report": rep, "plain": plain, "layers": len(mon._layers)}


def run_child(model: str, mode: str, device: str, args: argparse.Namespace,
              eval_child: bool = False, mlp_batch: int | None = None,
              chunks: int | None = None, bare_first: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--mode", mode,
           "--device", device, "--warmup", str(args.warmup),
           "--chunks", str(chunks or args.chunks),
           "--seconds", str(0 if chunks else args.seconds),
           "--threads", str(args.threads),
           "--mlp-batch", str(mlp_batch or args.mlp_batches.split(",")[0]),
           "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
           *(["--eval-child"] if eval_child else []),
           *(["--bare-first"] if bare_first else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"benchmark child failed ({model} {mode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(model: str, device: str, args: argparse.Namespace, batch: int | None = None
            ) -> dict[str, float]:
    """Ratios with / without for both modes (the median over every watched chunk of every
    process of its time over its bare neighbours'), and ``report_ms``: the median report
    step of the default mode minus its median plain step, in the same processes."""
    ratios: dict[str, dict[str, list[float]]] = {
        k: {m: [] for m in WATCHED} for k in ("wall_ratio", "cpu_ratio")}
    times: dict[str, list[float]] = {"off": [], **{m: [] for m in WATCHED}}
    steps: dict[str, list[float]] = {"report": [], "plain": []}
    for rep in range(args.reps):
        for mode in WATCHED[rep % 2:] + WATCHED[: rep % 2]:
            # each mode's processes build the bare model first every other time
            first = (rep + WATCHED.index(mode)) % 2 == 1
            got = run_child(model, mode, device, args, mlp_batch=batch, bare_first=first)
            for k in ratios:
                ratios[k][mode] += got[k]
            times["off"] += got["off"]
            times[mode] += got["on"]
            if mode == "default":
                for k in steps:
                    steps[k] += got[k]
    label = f"{model}@{batch}" if model == "mlp" else model
    med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    r = {k: {m: statistics.median(v) for m, v in by.items()} for k, by in ratios.items()}
    print(f"{device} {label}: median chunk step: off {med['off']:.1f} ms, default "
          f"{med['default']:.1f} ms, all {med['all']:.1f} ms; watched / bare, the median over "
          f"chunks of their ratios to their neighbours: default {r['wall_ratio']['default']:.3f}"
          f" (process CPU {r['cpu_ratio']['default']:.3f}), all {r['wall_ratio']['all']:.3f}"
          f" (process CPU {r['cpu_ratio']['all']:.3f})", flush=True)
    report_ms = (statistics.median(steps["report"]) - statistics.median(steps["plain"])) * 1e3
    print(f"  report step {statistics.median(steps['report']) * 1e3:.2f} ms, plain step "
          f"{statistics.median(steps['plain']) * 1e3:.2f} ms (default mode): +{report_ms:.2f}"
          f" ms per report  [{args.reps} processes per mode, {len(ratios['wall_ratio']['default'])}"
          f" and {len(ratios['wall_ratio']['all'])} watched chunks of {CHUNK} steps]", flush=True)
    return {"default": r["wall_ratio"]["default"], "all": r["wall_ratio"]["all"],
            "report_ms": report_ms}


def measure_aa(model: str, args: argparse.Namespace, batch: int | None = None) -> float:
    """The pairing's own bias: the same measurement with neither model watched (A/A),
    on the CPU; the ratio furthest from 1."""
    ratios: list[float] = []
    for rep in range(args.reps):
        ratios += run_child(model, "off", "cpu", args, mlp_batch=batch,
                            bare_first=rep % 2 == 1)["wall_ratio"]
    r = statistics.median(ratios)
    label = f"{model}@{batch}" if model == "mlp" else model
    print(f"cpu {label}: A/A, both unwatched: {r:.3f}  [{args.reps} processes, {len(ratios)}"
          f" chunks]", flush=True)
    return max(r, 1 / r)


def measure_ops(model: str, device: str, args: argparse.Namespace) -> float:
    """Top-level aten ops (kernel launches on a device) of a report step over a plain
    step's, per measured layer, counted with torch.profiler on the CPU."""
    got = run_child(model, "ops", "cpu", args)
    per_layer = (got["report"] - got["plain"]) / got["layers"]
    print(f"cpu {model}: aten ops per step: report {got['report']}, plain {got['plain']}: "
          f"+{got['report'] - got['plain']} for {got['layers']} layers ({per_layer:.1f} per"
          " layer)", flush=True)
    return per_layer


def measure_fixed(model: str, args: argparse.Namespace) -> dict[str, float]:
    """The fixed cost of a report: ``<model>:tiny`` (the same layers and parameters, every
    tensor tiny: one read of each activation or parameter costs next to nothing), default
    settings, on the CPU, in ``--reps`` fresh processes of ``FIXED_CHUNKS`` chunks. The
    training thread's CPU time of the median report step minus that of the median plain
    step (``report_fixed_ms``), and the same in wall-clock time, which adds what the agent
    thread takes of the GIL while it turns the report into statistics."""
    steps: dict[str, list[float]] = {k: [] for k in ("report", "plain", "report_cpu",
                                                     "plain_cpu")}
    layers = 0
    for _ in range(args.reps):
        got = run_child(f"{model}:tiny", "default", "cpu", args, chunks=FIXED_CHUNKS)
        for k in steps:
            steps[k] += got[k]
        layers = got["layers"]
    med = {k: statistics.median(v) * 1e3 for k, v in steps.items()}
    fixed, wall = med["report_cpu"] - med["plain_cpu"], med["report"] - med["plain"]
    print(f"cpu {model}:tiny ({layers} layers): training-thread CPU per step: report "
          f"{med['report_cpu']:.2f} ms, plain {med['plain_cpu']:.2f} ms: +{fixed:.2f} ms fixed"
          f" per report ({fixed * 1e3 / max(layers, 1):.1f} us per layer; budget "
          f"{1 + 0.005 * layers:.2f} ms); wall clock +{wall:.2f} ms  [{args.reps} processes x"
          f" {len(steps['report'])} reports]", flush=True)
    return {"fixed_ms": fixed, "wall_ms": wall, "layers": layers}


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
    p.add_argument("--chunks", type=int, default=4,
                   help="watched chunks of 10 steps per process (each between two bare ones),"
                        " at least")
    p.add_argument("--seconds", type=float, default=8.0,
                   help="and pairs of chunks until this long (small models: more pairs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--models", default="transformer,mlp,gpt_small")
    p.add_argument("--mlp-batches", default="1024,256",
                   help="rows per step of the MLP, one measurement each")
    p.add_argument("--mlp-batch", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--eval-every", type=int, default=10,
                   help="evaluate every N steps in the memory measurement (0: skip it)")
    p.add_argument("--eval-batches", type=int, default=200, help="batches per evaluation")
    p.add_argument("--eval-only", action="store_true",
                   help="only the eval memory measurement (no timing)")
    p.add_argument("--fixed-only", action="store_true",
                   help="only the fixed cost per report (tiny models, training-thread CPU)")
    p.add_argument("--aa", action="store_true",
                   help="only the method's own bias: both models unwatched (an A/A run)")
    p.add_argument("--eval-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bare-first", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=(*MODES, "ops"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    devices = [args.device]
    if args.device == "auto":
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    models = args.models.split(",")
    batches = [int(b) for b in args.mlp_batches.split(",")]
    if args.aa:
        worst = max(measure_aa(m, args, b) for m in models
                    for b in (batches if m == "mlp" else [None]))
        print(f"aa_ratio={worst:.3f}")
        return
    runs = [(m, d, b) for d in devices for m in models if m != "gpt_small"
            for b in (batches if m == "mlp" else [None])]
    keys = []
    if not args.eval_only and not args.fixed_only:
        ratios = {(m, d, b): measure(m, d, args, b) for m, d, b in runs}
        if ratios:  # (``--models gpt_small`` alone: only its own keys)
            keys += [f"overhead_default={max(r['default'] for r in ratios.values()):.3f}",
                     f"overhead_all={max(r['all'] for r in ratios.values()):.3f}"]
        if REPORT_MODEL in models:
            keys.append(f"report_ms={ratios[(REPORT_MODEL, 'cpu', None)]['report_ms']:.2f}")
            keys.append(f"launches_per_layer={measure_ops(REPORT_MODEL, 'cpu', args):.1f}")
        if "gpt_small" in models:
            small = [measure("gpt_small", d, args) for d in devices]
            keys += [f"gpt_small_default={max(r['default'] for r in small):.3f}",
                     f"gpt_small_all={max(r['all'] for r in small):.3f}",
                     f"gpt_small_report_ms={small[0]['report_ms']:.2f}"]
    if not args.eval_only or args.fixed_only:
        for m in (REPORT_MODEL, "gpt_small"):
            if m in models:
                f = measure_fixed(m, args)
                pre = "" if m == REPORT_MODEL else f"{m}_"
                keys += [f"{pre}report_fixed_ms={f['fixed_ms']:.2f}",
                         f"{pre}report_fixed_us_per_layer="
                         f"{f['fixed_ms'] * 1e3 / max(f['layers'], 1):.1f}"]
    if args.eval_every > 0 and not args.fixed_only and runs:  # (not gpt_small's own)
        keys.append("eval_mem_ratio=" + format(max(
            measure_eval_memory(m, d, args) for m, d in dict.fromkeys(
                (m, d) for m, d, _ in runs)), ".3f"))
    print(" ".join(keys))


if __name__ == "__main__":
    main()
