"""The curvature probe (issue 16, item 2; ``neurotop.training.curvature``): its numbers against
exact ones (the full Hessian of a tiny model by ``torch.autograd.functional.hessian``), the
run's state untouched by it (bit for bit, alone and over a whole training run with dropout,
BatchNorm and Adam), the ``probe`` command through ``neurotop ctl``, and its hostile inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import neurotop
from neurotop.config import ConfigError
from neurotop.protocol.commands import check_args
from neurotop.training.curvature import CurvatureProbe, effective_rank, eos_threshold, nc1
from tests.helpers.cli import neurotop as neurotop_cli
from tests.helpers.package import ROOT


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads per process make each
    Hessian-vector product of these tiny models 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return model, torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts, at = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            parts[n] = theta[at:at + k].view(s)
            at += k
        return nn.functional.mse_loss(functional_call(model, parts, (x,)), y)
    return torch.autograd.functional.hessian(loss, flat)


def test_power_iteration_and_hutchinson_match_the_exact_hessian():
    model, x, y = tiny()
    h = exact_hessian(model, x, y)
    eig = torch.linalg.eigvalsh(h)
    top = eig[eig.abs().argmax()].item()
    probe = CurvatureProbe(model, lambda: None)
    probe.set_batch(x, y)
    out = probe.run(step=1, iters=200, trace_samples=1000)
    assert out["lambda_max"].item() == pytest.approx(top, rel=1e-4)
    # Hutchinson: the estimate's standard deviation is sqrt(2 sum_{i!=j} H_ij^2 / n)
    sd = math.sqrt(2 * ((h ** 2).sum() - (h.diagonal() ** 2).sum()).item() / 1000)
    assert abs(out["hessian_trace"].item() - h.trace().item()) < 4 * sd
    # The default 20 iterations are within a percent here (the gap to the 2nd is wide).
    assert probe.run(step=1)["lambda_max"].item() == pytest.approx(top, rel=1e-2)
    assert out["probe_loss"].item() == pytest.approx(
        nn.functional.mse_loss(model(x), y).item(), rel=1e-6)


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_adams_p_inverse_h():
    model, x, y = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    h = exact_hessian(model, x, y)
    t = 5
    p = torch.cat([((1 - 0.9 ** t) * ((opt.state[q]["exp_avg_sq"] / (1 - 0.99 ** t)).sqrt()
                                      + 1e-8)).flatten() for q in model.parameters()])
    s = p.rsqrt()
    eig = torch.linalg.eigvalsh(s[:, None] * h * s[None, :])  # P^-1/2 H P^-1/2 ~ P^-1 H
    probe = CurvatureProbe(model, lambda: opt)
    probe.set_batch(x, y)
    out = probe.run(step=5, iters=150)
    assert out["precond_sharpness"].item() == pytest.approx(
        eig[eig.abs().argmax()].item(), rel=1e-3)
    assert out["eos_threshold"].item() == pytest.approx(38 / 1e-2, rel=1e-6)


def test_stability_thresholds_of_each_optimizer():
    w = [nn.Parameter(torch.zeros(2))]
    assert eos_threshold(torch.optim.SGD(w, lr=0.1))[0] == pytest.approx(20)
    assert eos_threshold(torch.optim.SGD(w, lr=0.1, momentum=0.9))[0] == pytest.approx(38)
    assert eos_threshold(torch.optim.SGD(w, lr=0.1, momentum=0.9, nesterov=True))[0] == (
        pytest.approx(3.8 / 2.8 / 0.1))
    assert eos_threshold(torch.optim.AdamW(w, lr=1e-3))[0] == pytest.approx(38_000)
    assert math.isnan(eos_threshold(torch.optim.Adagrad(w, lr=0.1))[0])
    assert math.isnan(eos_threshold(None)[0])


def test_effective_rank_and_nc1_on_known_features():
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    h = q[:, :4] * torch.tensor([3.0, 3.0, 3.0, 3.0], dtype=torch.float64)  # 4 equal sv
    assert effective_rank(h).item() == pytest.approx(4.0, rel=1e-9)
    assert effective_rank(torch.ones(10, 7)).item() == pytest.approx(1.0, rel=1e-6)
    assert effective_rank(torch.zeros(10, 7)).item() == 1.0
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    means = torch.randn(3, 8, generator=g, dtype=torch.float64) * 4
    feats = means[y] + 0.3 * torch.randn(60, 8, generator=g, dtype=torch.float64)
    mu_c = torch.stack([feats[y == c].mean(0) for c in range(3)])
    dev = feats - mu_c[y]
    sw = dev.T @ dev / 60
    mc = mu_c - mu_c.mean(0)
    sb = mc.T @ mc / 3
    want = torch.trace(sw @ torch.linalg.pinv(sb)).item() / 3
    assert nc1(feats, y).item() == pytest.approx(want, rel=1e-6)


class Net(nn.Module):
    """BatchNorm (running statistics), dropout (the RNG) and Adam (its state): all that a
    probe could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Dropout(0.3), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    out += [p.grad.clone() for p in model.parameters()]
    out += [b.clone() for b in model.buffers()]
    out += [v.clone() for s in opt.state.values() for v in s.values()
            if isinstance(v, torch.Tensor)]
    out.append(torch.get_rng_state())
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        for x, y in zip(a, b, strict=True))


