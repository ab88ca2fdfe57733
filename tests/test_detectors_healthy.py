"""The detectors do not cry wolf (issue 16, item 4): standard architectures at PyTorch's
default init, trained healthy for a few hundred steps at the default ``report_every``,
raise no alert at all. Each model is a tiny version of a well-known one, trained in this
process on a task it can learn, as a new user would first try neurotop."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from tests.helpers.alerts import recorded
from tests.helpers.package import ROOT

STEPS = 300


def _demo_mlp():
    spec = importlib.util.spec_from_file_location("demo_mlp", ROOT / "demos" / "mlp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one fused qkv projection, scaled dot product, out projection."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.c_attn, self.c_proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.c_attn(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "gelu": nn.GELU(),
                                  "c_proj": nn.Linear(4 * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        m = self.mlp
        return x + m["c_proj"](m["gelu"](m["c_fc"](self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's layout (wte, wpe, h, ln_f, tied lm_head), 4 layers of width 32."""

    def __init__(self, vocab: int = 16, ctx: int = 16, d: int = 32, layers: int = 4) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList([GPTBlock(d, 4) for _ in range(layers)])
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():  # nanoGPT's init
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class PreLNBlock(nn.Module):
    """A hand-written pre-LN transformer block with ``nn.MultiheadAttention``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads,
                                                                       batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class SeqClassifier(nn.Module):
    """Vectors in, a class per sequence out, through 4 pre-LN blocks (``body``)."""

    def __init__(self, body: nn.Module, d: int = 32) -> None:
        super().__init__()
        self.inp, self.body = nn.Linear(8, d), body
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if isinstance(self.body, nn.ModuleList):
            for block in self.body:
                h = block(h)
        else:
            h = self.body(h)
        return self.head(self.norm(h).mean(1))


class BNCNN(nn.Module):
    """Conv, BatchNorm, ReLU modules, three stages, pooling: the standard vision stack."""

    def __init__(self) -> None:
        super().__init__()
        chans, layers = [1, 8, 16, 16], []
        for a, b in zip(chans, chans[1:], strict=False):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        self.features, self.head = nn.Sequential(*layers), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _default_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4))


class Task:
    """Inputs from a fixed generator, labels from a fixed random teacher: learnable."""

    def __init__(self, shape: tuple[int, ...], classes: int = 4, tokens: int = 0,
                 size: int = 32) -> None:
        self.gen = torch.Generator().manual_seed(1)
        self.shape, self.tokens, self.size = shape, tokens, size
        n = math.prod(shape)
        self.teacher = torch.randn(n, classes, generator=self.gen)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.size
        if self.tokens:  # next token of a sequence that counts up from a random start
            start = torch.randint(0, self.tokens, (size, 1), generator=self.gen)
            seq = (start + torch.arange(self.shape[0] + 1)) % self.tokens
            return seq[:, :-1], seq[:, 1:]
        x = torch.randn(size, *self.shape, generator=self.gen)
        return x, (x.flatten(1) @ self.teacher).argmax(1)


def cases() -> dict[str, tuple]:
    """name -> (model factory, task, optimizer factory)."""
    demo = _demo_mlp()
    adam = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731
    return {
        "default_mlp": (_default_mlp, Task((16,)), lambda p: torch.optim.SGD(p, lr=0.05)),
        "demo_mlp": (lambda: demo.make_model(256, 6, 10), "demo",
                     lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0)),
        "nanogpt": (NanoGPT, Task((8,), tokens=16, size=16),
                    lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1)),
        "preln_handwritten": (lambda: SeqClassifier(nn.ModuleList(
            [PreLNBlock(32, 4) for _ in range(4)])), Task((8, 8), size=16), adam),
        "transformer_encoder": (lambda: SeqClassifier(nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0, batch_first=True,
                                       norm_first=True), 4, enable_nested_tensor=False)),
            Task((8, 8), size=16), adam),
        "bn_cnn": (BNCNN, Task((1, 8, 8)), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        "lstm": (LSTMNet, Task((8, 8)), adam),
    }


#: The demo MLP trains at a learning rate high enough to kill ReLU units (its docstring
#: says so: that is what it shows): a third to a half of its last ReLUs' units die in the
#: first hundred steps. Those alerts are a real defect, checked against plain PyTorch.
REAL = {"demo_mlp": ("dying_layer", "dead_jump")}


def train(name: str, runs: Path, steps: int = STEPS
          ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Train case ``name`` watched at the defaults: its alerts, and (cases in ``REAL``) for
    each ReLU module whether each unit was positive in each step's batch (``[steps x
    units]``), plain PyTorch, to tell a real dying layer from a false one."""
    make, task, optim = cases()[name]
    torch.manual_seed(0)
    model = make()
    opt = optim(model.parameters())
    if task == "demo":
        demo = _demo_mlp()
        teacher = demo.make_model(128, 2, 10).eval()
        gen = torch.Generator().manual_seed(1)

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(128, 64, generator=gen)
            with torch.no_grad():
                return x, teacher(x).argmax(1)
    else:
        batch = task.batch
    alive: dict[str, list[torch.Tensor]] = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.ReLU) and name in REAL:
            alive[n] = []
            m.register_forward_hook(
                lambda m, i, o, n=n: alive[n].append(o.detach().flatten(0, -2).amax(0) > 0))
    with neurotop.watch(model, opt, name=name, record=runs) as mon:
        for _ in range(steps):
            x, y = batch()
            loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
    return recorded(runs)[0], {n: torch.stack(a) for n, a in alive.items() if a}


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: more threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(cases()))
def test_healthy_standard_architectures_raise_no_alert(name, tmp_path, one_thread):
    alerts, alive = train(name, tmp_path / "runs")
    false = [a for a in alerts if a["alert"] not in REAL.get(name, ())]
    assert false == [], false
    # Each alert a real dying layer: its units never positive in any batch from the first
    # report of the alert's window (dead_window = 10 reports) to the alert's step.
    for a in alerts:
        window = alive[a["layer"]][max(0, a["step"] - 91): a["step"]]
        never = 1 - window.any(0).float().mean()
        assert never > 0.3, (a, float(never))
    if name in REAL:
        assert alerts, "the demo's dying units went unnoticed"


if __name__ == "__main__":
    import sys
    import tempfile
    import time
    torch.set_num_threads(1)
    for n in sys.argv[1:] or list(cases()):
        t = time.time()
        got, _ = train(n, Path(tempfile.mkdtemp()))
        print(f"{n}: {time.time() - t:.1f}s {len(got)} alerts")
        for a in got:
            print("   ", a["step"], a["alert"], a["layer"], a["message"])
