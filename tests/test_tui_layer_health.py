"""The layers table judges only what it can: a real loop's module that is never called is
drawn dim as idle (not as red NaNs; a plain dot in the heat strip), dead fractions are
coloured on activation layers only (not on a log-softmax head or a LayerNorm), and a
healthy ReLU's zeros are not a warning."""

from __future__ import annotations

import numpy as np
import torch
from rich.style import Style
from torch import nn

import neurotop
from neurotop.tui.data.health import idle, levels
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.screens.dashboard import HeatStrip
from neurotop.tui.screens.replay_app import ReplayApp
from neurotop.tui.screens.widgets import LayerTable, level_styles
from tests.helpers.pilot import table_cells, until


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(8, 32), nn.ReLU()
        self.norm, self.head, self.logp = nn.LayerNorm(32), nn.Linear(32, 4), nn.LogSoftmax(-1)
        self.spare = nn.Linear(8, 8)  # built, never called (an unused branch)
        with torch.no_grad():
            self.fc1.bias[:20] = -100.0  # 20 of 32 units dead: the ReLU warns (62%)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logp(self.head(self.norm(self.act(self.fc1(x)))))


def recorded_run(tmp_path) -> ReplaySource:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with neurotop.watch(model, opt, name="health", report_every=1, record=tmp_path) as mon:
        for _ in range(3):
            loss = -model(torch.randn(64, 8))[:, 0].mean()
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
    return ReplaySource(mon.recorder.path).start()


async def test_idle_rows_and_dead_fraction_colours(tmp_path):
    source = recorded_run(tmp_path)
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(200, 50)) as pilot:
            await until(pilot, lambda: app.store.status.step == 3, what="the recording")
            heat = app.query_one(HeatStrip)  # the overview's, of dead_frac
            await until(pilot, lambda: "spare" in heat.text, what="the heat strip")
            line = next(ln for ln in heat.text.splitlines() if ln.startswith("spare"))
            assert "·" in line and "×" not in line, "a layer not called is not an alarm"
            await pilot.press("2")
            table = app.query_one(LayerTable)
            await until(pilot, lambda: table.row_count == 6, what="the layer rows")
            healthy, warn, _ = (Style.parse(c).color for c in level_styles(table))

            spare = table_cells(table, "spare")
            text = "".join(c.text for c in spare.values())
            assert "idle" in text and "nan" not in text
            assert all(c.style.dim for c in spare.values() if c.text.strip())

            act = table_cells(table, "act")
            assert act["dead_frac"].text.strip() == "0.6250"
            assert act["dead_frac"].style.color == warn
            assert float(act["zero_frac"].text) > 0.5  # dead units and ReLU's own zeros
            assert act["zero_frac"].style.color == act["layer"].style.color  # no band
            logp = table_cells(table, "logp")
            assert logp["dead_frac"].text.strip() == "1.0000"  # log-probabilities are < 0
            assert logp["dead_frac"].style.color == logp["layer"].style.color, "logits judged"
            norm = table_cells(table, "norm")
            assert norm["dead_frac"].style.color == norm["layer"].style.color
            assert norm["nonfinite"].style.color == healthy  # a band, and healthy
    finally:
        source.close()


class Shared(nn.Module):
    """One Linear applied at two places in each forward (a weight-tied block)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.act = nn.Linear(8, 16), nn.Linear(16, 16), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.act(self.shared(self.act(self.inp(x))))).sum(-1)


async def test_a_module_called_at_two_places_is_marked_in_the_table(tmp_path):
    torch.manual_seed(0)
    model = Shared()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with neurotop.watch(model, opt, name="shared", report_every=1, record=tmp_path) as mon:
        for _ in range(3):
            loss = model(torch.randn(16, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
    source = ReplaySource(mon.recorder.path).start()
    app = ReplayApp(source)
    try:
        async with app.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: app.store.status.step == 3, what="the recording")
            await pilot.press("2")
            table = app.query_one(LayerTable)
            await until(pilot, lambda: table.row_count == 3, what="the layer rows")

            def label(layer: str) -> list[str]:
                """The name cell: the name as shown, then the layer's type."""
                return table_cells(table, layer)["layer"].text.split()

            assert label("shared") == ["shared", "×2", "Linear"]
            assert label("inp") == ["inp", "Linear"]
            assert table.selected_layer() in ("inp", "shared", "act")  # names stay the keys
    finally:
        source.close()


def test_levels_and_idle_rows():
    assert levels("zero_frac", np.array([0.5, 0.97])).tolist() == [-1, -1]
    acts = np.array([True, False])
    assert levels("dead_frac", np.array([0.95, 0.95]), activations=acts).tolist() == [2, -1]
    assert levels("dead_frac", np.array([[0.6, 0.1], [1.0, 1.0]]),
                  activations=acts[:, None]).tolist() == [[1, 0], [-1, -1]]
    block = np.array([[0.1, 0.0], [np.nan, np.nan], [np.nan, 3.0]], np.float32)
    assert idle(("mean", "nonfinite"), block).tolist() == [False, True, False]
    assert idle(("mean", "std"), block).tolist() == [False, True, False]
