"""Fixed, symmetric, log-spaced histogram bins (one per octave), the same for every report.

With magnitudes m_j = 2**(lo + j), j = 0..K (K = hi - lo), the finite edges are
``-m_K .. -m_0, m_0 .. m_K`` and the 2K + 3 bins are, in order: |a| >= m_K negative
(overflow), K negative octaves, the zero bin |a| < m_0, K positive octaves, |a| >= m_K
positive. A value's bin depends on |a| and its sign only: [m_j, m_j+1) for a > 0 and the
mirror image (-m_j+1, -m_j] for a < 0. Activations and gradients share the bins, so
histograms compare across layers and over time. ``neurotop.training.stats.hist_counts`` bins on the
device; this module is torch-free so that the UI can read the same edges.
"""

from __future__ import annotations

import numpy as np


def hist_edges(exponents: tuple[int, int]) -> np.ndarray:
    """The 2K + 2 finite edges, ascending (float64)."""
    lo, hi = exponents
    mags = 2.0 ** np.arange(lo, hi + 1)
    return np.concatenate([-mags[::-1], mags])
