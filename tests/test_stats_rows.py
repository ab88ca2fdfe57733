"""One call's exact statistics, every code path (``activation_row`` as on CPU and
``device_row`` as on a device, which runs on CPU too, and the batched path of small
outputs, both ways) against NumPy: max, min, the non-finite count and each unit's max,
for units along the last dimension and along dim 1, contiguous or not, with NaN and
infinities planted or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurotop.service.finalize import MAX, MIN, NONFINITE, ROW_COLS
from neurotop.training.batched_calls import CallBatch
from neurotop.training.stats import Needs, activation_row, call_plan, device_row, take_sample

STATS = ("max_abs", "nonfinite", "dead_frac")
CASES = [((64, 48), 1), ((4, 128, 96), 2), ((8, 12, 5, 7), 1), ((3, 16, 40), 1), ((5,), 0)]
PLANTS = {"": [], "nan": [float("nan")] * 2, "inf": [float("inf"), float("-inf")],
          "neg": [float("-inf")]}


def _input(shape: tuple[int, ...], unit_dim: int, plant: str, strided: bool) -> torch.Tensor:
    """A random tensor of ``shape`` (a transposed copy's view when ``strided``) with one
    dead unit (never positive) and ``PLANTS[plant]`` at fixed places."""
    g = torch.Generator().manual_seed(len(shape))
    if strided and len(shape) >= 2:
        x = torch.randn(tuple(reversed(shape)), generator=g).permute(
            *reversed(range(len(shape))))
        assert not x.is_contiguous()
    else:
        x = torch.randn(shape, generator=g)
    if len(shape) >= 2:
        x.select(unit_dim, 1).clamp_(max=-0.5)
    for j, v in enumerate(PLANTS[plant]):
        x.view(-1)[(j * 997 + 3) % x.numel()] = v
    return x


def _planted(shape: tuple[int, ...], unit_dim: int, plant: str, strided: bool
             ) -> torch.Tensor:
    """``_input``; a strided one planted through its view: same values, other places."""
    x = _input(shape, unit_dim, plant if not strided else "", strided)
    if strided and plant:
        for j, v in enumerate(PLANTS[plant]):
            x[(j,) * x.dim()] = v
    return x


@pytest.mark.parametrize("row", ["cpu", "device"])
@pytest.mark.parametrize("plant", list(PLANTS))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize(("shape", "unit_dim"), CASES)
def test_row_matches_numpy(row, plant, strided, shape, unit_dim):
    x = _planted(shape, unit_dim, plant, strided)
    a = x.numpy().astype(np.float64)
    plan = call_plan(x.shape, x.is_contiguous(), unit_dim, 256)
    need = Needs(STATS)
    zero = torch.zeros(())
    cols, umax, sample = (activation_row(x, plan, need, zero, None) if row == "cpu"
                          else device_row(x, plan, need, zero))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(float(cols[MAX]), np.max(a))  # NaN if any is NaN
        np.testing.assert_array_equal(float(cols[MIN]), np.min(a))
    assert float(cols[NONFINITE]) == np.count_nonzero(~np.isfinite(a))
    units = np.moveaxis(a, unit_dim, -1).reshape(-1, a.shape[unit_dim])
    np.testing.assert_array_equal(umax.amax(0).numpy(), units.max(0))
    if a.ndim >= 2 and not np.isnan(units[:, 1]).any():  # a NaN may land on it
        assert units[:, 1].max() <= -0.5 and umax.amax(0)[1].item() <= 0  # seen as dead
    flat = x.reshape(-1)
    assert 0 < sample.numel() <= max(256, x.shape[-1])
    assert sample.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()  # owned


def test_both_paths_take_one_sample():
    """The two paths take the same row sample (the report pools them alike)."""
    x = torch.randn(4, 128, 96)
    plan = call_plan(x.shape, True, 2, 1024)
    need, zero = Needs(STATS), torch.zeros(())
    _, _, s1 = activation_row(x, plan, need, zero, None)
    _, _, s2 = device_row(x, plan, need, zero)
    assert torch.equal(s1, s2) and 0 < s1.numel() <= 1024


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu", "device"])
@pytest.mark.parametrize(("shape", "unit_dim"), CASES)
def test_batched_calls_match_numpy_call_by_call(on_cpu, shape, unit_dim):
    """Calls of one shape copied into a batch (strided ones too, some with NaN or
    infinities, some clean) and measured at once: each call's row, unit maxima and sample
    are what it alone gives; the batch grows past its first slots on the way."""
    calls = [_planted(shape, unit_dim, plant, strided) * scale
             for strided in (False, True) for plant in PLANTS for scale in (1.0, 3.0)]
    plan = call_plan(calls[0].shape, True, unit_dim, 256)
    batch, need, c = CallBatch(plan, torch.device("cpu")), Needs(STATS), len(ROW_COLS)
    for k, x in enumerate(calls):
        assert not batch.add(x, layer=k % 3, at=k)
    assert batch.layers == [k % 3 for k in range(len(calls))]
    layers, at, (rows, units, samples) = batch.take(need, on_cpu)
    assert layers == [k % 3 for k in range(len(calls))] and at == list(range(len(calls)))
    assert not batch.layers and len(samples) == len(calls)
    for k, x in enumerate(calls):
        a = x.numpy().astype(np.float64)
        row = [float(v) for v in rows[k * c: (k + 1) * c]]
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(row[MAX], np.max(a))
            np.testing.assert_array_equal(row[MIN], np.min(a))
        assert row[NONFINITE] == np.count_nonzero(~np.isfinite(a))
        by_unit = np.moveaxis(a, unit_dim, -1).reshape(-1, a.shape[unit_dim])
        np.testing.assert_array_equal(units[k].numpy(), by_unit.max(0))
        torch.testing.assert_close(samples[k], take_sample(x.reshape(-1), plan), rtol=0,
                                   atol=0, equal_nan=True, msg="the sample one call takes")


def test_a_full_batch_is_measured_at_once_and_reused():
    plan = call_plan((4, 1024), True, 1, 256)
    batch = CallBatch(plan, torch.device("cpu"))
    batch.limit = 3
    full = [batch.add(torch.full((4, 1024), float(k)), layer=0, at=k) for k in range(3)]
    assert full == [False, False, True]
    _, _, (rows, _, _) = batch.take(Needs(STATS), True)
    assert rows[MAX::len(ROW_COLS)] == [0.0, 1.0, 2.0]
    assert not batch.add(torch.full((4, 1024), 7.0), layer=0, at=3)  # its slots again
    _, _, (rows, _, _) = batch.take(Needs(STATS), True)
    assert rows[MAX] == 7.0 and batch.buf.shape[0] == 3
