"""The report's summary in one padded layout (``stats.summary_layout``, built once per layout
of calls) against NumPy and against the grouped path it replaced: every column of every
layer, layers called several times (pooled in call order), layers of different sample
sizes, a layer with no call, and the histogram counts taken from the same buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurotop.service.finalize import SUMMARY_COLS
from neurotop.training.stats import (
    MEDIAN_SAMPLE,
    hist_counts,
    hist_counts_at,
    hist_layout,
    pool_by_layer,
    sample_stride,
    stack_by_size,
    summarize,
    summarize_layout,
    summary_layout,
)
from tests.helpers.numpy_reference import histogram

EPS = 0.05
CPU = torch.device("cpu")


def _window(seed: int) -> tuple[list[int], list[torch.Tensor]]:
    """Calls of 5 layers: layer 1 called twice, layer 3 never; sizes 7 to 4096; zeros,
    near-zeros and a ReLU-like half of zeros planted."""
    g = torch.Generator().manual_seed(seed)
    row_layer = [0, 1, 2, 1, 4]
    sizes = [4096, 300, 7, 300, 1000]
    samples = []
    for i, n in zip(row_layer, sizes, strict=True):
        t = torch.randn(n, generator=g) * (i + 1) + i
        if i == 4:
            t.clamp_(min=0)
        t[:3] = torch.tensor([0.0, 0.01, -0.02])
        samples.append(t)
    return row_layer, samples


def _numpy_summary(pooled: np.ndarray) -> list[float]:
    s = pooled.astype(np.float64)
    mag = np.abs(s)
    small = mag[:: sample_stride(s.size, MEDIAN_SAMPLE, 1)]
    med = np.median(small[: small.size - (small.size % 2 == 0)])
    return [s.mean(), s.var(), np.mean((s - s.mean()) ** 4), np.mean(s == 0),
            np.mean(mag < EPS), med]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layout_summary_matches_numpy_and_the_grouped_path(seed):
    row_layer, samples = _window(seed)
    lay = summary_layout(row_layer, [t.numel() for t in samples], 5, CPU)
    assert lay is not None
    got = summarize_layout(lay, samples, EPS).numpy()
    assert got.shape == (5, len(SUMMARY_COLS))
    old = summarize(stack_by_size(pool_by_layer(samples, row_layer), CPU), 5, EPS, CPU).numpy()
    for i in range(5):
        calls = [t.numpy() for t, j in zip(samples, row_layer, strict=True) if j == i]
        if not calls:
            assert np.isnan(got[i]).all() and np.isnan(old[i]).all()
            continue
        want = _numpy_summary(np.concatenate(calls))
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6, err_msg=f"layer {i}")
        np.testing.assert_allclose(got[i], old[i], rtol=1e-5, atol=1e-6)
        # fractions and the median are exact (counts of the same values, the same pick)
        np.testing.assert_array_equal(got[i, 3:], old[i, 3:])


def test_layout_is_reused_and_overwritten_each_report():
    """The same layout serves the next window: its buffer is overwritten, not appended."""
    row_layer, samples = _window(3)
    lay = summary_layout(row_layer, [t.numel() for t in samples], 5, CPU)
    first = summarize_layout(lay, samples, EPS).clone()
    shifted = [t + 1 for t in samples]
    second = summarize_layout(lay, shifted, EPS)
    np.testing.assert_allclose(second[[0, 1, 2, 4], 0], first[[0, 1, 2, 4], 0] + 1, rtol=1e-5)
    again = summarize_layout(lay, samples, EPS)
    np.testing.assert_array_equal(again.numpy(), first.numpy())


def test_histograms_from_the_layout_match_numpy():
    row_layer, samples = _window(4)
    samples[2][4] = float("nan")  # not counted
    samples[0][7], samples[0][8] = float("inf"), float("-inf")  # overflow bins
    lay = summary_layout(row_layer, [t.numel() for t in samples], 5, CPU)
    summarize_layout(lay, samples, EPS)
    want_layers, exps, limit = [4, 0, 1, 3], (-8, 4), 100
    got = hist_counts_at(lay.buf.view(-1).take(hist_layout(lay, want_layers, limit)), exps)
    old = hist_counts(stack_by_size(pool_by_layer(samples, row_layer), CPU), want_layers, exps,
                      limit, CPU)
    np.testing.assert_array_equal(got.numpy(), old.numpy())
    for r, i in enumerate(want_layers):
        calls = [t.numpy() for t, j in zip(samples, row_layer, strict=True) if j == i]
        want = (histogram(np.concatenate(calls), exps, limit) if calls
                else np.zeros(got.shape[1]))
        np.testing.assert_array_equal(got[r].numpy(), want, err_msg=f"layer {i}")


def test_ragged_windows_take_the_grouped_path():
    """A layer called so often that padding every layer to it would cost more than 4x the
    memory: no layout (the collector groups by size instead)."""
    row_layer = [0] * 50 + list(range(1, 10))
    assert summary_layout(row_layer, [4096] * 59, 10, CPU) is None
    assert summary_layout([0, 1, 2], [4096, 4096, 4000], 3, CPU) is not None
