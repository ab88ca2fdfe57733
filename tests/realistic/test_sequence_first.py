"""A sequence-first model (``nn.LSTM`` without ``batch_first``: inputs ``(T, B, F)``) counts
its batch, not its sequence length, as samples once told ``watch(..., batch_dim=1)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import neurotop
from neurotop.config import ConfigError
from neurotop.tui.data.replay_source import ReplaySource

T, B = 12, 3


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(5, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def samples_per_step(tmp_path, **options) -> np.ndarray:
    torch.manual_seed(0)
    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with neurotop.watch(model, opt, report_every=2, record=tmp_path, **options) as mon:
        for _ in range(9):
            loss = model(torch.randn(T, B, 5)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    src = ReplaySource(mon.recorder.path)
    src.load()
    _, samples = src.store.scalar("samples_per_s")
    _, steps = src.store.scalar("steps_per_s")
    ratio = samples / steps
    ratio = ratio[np.isfinite(ratio)]  # the first report has no rate yet
    assert len(ratio) >= 3
    return ratio


def test_batch_dim_names_the_batch(tmp_path):
    assert samples_per_step(tmp_path / "a", batch_dim=1) == pytest.approx(B, rel=1e-5)
    assert samples_per_step(tmp_path / "b") == pytest.approx(T, rel=1e-5)  # dim 0: T
    with pytest.raises(ConfigError, match="batch_dim"):
        neurotop.Config(batch_dim=-1)
