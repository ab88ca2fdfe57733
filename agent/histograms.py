"""Fixed, symmetric, log-spaced histogram bins (one per octave), the same for every report.

With magnitudes m_j = 2**(lo + j), j = 0..K (K = hi - lo), the finite edges are
``-m_K .. -m_0, m_0 .. m_K`` and the 2K + 3 bins are, in order: |a| >= m_K negative
(overflow), K negative octaves, the zero bin |a| < m_0, K positive octaves, |a| >= m_K
positive. A value's bin depends on |a| and its sign only: [m_j, m_j+1) for a > 0 and the
mirror image (-m_j+1, -m_j] for a < 0. Activations and gradients share the bins, so
histograms compare across layers and over time. The bin comes from the float's exponent
bits (exact, and ~20x cheaper than a log or a search). Torch-free: the agent thread bins
the report's samples, and the UI reads the edges from the schema.
"""

from __future__ import annotations

import numpy as np


def hist_edges(exponents: tuple[int, int]) -> np.ndarray:
    """The 2K + 2 finite edges, ascending (float64)."""
    lo, hi = exponents
    mags = 2.0 ** np.arange(lo, hi + 1)
    return np.concatenate([-mags[::-1], mags])


def histograms(samples: list[np.ndarray], exponents: tuple[int, int], limit: int) -> np.ndarray:
    """``[len(samples) x bins]`` counts, each of at most ``limit`` values (every s-th).

    NaN is not counted (the ``nonfinite`` column counts non-finite values exactly).
    """
    lo, hi = exponents
    k = hi - lo
    bins = 2 * k + 3
    if not samples:
        return np.zeros((0, bins), np.float32)
    picked = [a[:: max(1, -(-a.size // max(limit, 1)))] for a in samples]
    bits = np.concatenate(picked).astype(np.float32).view(np.int32)
    mag = bits & 0x7FFFFFFF
    exp = (mag >> 23) - 127  # floor(log2|a|); -127 for zero and subnormals; 128 for inf, NaN
    p = np.clip(exp - lo, -1, k)  # -1: the zero bin; k: overflow
    idx = np.where(bits < 0, k - p, k + 2 + p)
    offsets = np.repeat(np.arange(len(picked)) * bins, [q.size for q in picked])
    keep = mag <= 0x7F800000  # not NaN
    counts = np.bincount((offsets + idx)[keep], minlength=len(picked) * bins)
    return counts.reshape(len(picked), bins).astype(np.float32)
