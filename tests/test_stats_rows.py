"""One call's exact statistics, both code paths (``activation_row`` as on CPU and
``device_row`` as on a device, which runs on CPU too) against NumPy: max, min, the
non-finite count and each unit's max, for units along the last dimension and along dim 1,
contiguous or not, with NaN and infinities planted or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurotop.service.finalize import MAX, MIN, NONFINITE
from neurotop.training.stats import Needs, activation_row, call_plan, device_row

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


@pytest.mark.parametrize("row", ["cpu", "device"])
@pytest.mark.parametrize("plant", list(PLANTS))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize(("shape", "unit_dim"), CASES)
def test_row_matches_numpy(row, plant, strided, shape, unit_dim):
    x = _input(shape, unit_dim, plant if not strided else "", strided)
    if strided and plant:  # plant through the strided view: same values, other places
        for j, v in enumerate(PLANTS[plant]):
            x[(j,) * x.dim()] = v
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
