"""Validation and generation inside a report window, as most trainers run them every N
steps: forwards under ``no_grad``/``inference_mode`` or in eval mode are not measured by
default, so the report holds the training forwards only (checked against plain PyTorch),
``samples_per_s`` counts training samples only, and the eval batches hold no memory."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import neurotop
from tests.helpers import numpy_reference as ref
from tests.helpers.reports import Reports

LAYERS = ["0", "1", "2", "3"]


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    with torch.no_grad():
        model[0].bias[:8] = -3.0  # units dead on training inputs ...
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g) * 0.3
    y = torch.randint(0, 3, (16,), generator=g)
    val = [torch.randn(64, 8, generator=g) * 20 for _ in range(200)]  # ... alive on these
    return model, x, y, val


class Capture:
    """Each layer's outputs while ``on`` (the training forwards), by plain forward hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.on, self.outs = False, {n: [] for n in LAYERS}
        mods = dict(model.named_modules())
        for n in LAYERS:
            mods[n].register_forward_hook(lambda m, i, o, n=n: self._add(n, o))

    def _add(self, name: str, out: torch.Tensor) -> None:
        if self.on:
            self.outs[name].append(out.detach().numpy().copy())


def held_tensor_bytes() -> int:
    """Bytes of every tensor storage Python still references (parameters, caches...).
    Tensors without data (meta, and the fake ones an earlier ``torch.compile`` in this
    process may leave behind) hold no memory."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)
                   and not isinstance(o, FakeTensor)]
    for o in tensors:
        if not o.is_meta:
            s = o.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def evaluate(model: nn.Module, val: list[torch.Tensor]) -> float:
    """The usual validation loop, and the other forwards that do not train."""
    model.eval()
    with torch.no_grad():
        total = sum(float(model(v).sum()) for v in val)
    model.train()
    with torch.inference_mode():
        model(val[0])
    with torch.no_grad():  # train mode, no grad (a teacher or a generation pass)
        model(val[1])
    model.eval()
    model(val[2]).sum().backward()  # eval mode with grad (an attribution pass)
    model.zero_grad()
    model.train()
    return total


def step(model, opt, mon, cap, x, y) -> None:
    cap.on = True
    loss = nn.functional.cross_entropy(model(x), y)
    cap.on = False
    opt.zero_grad()
    loss.backward()
    mon.observe(loss=loss)
    opt.step()


def test_eval_inside_the_window_is_not_measured_and_holds_nothing():
    model, x, y, val = model_and_data()
    cap = Capture(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with neurotop.watch(model, opt, report_every=2, record=False) as mon:
        reports = Reports(mon)
        for _ in range(2):
            step(model, opt, mon, cap, x, y)
        for v in cap.outs.values():
            v.clear()
        assert mon._active  # step 3 reports: the eval below runs inside its window
        evaluate(model, val[:10])
        before = held_tensor_bytes()
        evaluate(model, val)
        held = held_tensor_bytes() - before
        assert held <= 16 << 10, f"200 eval batches left {held} bytes held"
        step(model, opt, mon, cap, x, y)
        got = reports.stats(3)
        reports.close()
    for name in LAYERS:
        a = np.concatenate(cap.outs[name])
        assert len(cap.outs[name]) == 1
        want = ref.layer_stats(a, None, sample=mon.config.sample, eps=mon.config.eps,
                               units_max_window=a.max(axis=0))
        row = got.layer(name)
        for s in ("mean", "std", "rms", "max_abs", "zero_frac", "dead_frac", "kurtosis"):
            assert row[s] == pytest.approx(want[s], rel=1e-5, abs=1e-7), (name, s)
    assert got.layer("1")["dead_frac"] >= 0.25  # the dead units stay dead in the report
    sc = got.scalars
    assert sc["samples_per_s"] == pytest.approx(16 * sc["steps_per_s"], rel=1e-5)


def test_measure_eval_config_measures_them():
    model, x, y, val = model_and_data()
    cap = Capture(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with neurotop.watch(model, opt, report_every=1, record=False,
                        config=neurotop.Config(measure_eval=True)) as mon:
        reports = Reports(mon)
        model.eval()
        with torch.no_grad():
            big = float(model[0](val[0]).abs().max())
            model(val[0])
        model.train()
        step(model, opt, mon, cap, x, y)
        got = reports.stats(1)
        reports.close()
    train_max = float(np.abs(cap.outs["0"][0]).max())
    assert big > 10 * train_max
    assert got.layer("0")["max_abs"] == pytest.approx(big, rel=1e-6)
    assert got.layer("1")["dead_frac"] == 0  # alive on the eval inputs
