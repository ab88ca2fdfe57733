"""Attention and shared modules: ``nn.MultiheadAttention`` (which applies its ``out_proj``
functionally) is measured on its output, matching NumPy on the tensors it produced;
``nn.TransformerEncoderLayer`` blocks are measured with their attention, and the ReLU they
apply functionally marks ``linear1``; a module called from two places in one forward is
flagged in the schema (``calls``), however many forwards a step makes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import neurotop
from tests.helpers import numpy_reference as ref
from tests.helpers.reports import Reports

E, T, B = 32, 12, 8
CHECKED = ("mean", "std", "rms", "max_abs", "zero_frac", "dead_frac", "grad_rms")


class AttnModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, E)
        self.attn = nn.MultiheadAttention(E, 4, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h + a).mean(1)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, E)
        layer = nn.TransformerEncoderLayer(E, 4, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(x))).mean(1)


class TwoSites(nn.Module):
    """``proj`` is applied at two places of the forward (a tied or reused layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.proj, self.head = nn.Linear(8, E), nn.Linear(E, E), nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.inp(x)))
        return self.head(torch.tanh(self.proj(h))).mean(1)


def train(tmp_path, net: nn.Module, probe: str | None = None, micro: int = 1, steps: int = 9):
    """Train watched (``micro`` forwards per step); returns the reports and, per step, the
    probed module's outputs and output gradients."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    mon = neurotop.watch(net, opt, name="attention", record=tmp_path, report_every=2)
    seen: list[dict[str, list[np.ndarray]]] = []
    if probe is not None:
        def hook(m, i, o):
            out = o[0]
            seen[-1]["out"].append(out.detach().numpy().copy())
            out.register_hook(lambda g: seen[-1]["grad"].append(g.numpy().copy()))
        dict(net.named_modules())[probe].register_forward_hook(hook)
    rep = Reports(mon)
    gen = torch.Generator().manual_seed(0)
    try:
        for _ in range(steps):
            seen.append({"out": [], "grad": []})
            opt.zero_grad()
            for _ in range(micro):
                x = torch.randn(B, T, 8, generator=gen)
                y = torch.randint(0, 3, (B,), generator=gen)
                (F.cross_entropy(net(x), y) / micro).backward()
            opt.step()
        rep.stats(1 + (mon.step - 1) // mon.report_every * mon.report_every)  # the last
        rep.steps(settle=0.5)
    finally:
        mon.close()
        rep.close()
    return rep, seen


def test_multihead_attention_is_measured_on_its_output(tmp_path):
    torch.manual_seed(0)
    rep, seen = train(tmp_path, AttnModel(), probe="attn")
    steps = rep.steps(settle=0)
    schema = rep.stats(steps[-1]).schema
    assert "attn" in schema["layers"] and "attn.out_proj" not in schema["layers"]
    assert schema["layer_types"][schema["layers"].index("attn")] == "MultiheadAttention"
    for s in steps:
        got = rep.stats(s).layer("attn")
        a = np.concatenate([o.reshape(-1, E) for o in seen[s - 1]["out"]])
        g = np.concatenate([x.reshape(-1, E) for x in seen[s - 1]["grad"]])
        want = ref.layer_stats(a, g, sample=4096, eps=1e-3, units_max_window=a.max(0))
        np.testing.assert_allclose([got[k] for k in CHECKED], [want[k] for k in CHECKED],
                                   rtol=1e-4, atol=1e-7)
    assert rep.events("alert") == []


def test_transformer_encoder_layers(tmp_path):
    torch.manual_seed(0)
    rep, seen = train(tmp_path, Encoder(), probe="enc.layers.1.self_attn", steps=25)
    st = rep.stats(rep.steps(settle=0)[-1])
    layers = st.schema["layers"]
    assert st.schema["blocks"] == ["enc.layers.0", "enc.layers.1"]
    for k in (0, 1):
        attn = f"enc.layers.{k}.self_attn"
        assert attn in layers and f"{attn}.out_proj" not in layers
        assert np.isfinite(st.layer(attn)["rms"]) and st.layer(attn)["rms"] > 0
        acts = dict(zip(layers, st.schema["activations"], strict=True))
        assert acts[f"enc.layers.{k}.linear1"] == "F.relu"
        assert acts[f"enc.layers.{k}.linear2"] == ""
    a = np.concatenate([o.reshape(-1, E) for o in seen[rep.steps(settle=0)[-1] - 1]["out"]])
    np.testing.assert_allclose(st.layer("enc.layers.1.self_attn")["max_abs"], np.abs(a).max(),
                               rtol=1e-6)
    assert rep.events("alert") == []  # a healthy transformer: no dying linear1, nothing


def test_a_module_called_from_two_places_is_flagged(tmp_path):
    torch.manual_seed(0)
    rep, _ = train(tmp_path, TwoSites(), micro=2)  # two forwards per step: still 2 calls
    schema = rep.stats(rep.steps(settle=0)[-1]).schema
    calls = dict(zip(schema["layers"], schema["calls"], strict=True))
    assert calls == {"inp": 1, "proj": 2, "head": 1}
