"""Per-parameter statistics of a real optimizer step against NumPy, including the cases
the batched buffers must get right: a sampled weight, a channels_last (not contiguous)
convolution, a parameter without a gradient in this step, and bf16 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neurotop.config import PARAM_STATS
from neurotop.training.param_stats import ParamStats, param_names
from tests.helpers import numpy_reference as ref

SAMPLE = 256


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
        self.fc = nn.Linear(16 * 4 * 4, 40)
        self.unused = nn.Linear(4, 4)  # no gradient: NaN, not a stale or zero value
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc(h)))


def step_and_measure(model: nn.Module, dtype: torch.dtype = torch.float32
                     ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, ...]], list[str]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    stats = ParamStats(param_names(model, opt), sample=SAMPLE)
    x = torch.randn(4, 8, 6, 6, dtype=dtype).to(memory_format=torch.channels_last)
    for _ in range(2):  # the second step runs with optimizer state
        opt.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        before = {n: p.detach().float().numpy().copy() for n, p in model.named_parameters()}
        grads = {n: p.grad.float().numpy().copy() for n, p in model.named_parameters()
                 if p.grad is not None}
        stats.before_step()
        opt.step()
        block = stats.after_step(torch.device("cpu"))
    after = {n: p.detach().float().numpy().copy() for n, p in model.named_parameters()}
    data = {n: (before[n], after[n], grads.get(n)) for n in before}
    return block.numpy(), data, stats.names


def expected(data, names, model: nn.Module) -> np.ndarray:
    params = dict(model.named_parameters())
    rows = []
    for n in names:
        b, a, g = data[n]
        if g is None:  # no gradient: its statistics are NaN
            g = np.full_like(b, np.nan)
        r = ref.param_stats(b, a, g, SAMPLE, leading=not params[n].is_contiguous())
        rows.append([r[s] for s in PARAM_STATS])
    return np.array(rows)


def test_param_stats_match_numpy_for_sampled_channels_last_and_unused_parameters():
    torch.manual_seed(0)
    model = Net()
    assert not model.conv.weight.is_contiguous()  # the case under test
    block, data, names = step_and_measure(model)
    want = expected(data, names, model)
    assert block.shape == (len(names), len(PARAM_STATS))
    unused = [i for i, n in enumerate(names) if n.startswith("unused")]
    assert np.isnan(block[unused][:, [PARAM_STATS.index(s) for s in
                                      ("grad_norm", "grad_max_abs", "nlm_cos")]]).all()
    np.testing.assert_allclose(block, want, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 2e-2), (torch.float64, 1e-5)])
def test_param_stats_of_bf16_and_float64_weights(dtype, rtol):
    torch.manual_seed(0)
    model = Net().to(dtype)
    block, data, names = step_and_measure(model, dtype)
    want = expected(data, names, model)
    used = [i for i, n in enumerate(names) if not n.startswith("unused")]
    np.testing.assert_allclose(block[used], want[used], rtol=rtol, atol=1e-6)


def test_sparse_embedding_gradients():
    """``nn.Embedding(sparse=True)``: norm and max |g| from the coalesced gradient (repeated
    token ids add up), no sample of it (cos NaN); training goes on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = ParamStats(param_names(model, opt), sample=SAMPLE)
    x = torch.tensor([[1, 1, 2, 7], [7, 7, 7, 3]])  # repeats: an uncoalesced gradient
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        g = model[0].weight.grad
        assert g.is_sparse and not g.is_coalesced()
        dense = g.to_dense().numpy().copy()
        before = model[0].weight.detach().numpy().copy()
        stats.before_step()
        opt.step()
        block = stats.after_step(torch.device("cpu")).numpy()
    after = model[0].weight.detach().numpy()
    row = dict(zip(PARAM_STATS, block[0], strict=True))
    want = ref.param_stats(before, after, dense, SAMPLE)
    for s in ("grad_norm", "grad_max_abs", "weight_norm", "update_ratio"):
        np.testing.assert_allclose(row[s], want[s], rtol=1e-5, err_msg=s)
    assert np.isnan(row["nlm_cos"])
    assert np.isfinite(block[1:]).all()  # the dense Linear is measured in full
    total = np.sqrt(sum(np.sum(p.grad.to_dense().numpy() ** 2) for p in model.parameters()))
    np.testing.assert_allclose(float(stats.grad_norm), total, rtol=1e-5)


