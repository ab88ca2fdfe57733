"""A watched model saved whole and deep-copied, as trainers do for checkpoints, EMA weights
and the best model so far: both work while watched, the copy trains without neurotop, and
the original keeps reporting statistics of its own forwards only."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import neurotop
from neurotop.training.hooks import Inert
from tests.helpers import numpy_reference as ref
from tests.helpers.reports import Reports


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 3))


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


def train_step(model, opt, x, y, mon=None) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    if mon is not None:
        mon.observe(loss=loss)
    opt.step()
    return loss


def hooks_of(model: nn.Module) -> list:
    return [h for m in model.modules()
            for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()]


def test_save_deepcopy_and_state_dict_while_watched():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with neurotop.watch(model, opt, report_every=2, record=False) as mon:
        reports = Reports(mon)
        data = batches(8)
        for x, y in data[:2]:
            train_step(model, opt, x, y, mon)
        mon.knobs.apply("l1[1]", 1e-3, "set")  # a knob's own hook on the model, too

        buf = io.BytesIO()
        torch.save(model, buf)  # the whole module, pickled
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        ema = copy.deepcopy(model)
        opt_copy = copy.deepcopy(opt)
        state = model.state_dict()

        for m in (loaded, ema):
            assert hooks_of(m) and all(isinstance(h, Inert) for h in hooks_of(m))
            for (n, p), (_, q) in zip(model.named_parameters(), m.named_parameters(),
                                      strict=True):
                assert torch.equal(p, q), n
        assert set(state) == {n for n, _ in model.named_parameters()}
        assert not opt_copy._optimizer_step_pre_hooks and not opt_copy._optimizer_step_post_hooks

        # The copy trains on its own, in the original's report window (step 3 reports):
        # no hook of it fires, the run's step count does not move.
        ema_opt = torch.optim.SGD(ema.parameters(), lr=0.1)
        step = mon.step
        for x, y in batches(5, seed=1):
            train_step(ema, ema_opt, x, y)
            train_step(loaded, opt_copy, x, y)
        assert mon.step == step == 2

        # The original still reports, and only its own forwards: plain PyTorch reference.
        outs: list[np.ndarray] = []
        h = model[1].register_forward_hook(lambda m, i, o: outs.append(o.detach().numpy()))
        x, y = data[2]
        train_step(model, opt, x, y, mon)
        h.remove()
        got = reports.stats(3).layer("1")
        a = np.concatenate(outs)
        want = ref.layer_stats(a, None, sample=mon.config.sample, eps=mon.config.eps,
                               units_max_window=a.max(axis=0))
        for s in ("mean", "std", "max_abs", "zero_frac", "dead_frac"):
            assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-7), s
        assert len(outs) == 1
        reports.close()

    # After close no neurotop hook is left, and the copies still work.
    assert not hooks_of(model)
    ema(torch.randn(2, 8))
