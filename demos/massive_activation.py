"""Massive activation: one residual channel of a small GPT planted at 2000 (E1).

No downloads: a 4-block pre-LN GPT (nanoGPT's layout, d=64) learns to continue sequences
that count up modulo 16. At ``--plant-step`` (default 100) the demo sets one channel of
block 2's MLP output bias to ``--plant`` (2000), as the "massive activations" of large
LLMs (Sun et al. 2024: a few fixed channels 1e4 times the median, acting as biases) look:
one channel of that layer's output, and from there of the residual stream, is hundreds of
times its median. ``massive_activation`` fires three reports later at ``h.2.mlp.c_proj``,
the first layer in forward order, and at the blocks downstream that carry it. Without the
plant (``--plant 0``, the healthy twin) nothing fires.

    python demos/massive_activation.py --steps 300             # planted at step 100
    python demos/massive_activation.py --steps 300 --plant 0   # the healthy twin
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from neurotop.demos._loop import run_options, train

TOKENS, CONTEXT = 16, 8


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "gelu": nn.GELU(),
                                  "c_proj": nn.Linear(4 * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        m = self.mlp
        return x + m["c_proj"](m["gelu"](m["c_fc"](self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, blocks: int = 4) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(TOKENS, d), nn.Embedding(CONTEXT, d)
        self.h = nn.ModuleList([Block(d, heads) for _ in range(blocks)])
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, TOKENS)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def plant(model: GPT, value: float, channel: int = 7, block: int = 2) -> None:
    """One channel of ``h.{block}.mlp.c_proj``'s output bias set to ``value``."""
    with torch.no_grad():
        model.h[block].mlp["c_proj"].bias[channel] = value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_options(p)
    p.add_argument("--plant", type=float, default=2000.0,
                   help="the planted channel's value (0: no plant, the healthy twin)")
    p.add_argument("--plant-step", type=int, default=100, help="the step it is planted at")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    with neurotop.watch(model, opt, name="demo-massive-activation",
                        report_every=args.report_every) as mon:
        def step(i: int) -> None:
            if args.plant and i == args.plant_step:
                plant(model, args.plant)
            start = torch.randint(0, TOKENS, (args.batch, 1), generator=gen)
            seq = (start + torch.arange(CONTEXT + 1)) % TOKENS
            logits = model(seq[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
        train(mon, args, step)


if __name__ == "__main__":
    main()
