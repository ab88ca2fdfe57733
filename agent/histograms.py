"""Fixed, symmetric, log-spaced histogram bins, the same for every report of a run.

Magnitudes m_j = 10**(lo + j/per_decade), j = 0..K, give the finite edges
``-m_K .. -m_0, m_0 .. m_K``. The bins are, in order: below -m_K, K negative bins, the
zero bin (-m_0, m_0), K positive bins, and at or above m_K: 2K + 3 bins. Activations and
gradients share the edges, so histograms are comparable across layers and over time.
"""

from __future__ import annotations

import numpy as np
import torch


def hist_edges(decades: tuple[int, int], per_decade: int) -> np.ndarray:
    """The 2K + 2 finite edges, ascending (float64)."""
    lo, hi = decades
    k = (hi - lo) * per_decade
    mags = 10.0 ** (lo + np.arange(k + 1) / per_decade)
    return np.concatenate([-mags[::-1], mags])


def n_bins(decades: tuple[int, int], per_decade: int) -> int:
    return 2 * (decades[1] - decades[0]) * per_decade + 3


@torch.no_grad()
def histogram_rows(samples: list[torch.Tensor], bins: int, decades: tuple[int, int],
                   per_decade: int, device: torch.device) -> torch.Tensor:
    """``[len(samples) x bins]`` counts, one row per 1-D sample, in one batch of kernels.

    The bin index comes from log10|x| rather than a search, and the counts from a
    ``scatter_add_`` into a fixed-size buffer: no ``bincount``, whose output size depends
    on the data (a sync on CUDA). NaN goes to a spare last column, dropped here.
    """
    if not samples:
        return torch.zeros((0, bins), device=device)
    x = torch.nn.utils.rnn.pad_sequence([t.to(device, torch.float32) for t in samples],
                                        batch_first=True, padding_value=float("nan"))
    lo, hi = decades
    k = (hi - lo) * per_decade
    p = x.abs().log10_().sub_(lo).mul_(per_decade).floor_().add_(1).clamp_(0, k + 1)
    p.nan_to_num_(nan=k + 2)
    idx = torch.where(x < 0, (k + 1) - p, (k + 1) + p).long()
    out = torch.zeros((len(samples), bins + 1), device=device)
    out.scatter_add_(1, idx, torch.ones_like(x))
    return out[:, :bins]
