"""``torch.compile``: a watched model compiles to exactly the graphs it compiles to unwatched,
with no graph break; report steps run eagerly (they compile and run no graph) and their
statistics are the eager model's.

The loop is shaped like a nanoGPT trainer: ``model = torch.compile(model)`` after ``watch``,
a cosine schedule that sets ``lr`` every iteration, ``clip_grad_norm_`` before ``step``,
``scaled_dot_product_attention``, a hand-written GELU class. The backend records each graph
dynamo hands it (its code) and counts the calls of each, so the test sees which graphs run
on which step without a C++ compiler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import neurotop
from tests.helpers.reports import Reports

V, E, T, B, STEPS, EVERY = 32, 32, 16, 4, 16, 5


class NewGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.c_attn, self.c_proj = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.c_fc, self.gelu, self.mlp_proj = nn.Linear(E, 4 * E), NewGELU(), nn.Linear(4 * E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln_1(x)).split(E, dim=2)
        q, k, v = (t.view(B, T, 4, E // 4).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, E))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, E), nn.Embedding(T, E)
        self.h = nn.ModuleList([Block(), Block()])
        self.ln_f, self.lm_head = nn.LayerNorm(E), nn.Linear(E, V, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Graphs:
    """A dynamo backend that keeps each graph's operations and counts its calls per step.
    A graph is its inputs (as a set: the order dynamo lifts them in may differ) and its
    other nodes, in order, with their targets and arguments."""

    def __init__(self) -> None:
        self.code: list[tuple[set[str], list[tuple[str, ...]]]] = []
        self.calls: list[int] = []  # per graph, calls in the current step

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        i = len(self.code)
        nodes = gm.graph.nodes
        self.code.append(({n.name for n in nodes if n.op == "placeholder"},
                          [(n.op, str(n.target), str(n.args), str(n.kwargs))
                           for n in nodes if n.op != "placeholder"]))
        self.calls.append(0)

        def run(*args: object) -> object:
            self.calls[i] += 1
            return gm.forward(*args)
        return run

    def take_calls(self) -> list[int]:
        calls, self.calls = self.calls, [0] * len(self.calls)
        return calls


def train(watched: bool, compiled: bool, tmp_path) -> dict:
    """Train the GPT; per step, the calls of each graph; the reports when watched."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    mon = neurotop.watch(model, opt, record=tmp_path, report_every=EVERY) if watched else None
    rep = Reports(mon) if mon else None
    graphs = Graphs()
    net = torch.compile(model, backend=graphs) if compiled else model
    gen = torch.Generator().manual_seed(1)
    per_step, reports = [], {}
    try:
        for it in range(STEPS):
            for g in opt.param_groups:  # a hand-written cosine schedule, every iteration
                g["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * it / STEPS))
            idx = torch.randint(0, V, (B, T), generator=gen)
            loss = F.cross_entropy(net(idx).view(-1, V), idx.roll(-1, 1).view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if mon:
                mon.observe(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            per_step.append(graphs.take_calls())
        if rep:
            reported = rep.steps(last=1 + (STEPS - 1) // EVERY * EVERY)
            reports = {s: rep.stats(s) for s in reported}
    finally:
        if mon:
            mon.close()
            rep.close()
    return {"code": graphs.code, "calls": per_step, "reports": reports,
            "breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {k: train(*k, tmp_path_factory.mktemp("run")) for k in
            [(False, True), (True, True), (True, False)]}


def test_plain_steps_run_exactly_the_unwatched_graph(runs):
    plain, watched = runs[(False, True)], runs[(True, True)]
    assert plain["breaks"] == 0 and len(plain["code"]) == 1
    assert watched["breaks"] == 0
    assert watched["code"] == plain["code"]  # the same graph, op for op
    assert watched["unique_graphs"] == plain["unique_graphs"]
    report_steps = set(watched["reports"])
    assert report_steps == {1, 6, 11, 16}
    for step, calls in enumerate(watched["calls"], start=1):
        if step in report_steps:
            assert sum(calls) == 0, f"step {step} reports: it runs eagerly"
        else:
            assert calls == plain["calls"][step - 1] == [1], step


def test_report_steps_measure_what_eager_training_measures(runs):
    compiled, eager = runs[(True, True)]["reports"], runs[(True, False)]["reports"]
    assert compiled.keys() == eager.keys()
    for step in compiled:
        c, e = compiled[step], eager[step]
        assert c.schema["layers"] == e.schema["layers"]
        assert c.schema["activations"] == e.schema["activations"]
        assert "h.0.gelu" in c.schema["layers"] and "h.1.c_fc" in c.schema["layers"]
        assert np.isfinite(c.block[:, c.schema["stats"].index("rms")]).all()
        np.testing.assert_allclose(c.block, e.block, rtol=2e-3, atol=1e-6)  # NaN where NaN
        assert c.scalars["loss"] == pytest.approx(e.scalars["loss"], rel=1e-4)
        assert c.scalars["grad_norm"] == pytest.approx(e.scalars["grad_norm"], rel=1e-3)


def test_a_model_compiled_before_watch_keeps_its_layer_names(tmp_path):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = neurotop.watch(net, opt, record=tmp_path, report_every=2)
    rep = Reports(mon)
    try:
        for _ in range(3):
            loss = net(torch.randn(3, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        got = rep.stats(3)
    finally:
        mon.close()
        rep.close()
    assert got.schema["layers"] == ["0", "1", "2"]
    assert got.layer("1")["rms"] > 0