class Dense(nn.Module):
    """Every parameter gets a gradient: the end-of-backward path reduces the ones sampled
    whole (biases, the small head) in one buffer and the sampled ones one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
        self.fc = nn.Linear(16 * 4 * 4, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc(h)))


@pytest.mark.parametrize("plant", ["", "nan_bias", "inf_weight"])
def test_end_of_backward_norms_match_numpy(plant):
    """The norms and max |g| taken at the end of the backward (the post-accumulate hooks'
    callback), with a NaN or an infinity planted in a whole or a sampled gradient."""
    torch.manual_seed(0)
    model = Dense()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = ParamStats(param_names(model, opt), sample=SAMPLE)
    handles = stats.accumulate_hooks(lambda: True, lambda: None)
    bad = {"nan_bias": (model.fc.bias, float("nan")),
           "inf_weight": (model.fc.weight, float("inf"))}.get(plant)
    if bad is not None:
        bad[0].register_hook(lambda g: g.flatten().index_fill(0, torch.tensor([3]),
                                                              bad[1]).view_as(g))
    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    assert stats._acc is not None and stats._whole  # the end-of-backward path ran, batched
    before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    stats.before_step()
    opt.step()
    block = stats.after_step(torch.device("cpu")).numpy()
    for h in handles:
        h.remove()
    after = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    data = {n: (before[n], after[n], grads[n]) for n in before}
    want = expected(data, stats.names, model)
    cols = [PARAM_STATS.index(s) for s in ("grad_norm", "grad_max_abs", "weight_norm")]
    np.testing.assert_allclose(block[:, cols], want[:, cols], rtol=2e-4, atol=1e-7)
    if bad is not None:
        row = stats.names.index("fc.bias" if plant == "nan_bias" else "fc.weight")
        got = block[row, cols[:2]]
        assert (np.isnan(got).all() if plant == "nan_bias" else np.isinf(got).all())


@pytest.mark.parametrize("case", ["flat", "too_big", "missing", "float64", "bf16", "nan", "inf"])
def test_the_per_step_gradient_norm_is_the_global_norm_numpy_computes(case, monkeypatch):
    """``step_norm`` (the per-step carry's norm): through the CPU's flat buffer for a small
    model, through ``_foreach_norm`` otherwise (a model over ``FLAT_NORM`` values, a
    gradient missing, float64 gradients); a NaN or inf in one gradient makes it
    non-finite either way, and a buffer once made is reused as the values change."""
    from neurotop.training import param_stats

    if case == "too_big":
        monkeypatch.setattr(param_stats, "FLAT_NORM", 100)
    dtype = {"float64": torch.float64, "bf16": torch.bfloat16}.get(case, torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    stats = ParamStats(list(model.named_parameters()), sample=SAMPLE)
    for k in range(2):
        model.zero_grad(set_to_none=True)
        model(torch.randn(5, 6, dtype=dtype)).float().square().mean().backward()
        if case == "missing":
            model[0].bias.grad = None
        if case in ("nan", "inf") and k == 1:
            model[2].weight.grad[1, 2] = float(case)
        grads = [p.grad.double().numpy().ravel() for p in model.parameters()
                 if p.grad is not None]
        want = np.linalg.norm(np.concatenate(grads))
        got = stats.step_norm()
        assert (stats._flat is not None) == (case in ("flat", "bf16", "nan", "inf"))
        if case in ("nan", "inf") and k == 1:
            assert not np.isfinite(got.item())
        else:
            assert got.item() == pytest.approx(want, rel=1e-5)