def train(probe_every: int, steps: int = 12, command_at: int = 0) -> list[torch.Tensor]:
    """A watched run; its final state. ``probe_every``: the probe's schedule (0: none);
    ``command_at``: the ``probe`` command's path (the controller's callback) at that step."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    with neurotop.watch(model, opt, report_every=5, probe_every=probe_every,
                        features="body.5", record=False) as mon:
        if probe_every or command_at:
            mon.probe_batch(x[:32], y[:32])
        for step in range(1, steps + 1):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
            if step == command_at:
                before = state(model, opt)
                got = mon.controller.probe(mon.step)
                assert math.isfinite(got["lambda_max"]) and math.isfinite(got["feature_erank"])
                assert same(before, state(model, opt))
    return state(model, opt)


def test_the_probe_leaves_the_run_exactly_as_it_found_it():
    torch.manual_seed(1)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    probe = CurvatureProbe(model, lambda: opt, features="body.5")
    probe.set_batch(x, y)
    grads = [p.grad for p in model.parameters()]
    before = state(model, opt)
    out = probe.run(step=3)
    assert same(before, state(model, opt))
    # the same tensors, not copies
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert {"lambda_max", "hessian_trace", "precond_sharpness", "probe_acc",
            "feature_erank", "nc1"} <= set(out)
    assert model.training  # still in train mode


def test_a_run_with_probes_trains_bit_for_bit_like_one_without():
    # Dropout masks, BatchNorm statistics, Adam moments: a probe at every step (and one
    # from the command's path) changes none of them, so the two runs end identical.
    assert same(train(probe_every=0), train(probe_every=1, command_at=7))


def test_probe_scalars_go_out_in_the_report_after_the_probe(tmp_path):
    from tests.helpers.recorded import read_recording

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with neurotop.watch(model, opt, report_every=2, probe_every=4) as mon:
        mon.probe_batch(x, y)
        for _ in range(13):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
    [session] = (tmp_path / "runs").glob("*/session.ntop")
    rec = read_recording(session)
    steps = rec.scalar("probe_step")
    # Reports come at steps 1, 3, 5, ... (the first step, then each one after a multiple
    # of report_every): each probe goes out in the first report after it, once.
    assert rec.steps == [1, 3, 5, 7, 9, 11, 13]
    assert [s for s in steps if s == s] == [4, 8, 12]
    assert [st for st, s in zip(rec.steps, steps, strict=True) if s == s] == [5, 9, 13]
    assert rec.schema["probe"]["threshold"] == "2/lr"
    thr = rec.scalar("eos_threshold")
    assert all(v == pytest.approx(40) for v, s in zip(thr, steps, strict=True) if s == s)


def test_hostile_probe_inputs_get_one_line_errors():
    model = nn.Sequential(nn.Linear(4, 2))
    with neurotop.watch(model, record=False) as mon:
        with pytest.raises(ValueError, match="without y needs watch"):
            mon.probe_batch(torch.randn(3, 4))
        with pytest.raises(TypeError, match="takes tensors"):
            mon.probe_batch([1, 2, 3], torch.zeros(3))
        with pytest.raises(TypeError, match="takes a function"):
            mon.probe(42)
        with pytest.raises(ValueError, match="iters must be an integer >= 1, got 0"):
            mon.probe_batch(torch.randn(3, 4), torch.randn(3, 2), iters=0)
        with pytest.raises(ValueError, match="no probe batch"):
            mon._probe_command(0)
        mon.probe(lambda: model(torch.randn(3, 4)))  # not a scalar
        with pytest.raises(TypeError, match="must be a scalar tensor"):
            mon._probe_command(0)
        mon.probe(lambda: model(torch.randn(3, 4)).sum().detach())
        with pytest.raises(RuntimeError, match="does not require grad"):
            mon._probe_command(0)
    with pytest.raises(ValueError, match="features='nope': no module"):
        neurotop.watch(model, features="nope", record=False)
    with pytest.raises(ConfigError, match="probe_every must be an integer"):
        neurotop.watch(model, probe_every=-1, record=False)
    assert check_args("probe", {"now": 1}) == "probe does not take 'now'"


@pytest.mark.slow
def test_ctl_probe_answers_the_probes_numbers(start_run):
    run = start_run("--steps", "0", "--probe-every", "0", "--step-sleep", "0.02",
                    script=ROOT / "demos" / "edge_of_stability.py")
    out = neurotop_cli("ctl", run.info.run_id, "probe", timeout=60)
    assert out.returncode == 0, out.stderr
    ack = json.loads(out.stdout)
    assert ack["ok"] and ack["cmd"] == "probe" and ack["step"] >= 0
    assert ack["new"]["eos_threshold"] == pytest.approx(20)
    assert 0 < ack["new"]["lambda_max"] < 20 and ack["new"]["hessian_trace"] > 0


@pytest.mark.slow
def test_ctl_probe_on_a_run_without_a_probe_batch_says_what_to_do(start_run):
    run = start_run("--step-sleep", "0.01")
    out = neurotop_cli("ctl", run.info.run_id, "probe", timeout=60)
    assert out.returncode == 1
    assert "probe rejected: probe: this run has no probe batch: call mon.probe_batch" in (
        out.stderr)


def test_features_of_images_and_sequences_are_rows_of_channels_and_tokens():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 3))
    x, y = torch.randn(24, 1, 8, 8), torch.arange(24) % 3
    probe = CurvatureProbe(cnn, lambda: None, features="1")
    probe.set_batch(x, y)
    out = probe.run(step=1, iters=5, trace_samples=0)
    pooled = cnn[1](cnn[0](x)).mean((2, 3))  # [24 x 6]: channels, pooled over space
    assert out["feature_erank"].item() == pytest.approx(effective_rank(pooled).item(), rel=1e-5)
    assert out["nc1"].item() == pytest.approx(nc1(pooled, y).item(), rel=1e-4)
    assert probe.schema()["classes"] == 3 and probe.schema()["features"] == "1"
    seq = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    tokens = torch.randint(0, 10, (4, 5))
    probe = CurvatureProbe(seq, lambda: None, features="0")
    probe.set_batch(tokens, tokens)  # next-token-free toy: each token its own label
    out = probe.run(step=1, iters=5, trace_samples=0)
    rows = seq[0](tokens).reshape(20, 8)  # one row per token
    assert out["feature_erank"].item() == pytest.approx(effective_rank(rows).item(), rel=1e-5)
    assert "nc1" in out and "probe_acc" in out
